package kho

import (
	"math/bits"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
)

// bitmapWords is the number of 64-bit words in one bitmap page.
const bitmapWords = abikho.PreserveBits / 64

// bitmap is struct kho_mem_phys_bits: one page of preservation bits. Bit i
// of word w is bit 64*w+i, the same bit order as a Linux bitmap of unsigned
// longs on a little-endian machine. It is pgalloc's Bitmap, so that the
// incoming bitmaps are adopted as they are read.
type bitmap = pgalloc.Bitmap

// A kho bitmap and a pgalloc.Bitmap describe the same number of blocks.
var _ [abikho.PreserveBits - pgalloc.BitmapBits]struct{}
var _ [pgalloc.BitmapBits - abikho.PreserveBits]struct{}

// memTracker is the incoming side's record of preserved blocks (the v6.19
// struct kho_mem_track layout): per order, sparse bitmaps of
// abikho.PreserveBits bits indexed by (pfn >> order) / PreserveBits. Linux
// keeps them in an xarray per order; the memory file's size is fixed, so a
// slice of bitmap pointers per order (128 entries per 16 GiB at order 0)
// does the same job with one index operation.
//
// Ingest fills it from what it read, kho-v1 bitmap pages or kho-v2 leaves
// (a leaf is a kho-v1 bitmap, bit for bit), copied into the heap because
// the pages are stale after Adopt. It gives a folio head's order at restore
// (where Linux stamps page->private with KHO_PAGE_MAGIC and the order) and
// makes restore one-shot (the bit is cleared). The outgoing side tracks
// preserved memory in the radix tree instead (radixTree).
type memTracker struct {
	orders [pgalloc.MaxOrder + 1][]*bitmap
}

func newMemTracker(pages uint64) memTracker {
	var t memTracker
	for o := range t.orders {
		t.orders[o] = make([]*bitmap, (pages>>o)/abikho.PreserveBits+1)
	}
	return t
}

// bitmaps returns a copy of t's bitmaps for pgalloc.MemoryFile.AdoptBitmaps,
// which keeps them unchanged while t's bits are cleared as blocks are
// restored. It costs a copy of the bitmaps, not a step per block.
func (t *memTracker) bitmaps() pgalloc.Bitmaps {
	var s pgalloc.Bitmaps
	for o, bms := range t.orders {
		s[o] = make([]*pgalloc.Bitmap, len(bms))
		for i, b := range bms {
			if b != nil {
				c := *b
				s[o][i] = &c
			}
		}
	}
	return s
}

// locate returns the bitmap index, word and bit mask of the block (pfn, order).
func locate(pfn uint64, order int) (idx uint64, word int, mask uint64) {
	hi := pfn >> order
	bit := hi % abikho.PreserveBits
	return hi / abikho.PreserveBits, int(bit / 64), 1 << (bit % 64)
}

// set marks (pfn, order) preserved (__kho_preserve_order).
//
// Preconditions:
//   - (pfn, order) lies inside the file the tracker was made for.
func (t *memTracker) set(pfn uint64, order int) {
	idx, w, m := locate(pfn, order)
	b := t.orders[order][idx]
	if b == nil {
		b = new(bitmap)
		t.orders[order][idx] = b
	}
	b[w] |= m
}

// clear unmarks (pfn, order) (__kho_unpreserve_order) and reports whether it
// was marked.
func (t *memTracker) clear(pfn uint64, order int) bool {
	idx, w, m := locate(pfn, order)
	if idx >= uint64(len(t.orders[order])) {
		return false
	}
	b := t.orders[order][idx]
	if b == nil || b[w]&m == 0 {
		return false
	}
	b[w] &^= m
	return true
}

// test reports whether (pfn, order) is marked.
func (t *memTracker) test(pfn uint64, order int) bool {
	idx, w, m := locate(pfn, order)
	if idx >= uint64(len(t.orders[order])) {
		return false
	}
	b := t.orders[order][idx]
	return b != nil && b[w]&m != 0
}

// headOrder returns the order of the marked block whose head is pfn, the
// information Linux reads from the head page's page->private. Only orders to
// which pfn is aligned can have their head at pfn.
func (t *memTracker) headOrder(pfn uint64) (int, bool) {
	for o := 0; o <= pgalloc.MaxOrder; o++ {
		if o > 0 && pfn&(1<<o-1) != 0 {
			break
		}
		if t.test(pfn, o) {
			return o, true
		}
	}
	return 0, false
}

// forEach calls fn for every marked block, order by order and in address
// order within an order.
func (t *memTracker) forEach(fn func(pfn uint64, order int)) {
	for o, bms := range t.orders {
		for idx, b := range bms {
			if b == nil {
				continue
			}
			base := uint64(idx) * abikho.PreserveBits
			for w, word := range b {
				for word != 0 {
					i := uint64(bits.TrailingZeros64(word))
					word &= word - 1
					fn((base+uint64(w)*64+i)<<o, o)
				}
			}
		}
	}
}
