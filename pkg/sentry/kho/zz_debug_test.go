package kho

import (
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/pgalloc"
)

func TestZZBreakdown(t *testing.T) {
	for _, l := range layouts {
		for _, gib := range []uint64{1, 8} {
			preserved := gib << 30 >> 12
			folios := preserved >> l.order
			span := folios * l.stride
			size := (span + 2048) << 12
			mf, _ := pgalloc.New(pgalloc.Options{Size: size, NoHugepages: true})
			k, _ := New(mf)
			base := uint64(1024)
			for j := uint64(0); j < folios; j++ {
				k.PreserveFolio(pgalloc.Folio{PFN: base + j*l.stride, Order: l.order})
			}
			t0 := time.Now()
			k.Finalize()
			t1 := time.Now()
			f, _ := mf.DupFile()
			mf2, _ := pgalloc.Open(f, pgalloc.Options{NoHugepages: true})
			t2 := time.Now()
			in, blocks, err := deserialize(mf2, k.RootAddr())
			if err != nil {
				t.Fatal(err)
			}
			t3 := time.Now()
			if err := mf2.AdoptRuns(blocks); err != nil {
				t.Fatal(err)
			}
			t4 := time.Now()
			_ = in
			t.Logf("%s %dGiB: finalize %v open %v deserialize %v adopt %v", l.name, gib, t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t4.Sub(t3))
			mf2.Close()
			mf.Close()
		}
	}
}
