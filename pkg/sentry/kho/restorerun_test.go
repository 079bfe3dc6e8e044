package kho

import (
	"errors"
	"slices"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// Order-0 block numbers where KHO's bitmaps change word and page: a run
// across bitmapEdge is restored from two bitmaps.
const (
	wordEdge   = 64 * 511            // the last word of the first order-0 bitmap
	bitmapEdge = abikho.PreserveBits // the first block of the second order-0 bitmap
)

// runFileSize holds the first two order-0 bitmaps and more (65536 pages).
const runFileSize = 256 << 20

// pages returns the order-0 blocks [from, to) without those in except.
func pages(from, to uint64, except ...uint64) []pgalloc.Folio {
	var fs []pgalloc.Folio
	for p := from; p < to; p++ {
		if !slices.Contains(except, p) {
			fs = append(fs, pgalloc.Folio{PFN: p})
		}
	}
	return fs
}

// ingestPreserved preserves blocks in a new memory file of runFileSize
// bytes (they need not be allocated: only the map crosses), finalizes the
// handover in format and ingests it in a second MemoryFile over the same
// memfd.
func ingestPreserved(t *testing.T, format string, blocks []pgalloc.Folio) (*KHO, *pgalloc.MemoryFile) {
	t.Helper()
	mf := newFile(t, runFileSize)
	k, err := New(mf)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range blocks {
		if err := k.PreserveFolio(b); err != nil {
			t.Fatalf("PreserveFolio(%v): %v", b, err)
		}
	}
	if err := k.FinalizeFormat(format); err != nil {
		t.Fatal(err)
	}
	mf2 := reopen(t, mf)
	k2, err := Ingest(mf2, k.RootAddr())
	if err != nil {
		t.Fatalf("Ingest: %v", err)
	}
	return k2, mf2
}

// restoredAlready fails t unless RestoreFolio of each of fs fails with
// EINVAL, as for a block restored before.
func restoredAlready(t *testing.T, k *KHO, fs []pgalloc.Folio) {
	t.Helper()
	for _, f := range fs {
		if got, err := k.RestoreFolio(f.Addr()); !errors.Is(err, unix.EINVAL) {
			t.Fatalf("RestoreFolio(%#x) of a block the run restored = %v, %v; want EINVAL", f.Addr(), got, err)
		}
	}
}

// restorable fails t unless RestoreFolio of each of fs restores it, with
// its order.
func restorable(t *testing.T, k *KHO, fs []pgalloc.Folio) {
	t.Helper()
	for _, f := range fs {
		if got, err := k.RestoreFolio(f.Addr()); err != nil || got != f {
			t.Fatalf("RestoreFolio(%#x) = %v, %v; want %v, still restorable", f.Addr(), got, err, f)
		}
	}
}

func TestRestoreRunRestoresARunAcrossWordAndBitmapBoundariesWhole(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		// 140 blocks from six before a word boundary, across the last
		// word of the first bitmap and the bitmap boundary, to six into
		// the second word of the second bitmap; one preserved block on
		// each side of the run.
		first, n := uint64(wordEdge-6), uint64(140)
		before, after := pgalloc.Folio{PFN: first - 1}, pgalloc.Folio{PFN: first + n}
		if first+n <= bitmapEdge+64 {
			t.Fatalf("the run [%#x, %#x) does not reach the second word of the second bitmap", first, first+n)
		}
		k, mf := ingestPreserved(t, format, pages(first-1, first+n+1))
		if err := k.RestoreRun(first<<abikho.PageShift, 0, n); err != nil {
			t.Fatalf("RestoreRun(%#x, 0, %d) of preserved order-0 blocks: %v", first<<abikho.PageShift, n, err)
		}
		run := pages(first, first+n)
		restoredAlready(t, k, run)
		if err := k.RestoreRun(first<<abikho.PageShift, 0, n); !errors.Is(err, unix.EINVAL) {
			t.Fatalf("RestoreRun of the same run again = %v, want EINVAL", err)
		}
		// The blocks on either side are not part of the run.
		restorable(t, k, []pgalloc.Folio{before, after})
		// Each block is still the adopted folio, with the one reference
		// that is now the caller's.
		for _, f := range run {
			if got, refs, ok := mf.Lookup(f.PFN); !ok || got != f || refs != 1 {
				t.Fatalf("Lookup(%#x) of a restored block = %v, refs %d, ok %v; want %v with one reference", f.PFN, got, refs, ok, f)
			}
		}
		k.ReleaseRestoredRun(pgalloc.Run{PFN: first, Count: uint32(n)})
		for _, f := range run {
			if got, refs, ok := mf.Lookup(f.PFN); ok {
				t.Fatalf("Lookup(%#x) after ReleaseRestoredRun = %v with %d references; want no folio", f.PFN, got, refs)
			}
		}
		if k.Carried() {
			// A carried block released stops being preserved; the one
			// before the run, restored and kept, stays preserved.
			m := marked(k)
			for _, f := range run {
				if slices.Contains(m, f) {
					t.Fatalf("%v is still preserved after ReleaseRestoredRun of a carried handover", f)
				}
			}
			if !slices.Contains(m, before) {
				t.Fatalf("%v, restored and kept, is no longer preserved", before)
			}
		}
	})
}

