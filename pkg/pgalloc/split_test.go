package pgalloc

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func TestSplit(t *testing.T) {
	for _, tc := range []struct {
		name    string
		order   int
		extra   bool
		wantErr error
	}{
		{name: "an order-9 folio splits into 512 order-0 folios", order: 9},
		{name: "an order-0 folio splits into itself", order: 0},
		{name: "a folio with another reference does not split", order: 3, extra: true, wantErr: unix.EBUSY},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mf, err := New(Options{Size: 64 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer mf.Close()
			fo, err := mf.Allocate(tc.order)
			if err != nil {
				t.Fatal(err)
			}
			b := mf.Bytes(fo)
			for i := range b {
				b[i] = byte(i / PageSize)
			}
			if tc.extra {
				mf.IncRef(fo)
			}
			err = mf.Split(fo)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Split(%v) = %v, want %v", fo, err, tc.wantErr)
			}
			st := mf.Stats()
			if tc.wantErr != nil {
				if got, refs, ok := mf.Lookup(fo.PFN); !ok || got != fo || refs != 2 {
					t.Fatalf("after a failed split, Lookup = %v, %d, %v; want %v with 2 references", got, refs, ok, fo)
				}
				return
			}
			if st.Folios[0] != fo.Pages() || (tc.order > 0 && st.Folios[tc.order] != 0) {
				t.Fatalf("folio counts after split = %v, want %d of order 0", st.Folios, fo.Pages())
			}
			for i := uint64(0); i < fo.Pages(); i++ {
				page := Folio{PFN: fo.PFN + i}
				if got, refs, ok := mf.Lookup(page.PFN); !ok || got != page || refs != 1 {
					t.Fatalf("Lookup(%#x) = %v, %d, %v; want %v with one reference", page.PFN, got, refs, ok, page)
				}
				if c := mf.Bytes(page)[0]; c != byte(i) {
					t.Fatalf("page %d holds %d after the split, want %d", i, c, byte(i))
				}
			}
			for i := uint64(0); i < fo.Pages(); i++ {
				mf.DecRef(Folio{PFN: fo.PFN + i})
			}
			mf.Drain()
			if st := mf.Stats(); st.AllocatedPages != 0 {
				t.Fatalf("%d pages still allocated after freeing every split page", st.AllocatedPages)
			}
		})
	}
}
