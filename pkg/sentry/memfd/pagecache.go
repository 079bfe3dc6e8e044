package memfd

import (
	"errors"
	"math/bits"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// btreeDegree is the degree of the page cache's B-tree. Entries are 16
// bytes, so a node holds up to 2*64-1 of them in about 2 KiB.
const btreeDegree = 64

// entry is one folio of the page cache, in 16 bytes: the page index of its
// last page (the B-tree key, so that the first entry at or after index i is
// the folio holding i, if any) and its PFN, order and flags packed like a
// memfd_luo_folio_ser word.
type entry struct {
	last uint64
	val  uint64
}

const (
	pfnMask    = 1<<52 - 1
	orderShift = 52
	orderMask  = 0xf
	// flagDirty and flagUptodate are the folio flags the page cache keeps
	// (PG_dirty, PG_uptodate).
	flagDirty    = 1 << 56
	flagUptodate = 1 << 57
)

func entryLess(a, b entry) bool { return a.last < b.last }

func makeEntry(head uint64, fo pgalloc.Folio, flags uint64) entry {
	return entry{last: head + fo.Pages() - 1, val: fo.PFN | uint64(fo.Order)<<orderShift | flags}
}

func (e entry) folio() pgalloc.Folio {
	return pgalloc.Folio{PFN: e.val & pfnMask, Order: int(e.val >> orderShift & orderMask)}
}

func (e entry) pages() uint64  { return 1 << (e.val >> orderShift & orderMask) }
func (e entry) head() uint64   { return e.last + 1 - e.pages() }
func (e entry) flags() uint64  { return e.val & (flagDirty | flagUptodate) }
func (e entry) uptodate() bool { return e.val&flagUptodate != 0 }
func (e entry) dirty() bool    { return e.val&flagDirty != 0 }
func (e entry) withFlags(fl uint64) entry {
	return entry{last: e.last, val: e.val&^(flagDirty|flagUptodate) | fl}
}

// addr returns the memory-file byte offset of page index idx of the folio.
//
// Preconditions:
//   - e.head() <= idx <= e.last.
func (e entry) addr(idx uint64) uint64 {
	return (e.val&pfnMask + idx - e.head()) << pageShift
}

// findLocked returns the folio holding page index idx.
//
// +checklocksread:f.mu
func (f *File) findLocked(idx uint64) (entry, bool) {
	var found entry
	ok := false
	f.cache.AscendGreaterOrEqual(entry{last: idx}, func(e entry) bool {
		if e.head() <= idx {
			found, ok = e, true
		}
		return false
	})
	return found, ok
}

// ascendLocked calls fn, in index order, for every folio that holds a page
// of [first, last], until fn returns false.
//
// +checklocksread:f.mu
func (f *File) ascendLocked(first, last uint64, fn func(e entry) bool) {
	f.cache.AscendGreaterOrEqual(entry{last: first}, func(e entry) bool {
		if e.head() > last {
			return false
		}
		return fn(e)
	})
}

// insertLocked adds a folio to the page cache.
//
// Preconditions:
//   - No folio of the cache holds a page of e.
//
// +checklocks:f.mu
func (f *File) insertLocked(e entry) {
	f.cache.ReplaceOrInsert(e)
	f.nrPages += e.pages()
}

// removeLocked removes a folio from the page cache and drops the cache's
// reference on it.
//
// +checklocks:f.mu
func (f *File) removeLocked(e entry) {
	f.cache.Delete(e)
	f.nrPages -= e.pages()
	f.mf.DecRef(e.folio())
}

// splitLocked splits the large folio e into order-0 folios with e's flags
// (split_folio). It returns false, changing nothing, if the folio is pinned.
//
// +checklocks:f.mu
func (f *File) splitLocked(e entry) bool {
	if e.pages() == 1 {
		return true
	}
	if err := f.mf.Split(e.folio()); err != nil {
		return false
	}
	f.cache.Delete(e)
	pfn, fl := e.folio().PFN, e.flags()
	for i, h := uint64(0), e.head(); i < e.pages(); i++ {
		f.cache.ReplaceOrInsert(makeEntry(h+i, pgalloc.Folio{PFN: pfn + i}, fl))
	}
	return true
}

// splitAtLocked makes page index idx the start of a folio, by splitting the
// large folio that holds idx and idx-1, if any and if want accepts it.
//
// +checklocks:f.mu
func (f *File) splitAtLocked(idx uint64, want func(e entry) bool) {
	if idx == 0 || idx > maxIndex {
		return
	}
	if e, ok := f.findLocked(idx); ok && e.head() != idx && want(e) {
		f.splitLocked(e)
	}
}

func anyFolio(entry) bool      { return true }
func notUptodate(e entry) bool { return !e.uptodate() }

// allocHole allocates folios with the given flags for the pages
// [first, end) of a hole and appends them to out as fresh segs: order 9 for
// every aligned 2 MiB block that huge accepts (falling back to order 0 if no
// such folio is free), order 0 elsewhere. Order-0 folios are taken a block
// at a time (the largest power of two that fits, split into pages), which
// costs two allocator calls instead of one per page and keeps them
// contiguous in the memory file, so that a write fills them in one system
// call. It stops at the first page it cannot allocate and returns ENOMEM
// with what it allocated so far.
//
// allocHole touches nothing of f but the memory file, so it needs no lock
// itself (and may run in an ascendLocked callback); its callers hold f.mu
// exclusively from finding the hole until they insert the fresh segs or
// free them.
//
// Preconditions:
//   - No folio of the cache holds a page of [first, end).
func (f *File) allocHole(first, end uint64, huge func(block uint64) bool, flags uint64, out []seg) ([]seg, error) {
	for idx := first; idx < end; {
		if idx%hugePages == 0 && end-idx >= hugePages && huge(idx) {
			if fo, err := f.mf.Allocate(hugeOrder); err == nil {
				out = append(out, seg{e: makeEntry(idx, fo, flags), fresh: true})
				idx += hugePages
				continue
			}
		}
		// Order-0 pages up to the next block that may be huge.
		stop := min(end, (idx/hugePages+1)*hugePages)
		order := min(bits.Len64(stop-idx)-1, hugeOrder-1)
		var fo pgalloc.Folio
		var err error
		for ; order >= 0; order-- {
			if fo, err = f.mf.Allocate(order); err == nil {
				break
			}
		}
		if err != nil {
			if errors.Is(err, unix.ENOMEM) {
				return out, unix.ENOMEM
			}
			return out, err
		}
		if err := f.mf.Split(fo); err != nil {
			panic("memfd: splitting a folio just allocated: " + err.Error())
		}
		for i := uint64(0); i < fo.Pages(); i++ {
			out = append(out, seg{e: makeEntry(idx+i, pgalloc.Folio{PFN: fo.PFN + i}, flags), fresh: true})
		}
		idx += fo.Pages()
	}
	return out, nil
}

// freeFresh drops the fresh folios of segs.
func (f *File) freeFresh(segs []seg) {
	for _, s := range segs {
		if s.fresh {
			f.mf.DecRef(s.e.folio())
		}
	}
}

// maxScratch is the largest scratch slice a File keeps between operations.
const maxScratch = 1024

// releaseScratch keeps segs as the File's scratch slice if it is small.
//
// +checklocks:f.mu
func (f *File) releaseScratch(segs []seg) {
	if cap(segs) <= maxScratch {
		f.scratch = segs[:0]
	}
}

// zeroRange zeroes memory-file bytes [addr, addr+n).
//
// Preconditions:
//   - The bytes belong to one folio of the page cache.
func (f *File) zeroRange(addr, n uint64) {
	if n == 0 {
		return
	}
	off := addr & (pageSize - 1)
	b, err := f.mf.Slice(addr>>pageShift, (off+n+pageSize-1)>>pageShift)
	if err != nil {
		panic("memfd: page cache folio outside the memory file: " + err.Error())
	}
	clear(b[off : off+n])
}

// zeroFileRangeLocked zeroes the file bytes [start, end) where cached folios hold
// them.
//
// +checklocks:f.mu
func (f *File) zeroFileRangeLocked(start, end uint64) {
	if start >= end {
		return
	}
	f.ascendLocked(start>>pageShift, (end-1)>>pageShift, func(e entry) bool {
		s := max(start, e.head()<<pageShift)
		t := min(end, (e.last+1)<<pageShift)
		f.zeroRange(e.addr(s>>pageShift)+s&(pageSize-1), t-s)
		return true
	})
}