func TestRestoreRunOfARunWithABadBlockRestoresNone(t *testing.T) {
	// Runs of 16 blocks, [first, first+16), across the bitmap boundary;
	// the bad block is after it, so the blocks of the first bitmap pass
	// the check before the run fails.
	const first = bitmapEdge - 8
	for _, tc := range []struct {
		name      string
		preserved []pgalloc.Folio
		// restoredFirst is restored with RestoreFolio before the run.
		restoredFirst []uint64
		n             uint64
		// good restore one by one afterwards, with their orders; bad
		// fail.
		good []pgalloc.Folio
		bad  []uint64
	}{
		{
			name:      "a run with a block not preserved fails",
			preserved: pages(first, first+16, first+13),
			n:         16,
			good:      pages(first, first+16, first+13),
			bad:       []uint64{first + 13},
		},
		{
			name:      "a run whose first block is not preserved fails",
			preserved: pages(first, first+16, first),
			n:         16,
			good:      pages(first, first+16, first),
			bad:       []uint64{first},
		},
		{
			name:      "a run with a block preserved with order 1 fails",
			preserved: append(pages(first, first+16, first+12, first+13), pgalloc.Folio{PFN: first + 12, Order: 1}),
			n:         16,
			good:      append(pages(first, first+16, first+12, first+13), pgalloc.Folio{PFN: first + 12, Order: 1}),
			bad:       []uint64{first + 13},
		},
		{
			name:          "a run with a block already restored fails",
			preserved:     pages(first, first+16),
			restoredFirst: []uint64{first + 15},
			n:             16,
			good:          pages(first, first+15),
			bad:           []uint64{first + 15},
		},
		{
			name:      "a run one block longer than the preserved blocks fails",
			preserved: pages(first, first+16),
			n:         17,
			good:      pages(first, first+16),
			bad:       []uint64{first + 16},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forEachFormat(t, func(t *testing.T, format string) {
				k, _ := ingestPreserved(t, format, tc.preserved)
				for _, p := range tc.restoredFirst {
					if _, err := k.RestoreFolio(p << abikho.PageShift); err != nil {
						t.Fatalf("RestoreFolio(%#x) before the run: %v", p<<abikho.PageShift, err)
					}
				}
				if err := k.RestoreRun(first<<abikho.PageShift, 0, tc.n); !errors.Is(err, unix.EINVAL) {
					t.Fatalf("RestoreRun(%#x, 0, %d) = %v, want EINVAL", uint64(first)<<abikho.PageShift, tc.n, err)
				}
				restorable(t, k, tc.good)
				for _, p := range tc.bad {
					if got, err := k.RestoreFolio(p << abikho.PageShift); !errors.Is(err, unix.EINVAL) {
						t.Fatalf("RestoreFolio(%#x) of the bad block = %v, %v; want EINVAL", p<<abikho.PageShift, got, err)
					}
				}
			})
		})
	}
}

