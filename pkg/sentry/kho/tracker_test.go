package kho

import (
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
)

func TestTrackerBitmapsAreACopyThatRestoreDoesNotChange(t *testing.T) {
	tr := newMemTracker(1 << 16)
	tr.set(1024, 10)
	tr.set(9, 0)
	set := tr.bitmaps()
	// Restoring clears the tracker's bit; pgalloc fills page metadata from
	// its copy later, so the copy must keep it.
	if !tr.clear(9, 0) {
		t.Fatal("clear(9, 0) found no bit")
	}
	for _, tc := range []struct {
		name  string
		order int
		bit   uint64
		want  bool
	}{
		{"a block cleared in the tracker after the copy is still in the copy", 0, 9, true},
		{"an order-10 block is in the copy", 10, 1, true},
		{"an unset block is not in the copy", 0, 8, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := set[tc.order][tc.bit/pgalloc.BitmapBits]
			got := b != nil && b[tc.bit%pgalloc.BitmapBits/64]&(1<<(tc.bit%64)) != 0
			if got != tc.want {
				t.Errorf("bit %d of order %d in the copy: %v, want %v", tc.bit, tc.order, got, tc.want)
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
