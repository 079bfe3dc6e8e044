package kho

import (
	"errors"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

func TestRestoreFoliosStopsAtTheFirstBadAddress(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		mf := newFile(t, 64<<20)
		k, err := New(mf)
		if err != nil {
			t.Fatal(err)
		}
		var fs []pgalloc.Folio
		for _, order := range []int{0, 2, 0} {
			f, err := mf.Allocate(order)
			if err != nil {
				t.Fatal(err)
			}
			if err := k.PreserveFolio(f); err != nil {
				t.Fatal(err)
			}
			fs = append(fs, f)
		}
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		mf2 := reopen(t, mf)
		k2, err := Ingest(mf2, k.RootAddr())
		if err != nil {
			t.Fatal(err)
		}
		out := make([]pgalloc.Folio, 4)
		// The third address is a tail page of the order-2 folio.
		addrs := []uint64{fs[0].Addr(), fs[1].Addr(), fs[1].Addr() + pgalloc.PageSize, fs[2].Addr()}
		n, err := k2.RestoreFolios(addrs, out)
		if n != 2 || !errors.Is(err, unix.EINVAL) {
			t.Fatalf("RestoreFolios = %d, %v; want 2 restored and EINVAL for the tail page", n, err)
		}
		if out[0] != fs[0] || out[1] != fs[1] {
			t.Fatalf("restored %v, want %v with their orders", out[:2], fs[:2])
		}
		if _, err := k2.RestoreFolio(fs[1].Addr()); err == nil {
			t.Fatal("a folio RestoreFolios restored can be restored again")
		}
		if f, err := k2.RestoreFolio(fs[2].Addr()); err != nil || f != fs[2] {
			t.Fatalf("the folio after the bad address = %v, %v; want it still restorable", f, err)
		}
	})
}