func TestRestoreRunOfOrder9Blocks(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		// Three order-9 blocks from pfn 40960, and order-0 blocks around
		// the first bitmap boundary for the order-3 case.
		const huge = 40960
		var preserved []pgalloc.Folio
		for i := uint64(0); i < 3; i++ {
			preserved = append(preserved, pgalloc.Folio{PFN: huge + i<<pgalloc.HugeOrder, Order: pgalloc.HugeOrder})
		}
		k, mf := ingestPreserved(t, format, append(slices.Clone(preserved), pages(bitmapEdge-8, bitmapEdge+8)...))
		for _, tc := range []struct {
			name  string
			pfn   uint64
			order int
			n     uint64
		}{
			{name: "an address inside the first order-9 block fails", pfn: huge + 1, order: pgalloc.HugeOrder, n: 1},
			{name: "an address halfway into the first order-9 block fails", pfn: huge + 256, order: pgalloc.HugeOrder, n: 2},
			{name: "an order-0 block's address, not aligned to order 3, fails", pfn: bitmapEdge - 7, order: 3, n: 1},
			{name: "a run of four order-9 blocks where three are preserved fails", pfn: huge, order: pgalloc.HugeOrder, n: 4},
			{name: "a run of order-0 blocks inside an order-9 block fails", pfn: huge, order: 0, n: 8},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if err := k.RestoreRun(tc.pfn<<abikho.PageShift, tc.order, tc.n); !errors.Is(err, unix.EINVAL) {
					t.Fatalf("RestoreRun(%#x, %d, %d) = %v, want EINVAL", tc.pfn<<abikho.PageShift, tc.order, tc.n, err)
				}
			})
		}
		if err := k.RestoreRun(huge<<abikho.PageShift, pgalloc.HugeOrder, 3); err != nil {
			t.Fatalf("RestoreRun(%#x, %d, 3) of three preserved order-9 blocks: %v", huge<<abikho.PageShift, pgalloc.HugeOrder, err)
		}
		restoredAlready(t, k, preserved)
		for _, f := range preserved {
			if got, refs, ok := mf.Lookup(f.PFN); !ok || got != f || refs != 1 {
				t.Fatalf("Lookup(%#x) of a restored order-9 block = %v, refs %d, ok %v; want %v with one reference", f.PFN, got, refs, ok, f)
			}
		}
		// None of the failed calls took an order-0 block.
		restorable(t, k, pages(bitmapEdge-8, bitmapEdge+8))
	})
}

func TestRestoreRunRejectsBadArgumentsAndRestoresNothing(t *testing.T) {
	const first = bitmapEdge - 8
	const last4 = runFileSize>>abikho.PageShift - 4 // the file's last four pages
	k, _ := ingestPreserved(t, abikho.CompatibleV2, append(pages(first, first+16), pages(last4, last4+4)...))
	cold, err := New(newFile(t, runFileSize))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		k     *KHO
		pfn   uint64
		order int
		n     uint64
	}{
		{name: "no block fails", k: k, pfn: first, order: 0, n: 0},
		{name: "a negative order fails", k: k, pfn: first, order: -1, n: 1},
		{name: "an order above the maximum fails", k: k, pfn: first, order: pgalloc.MaxOrder + 1, n: 1},
		{name: "a run from the file's last four preserved pages past its end fails", k: k, pfn: last4, order: 0, n: 8},
		{name: "a run whose end overflows fails", k: k, pfn: first, order: 0, n: ^uint64(0)},
		{name: "a run whose end wraps to its start fails", k: k, pfn: first, order: 0, n: 1<<64 - first},
		{name: "a cold-booted KHO has nothing to restore", k: cold, pfn: first, order: 0, n: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.k.RestoreRun(tc.pfn<<abikho.PageShift, tc.order, tc.n); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("RestoreRun(%#x, %d, %d) = %v, want EINVAL", tc.pfn<<abikho.PageShift, tc.order, tc.n, err)
			}
		})
	}
	restorable(t, k, append(pages(first, first+16), pages(last4, last4+4)...))
}

