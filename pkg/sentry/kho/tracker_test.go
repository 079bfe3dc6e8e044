package kho

import (
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
)

func TestTrackerBitmapsDoNotChangeWhenBlocksAreTaken(t *testing.T) {
	tr := newMemTracker(1 << 16)
	tr.set(1024, 10)
	tr.set(9, 0)
	set := tr.bitmaps()
	// Restoring takes the block in the tracker; pgalloc fills page
	// metadata from the adopted bitmaps later, so they must keep it.
	if !tr.clear(9, 0) {
		t.Fatal("clear(9, 0) found no bit")
	}
	if tr.test(9, 0) || tr.clear(9, 0) {
		t.Fatal("a taken block is still preserved in the tracker")
	}
	tr.unclear(9, 0)
	if !tr.test(9, 0) {
		t.Fatal("unclear did not give the block back")
	}
	if !tr.clear(9, 0) {
		t.Fatal("clear(9, 0) after unclear found no bit")
	}
	for _, tc := range []struct {
		name  string
		order int
		bit   uint64
		want  bool
	}{
		{"a block taken in the tracker is still in the adopted bitmaps", 0, 9, true},
		{"an order-10 block is in the adopted bitmaps", 10, 1, true},
		{"an unset block is not in the adopted bitmaps", 0, 8, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := set[tc.order][tc.bit/pgalloc.BitmapBits]
			got := b != nil && b[tc.bit%pgalloc.BitmapBits/64]&(1<<(tc.bit%64)) != 0
			if got != tc.want {
				t.Errorf("bit %d of order %d in the adopted bitmaps: %v, want %v", tc.bit, tc.order, got, tc.want)
			}
		})
	}
}

func TestTrackerHeadOrder(t *testing.T) {
	tr := newMemTracker(1 << 16)
	tr.set(1024, 10)
	tr.set(8, 3)
	tr.set(9, 0) // a separate order-0 block inside nothing else
	for _, tc := range []struct {
		name  string
		pfn   uint64
		order int
		ok    bool
	}{
		{"an order-10 head is found with its order", 1024, 10, true},
		{"an order-3 head is found with its order", 8, 3, true},
		{"an order-0 head is found", 9, 0, true},
		{"a tail page of an order-10 block is not a head", 1024 + 512, 0, false},
		{"an unmarked page is not a head", 7, 0, false},
		{"a page beyond the tracker is not a head", 1 << 40, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, ok := tr.headOrder(tc.pfn)
			if ok != tc.ok || ok && o != tc.order {
				t.Errorf("headOrder(%#x) = %d, %v; want %d, %v", tc.pfn, o, ok, tc.order, tc.ok)
			}
		})
	}
}

func TestIngestTakesItsBitmapsFromThePreparedPool(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		mf := newFile(t, 1<<30)
		k, err := New(mf)
		if err != nil {
			t.Fatal(err)
		}
		// Order-0 folios in two 128 MiB stretches (two leaves) and one
		// order-9 folio (a third).
		for _, pfn := range []uint64{2048, 2049, 40000, 40002} {
			if err := k.PreserveFolio(pgalloc.Folio{PFN: pfn}); err != nil {
				t.Fatal(err)
			}
		}
		if err := k.PreserveFolio(pgalloc.Folio{PFN: 4096, Order: pgalloc.HugeOrder}); err != nil {
			t.Fatal(err)
		}
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		PrepareIngest(mf.Size())
		pool.mu.Lock()
		before := len(pool.pages)
		slab := pool.pages
		pool.mu.Unlock()
		mf2 := reopen(t, mf)
		k2, err := Ingest(mf2, k.RootAddr())
		if err != nil {
			t.Fatal(err)
		}
		pool.mu.Lock()
		used := before - len(pool.pages)
		pool.mu.Unlock()
		// Three preserved bitmaps (the root page shares the first) and one
		// taken bitmap, for the root page Ingest restores.
		if used != 4 {
			t.Fatalf("Ingest took %d bitmaps from the pool of %d, want 4", used, before)
		}
		inSlab := func(b *bitmap) bool {
			for i := range slab[:used] {
				if b == &slab[i] {
					return true
				}
			}
			return false
		}
		k2.mu.Lock()
		b0, b9 := k2.in.mem.orders[0][0], k2.in.mem.orders[pgalloc.HugeOrder][0]
		k2.mu.Unlock()
		if !inSlab(b0) || !inSlab(b9) {
			t.Fatal("the incoming bitmaps are not the pool's pages")
		}
		for _, f := range []pgalloc.Folio{{PFN: 2048}, {PFN: 2049}, {PFN: 40000}, {PFN: 40002}, {PFN: 4096, Order: pgalloc.HugeOrder}} {
			if got, err := k2.RestoreFolio(f.Addr()); err != nil || got != f {
				t.Fatalf("RestoreFolio(%#x) = %v, %v; want %v", f.Addr(), got, err, f)
			}
		}
	})
}

// TestFirstSetFrom checks firstSetFrom, which skips a word at a time,
// against a bit-by-bit search, at every start bit of a few words with a
// bit set before, at and after it, and in an empty bitmap.
func TestFirstSetFrom(t *testing.T) {
	var b bitmap
	if bit, ok := firstSetFrom(&b, 0); ok {
		t.Fatalf("firstSetFrom(empty, 0) = %d, true; want none", bit)
	}
	for _, bit := range []uint64{0, 1, 63, 64, 65, 127, 4000, abikho.PreserveBits - 64, abikho.PreserveBits - 1} {
		b[bit/64] |= 1 << (bit % 64)
	}
	for from := uint64(0); from < abikho.PreserveBits; from++ {
		want, wantOK := uint64(0), false
		for i := from; i < abikho.PreserveBits; i++ {
			if b[i/64]&(1<<(i%64)) != 0 {
				want, wantOK = i, true
				break
			}
		}
		if got, ok := firstSetFrom(&b, from); got != want || ok != wantOK {
			t.Fatalf("firstSetFrom(b, %d) = %d, %v; want %d, %v", from, got, ok, want, wantOK)
		}
	}
}
