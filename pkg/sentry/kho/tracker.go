package kho

import (
	"math/bits"
	"sync"

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
// Ingest fills orders from what it read, kho-v1 bitmap pages or kho-v2
// leaves (a leaf is a kho-v1 bitmap, bit for bit), copied into the heap
// because the pages are stale after Adopt, and then hands the same bitmaps
// to pgalloc.MemoryFile.AdoptBitmaps: from then on they never change.
// Restoring or releasing a block sets its bit in taken instead (allocated a
// bitmap at a time, at the first block taken in it), which makes restore
// one-shot. It gives a folio head's order at restore (where Linux stamps
// page->private with KHO_PAGE_MAGIC and the order). The outgoing side
// tracks preserved memory in the radix tree instead (radixTree).
type memTracker struct {
	orders pgalloc.Bitmaps
	taken  pgalloc.Bitmaps
}

func newMemTracker(pages uint64) memTracker {
	var t memTracker
	for o := range t.orders {
		n := (pages>>o)/abikho.PreserveBits + 1
		t.orders[o] = make([]*bitmap, n)
		t.taken[o] = make([]*bitmap, n)
	}
	return t
}

// bitmaps returns the preserved blocks for pgalloc.MemoryFile.AdoptBitmaps:
// t's own bitmaps, which set must not change afterwards.
func (t *memTracker) bitmaps() pgalloc.Bitmaps { return t.orders }

// locate returns the bitmap index, word and bit mask of the block (pfn, order).
func locate(pfn uint64, order int) (idx uint64, word int, mask uint64) {
	hi := pfn >> order
	bit := hi % abikho.PreserveBits
	return hi / abikho.PreserveBits, int(bit / 64), 1 << (bit % 64)
}

// set marks (pfn, order) preserved (__kho_preserve_order), while Ingest
// reads the map.
//
// Preconditions:
//   - (pfn, order) lies inside the file the tracker was made for.
//   - The bitmaps have not been handed to pgalloc yet.
func (t *memTracker) set(pfn uint64, order int) {
	idx, w, m := locate(pfn, order)
	b := t.orders[order][idx]
	if b == nil {
		b = newBitmap()
		t.orders[order][idx] = b
	}
	b[w] |= m
}

// clear takes (pfn, order), a block restored or released
// (__kho_unpreserve_order), and reports whether it was preserved and not
// taken yet.
func (t *memTracker) clear(pfn uint64, order int) bool {
	if !t.test(pfn, order) {
		return false
	}
	idx, w, m := locate(pfn, order)
	b := t.taken[order][idx]
	if b == nil {
		b = newBitmap()
		t.taken[order][idx] = b
	}
	b[w] |= m
	return true
}

// clearRun is clear for the n blocks of the given order from pfn, a word
// of the bitmaps at a time: all of them, or none if one of them is not a
// preserved block of that order not taken yet.
func (t *memTracker) clearRun(pfn uint64, order int, n uint64) bool {
	first := pfn >> order
	if limit := uint64(len(t.orders[order])) * abikho.PreserveBits; n == 0 || first >= limit || n > limit-first {
		return false
	}
	for pass := 0; pass < 2; pass++ {
		// The first pass checks, the second takes.
		for b, end := first, first+n; b < end; {
			idx, w := b/abikho.PreserveBits, int(b%abikho.PreserveBits/64)
			lo := b % 64
			cnt := min(64-lo, end-b)
			mask := (^uint64(0) >> (64 - cnt)) << lo
			if pass == 0 {
				bm, tb := t.orders[order][idx], t.taken[order][idx]
				if bm == nil || bm[w]&mask != mask || tb != nil && tb[w]&mask != 0 {
					return false
				}
			} else {
				tb := t.taken[order][idx]
				if tb == nil {
					tb = newBitmap()
					t.taken[order][idx] = tb
				}
				tb[w] |= mask
			}
			b += cnt
		}
	}
	return true
}

// unclear undoes clear(pfn, order), for a restore that fails part way.
//
// Preconditions:
//   - clear(pfn, order) returned true.
func (t *memTracker) unclear(pfn uint64, order int) {
	idx, w, m := locate(pfn, order)
	t.taken[order][idx][w] &^= m
}

// test reports whether (pfn, order) is preserved and not taken.
func (t *memTracker) test(pfn uint64, order int) bool {
	idx, w, m := locate(pfn, order)
	if idx >= uint64(len(t.orders[order])) {
		return false
	}
	b := t.orders[order][idx]
	if b == nil || b[w]&m == 0 {
		return false
	}
	tb := t.taken[order][idx]
	return tb == nil || tb[w]&m == 0
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

// forEach calls fn for every preserved block not taken, order by order
// and in address order within an order.
func (t *memTracker) forEach(fn func(pfn uint64, order int)) {
	for o, bms := range t.orders {
		for idx, b := range bms {
			if b == nil {
				continue
			}
			tb := t.taken[o][idx]
			base := uint64(idx) * abikho.PreserveBits
			for w, word := range b {
				if tb != nil {
					word &^= tb[w]
				}
				for word != 0 {
					i := uint64(bits.TrailingZeros64(word))
					word &= word - 1
					fn((base+uint64(w)*64+i)<<o, o)
				}
			}
		}
	}
}

// pool holds zeroed bitmaps faulted in ahead of a restart's pause by
// PrepareIngest, for the next Ingest in this process.
var pool struct {
	mu sync.Mutex
	// +checklocks:mu
	pages []bitmap
}

// newBitmap returns a zeroed bitmap, from the pool while it lasts.
func newBitmap() *bitmap {
	return &newBitmaps(1)[0]
}

// newBitmaps returns n zeroed bitmaps, adjacent in memory (so that one
// read fills them all), from the pool if it has n left.
func newBitmaps(n int) []bitmap {
	pool.mu.Lock()
	defer pool.mu.Unlock()
	if len(pool.pages) < n {
		return make([]bitmap, n)
	}
	bs := pool.pages[:n:n]
	pool.pages = pool.pages[n:]
	return bs
}

// PrepareIngest allocates and faults in, ahead of a restart's pause, the
// memory the next Ingest in this process needs to hold the map of a
// memory file of fileSize bytes whatever it preserves (every bitmap or
// leaf the file can have, about 1 MiB for 16 GiB), and a few bitmaps for
// the blocks restored during the blackout. The first write to a fresh page
// of memory is a page fault, and in a virtual machine a costly one (tens
// of microseconds): taking them before the pause keeps Ingest's time
// inside the blackout to reading and checking the map. A map larger than
// prepared takes the rest from the heap. A new sentry calls it before it
// says it is ready; calling it again replaces the pool.
func PrepareIngest(fileSize uint64) {
	pages := fileSize >> abikho.PageShift
	n := 16
	for o := 0; o <= pgalloc.MaxOrder; o++ {
		n += int((pages>>o)/abikho.PreserveBits + 1)
	}
	slab := make([]bitmap, n)
	for i := range slab {
		slab[i][0] = 0 // fault the page in
		slab[i][bitmapWords/2] = 0
	}
	pool.mu.Lock()
	pool.pages = slab
	pool.mu.Unlock()
}
