package kho

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
)

func TestTrackerRunsAreSortedAcrossOrders(t *testing.T) {
	for _, tc := range []struct {
		name   string
		orders []int
	}{
		{"one order comes out in address order", []int{0}},
		{"two orders are merged", []int{0, 9}},
		{"every order is merged", []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const pages = 1 << 22
			rng := rand.New(rand.NewPCG(3, 4))
			tr := newMemTracker(pages)
			var want []pgalloc.Block
			// Non-overlapping blocks: walk the file, each step a block of a
			// random allowed order at the next aligned pfn, or a gap. Full
			// 64-bit words of order 0 are included to cover the fast path.
			for pfn := uint64(1 << 10); pfn < pages-1<<10; {
				o := tc.orders[rng.IntN(len(tc.orders))]
				pfn = (pfn + 1<<o - 1) &^ (1<<o - 1)
				if rng.IntN(3) == 0 {
					pfn += 1 << o
					continue
				}
				n := 1
				switch {
				case o == 0 && rng.IntN(20) == 0:
					n = 200 // full words
				case rng.IntN(5) == 0:
					n = 1 + rng.IntN(70) // runs inside and across words
				}
				for i := 0; i < n; i++ {
					tr.set(pfn, o)
					want = append(want, pgalloc.Block{PFN: pfn, Order: o})
					pfn += 1 << o
				}
			}
			var got []pgalloc.Block
			var prevEnd uint64
			for _, r := range tr.runs() {
				if r.PFN < prevEnd || r.Count == 0 {
					t.Fatalf("run %+v is empty or not after the previous one", r)
				}
				if r.PFN == prevEnd && len(got) > 0 && got[len(got)-1].Order == int(r.Order) {
					t.Fatalf("run %+v could have been merged with the previous one", r)
				}
				for i := uint64(0); i < uint64(r.Count); i++ {
					got = append(got, pgalloc.Block{PFN: r.PFN + i<<r.Order, Order: int(r.Order)})
				}
				prevEnd = r.End()
			}
			if !slices.Equal(got, want) {
				t.Fatalf("runs() cover %d blocks, want %d (first difference at %d)", len(got), len(want), firstDiff(got, want))
			}
		})
	}
}

func firstDiff(a, b []pgalloc.Block) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
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