func TestTrackerClearRunTakesAllOrNothing(t *testing.T) {
	const trackerPages = 1 << 17 // order-0 bitmaps 0 to 4
	// A span is n blocks of the case's order from block number first
	// (pfn >> order).
	type span struct{ first, n uint64 }
	for _, tc := range []struct {
		name      string
		order     int
		preserved []span
		taken     []uint64 // pfns
		first, n  uint64   // the run, from block number first
		want      bool
	}{
		{name: "a run inside one word is taken", preserved: []span{{3, 8}}, first: 3, n: 7, want: true},
		{name: "a run across a word boundary is taken", preserved: []span{{58, 14}}, first: 60, n: 10, want: true},
		{name: "a run of exactly one aligned word is taken", preserved: []span{{63, 66}}, first: 64, n: 64, want: true},
		{name: "a run across a bitmap boundary is taken", preserved: []span{{bitmapEdge - 100, 300}}, first: bitmapEdge - 95, n: 150, want: true},
		{name: "a run longer than a bitmap is taken", preserved: []span{{bitmapEdge - 10, abikho.PreserveBits + 100}}, first: bitmapEdge - 5, n: abikho.PreserveBits + 50, want: true},
		{name: "a run of order-3 blocks across a word boundary is taken", order: 3, preserved: []span{{60, 12}}, first: 61, n: 10, want: true},
		{name: "a run with a hole in its second word is refused", preserved: []span{{60, 8}, {69, 2}}, first: 60, n: 10},
		{name: "a run with a hole in its second bitmap is refused", preserved: []span{{bitmapEdge - 10, 15}, {bitmapEdge + 6, 10}}, first: bitmapEdge - 10, n: 20},
		{name: "a run with a block taken in its second word is refused", preserved: []span{{60, 10}}, taken: []uint64{69}, first: 60, n: 10},
		{name: "a run reaching past the tracker's bitmaps is refused", preserved: []span{{5*abikho.PreserveBits - 5, 5}}, first: 5*abikho.PreserveBits - 5, n: 10},
		{name: "a run whose end overflows is refused", preserved: []span{{3, 8}}, first: 3, n: ^uint64(0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newMemTracker(trackerPages)
			var blocks []uint64
			for _, s := range tc.preserved {
				for i := range s.n {
					p := (s.first + i) << tc.order
					tr.set(p, tc.order)
					blocks = append(blocks, p)
				}
			}
			for _, p := range tc.taken {
				if !tr.clear(p, tc.order) {
					t.Fatalf("clear(%#x, %d) of a preserved block failed", p, tc.order)
				}
			}
			start := tc.first << tc.order
			if got := tr.clearRun(start, tc.order, tc.n); got != tc.want {
				t.Fatalf("clearRun(%#x, %d, %d) = %v, want %v", start, tc.order, tc.n, got, tc.want)
			}
			for _, p := range blocks {
				inRun := p>>tc.order >= tc.first && p>>tc.order-tc.first < tc.n
				want := !slices.Contains(tc.taken, p) && !(tc.want && inRun)
				if got := tr.test(p, tc.order); got != want {
					t.Fatalf("after clearRun(%#x, %d, %d) = %v: block %#x untaken = %v, want %v", start, tc.order, tc.n, tc.want, p, got, want)
				}
			}
		})
	}
}
