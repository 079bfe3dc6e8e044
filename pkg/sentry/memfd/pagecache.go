package memfd

import (
	"errors"
	"fmt"
	"math/bits"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// btreeDegree is the degree of the page cache's B-tree. Runs are 24
// bytes, so a node holds up to 2*64-1 of them in about 3 KiB.
const btreeDegree = 64

// entry is one folio of the page cache: the page index of its last page
// and its PFN, order and flags packed like a memfd_luo_folio_ser word. The
// page cache stores runs of them (run); callers see folios.
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

// run is what the page cache's B-tree holds: n folios of one order and
// the same flags, at consecutive page indices and contiguous in the memory
// file (folio i at index head()+i<<order and PFN pfn+i<<order). It is keyed
// by the index of its last page, so that the first run at or after index i
// is the run holding i, if any. Folios allocated together (a write, a
// fallocate, a hole filled at mmap) and the folios a retrieve restores in
// the order they were allocated make one run: a GiB of 4 KiB folios is a
// few entries, not 262,144, and a retrieve or an mmap of it allocates next
// to nothing.
type run struct {
	last uint64
	val  uint64 // PFN of folio 0, order and flags, as in entry.
	n    uint64
}

func runLess(a, b run) bool { return a.last < b.last }

// runOf returns the run of the single folio e.
func runOf(e entry) run { return run{last: e.last, val: e.val, n: 1} }

func (r run) order() int    { return int(r.val >> orderShift & orderMask) }
func (r run) pfn() uint64   { return r.val & pfnMask }
func (r run) flags() uint64 { return r.val & (flagDirty | flagUptodate) }
func (r run) pages() uint64 { return r.n << r.order() }
func (r run) head() uint64  { return r.last + 1 - r.pages() }
func (r run) pg() pgalloc.Run {
	return pgalloc.Run{PFN: r.pfn(), Count: uint32(r.n), Order: uint8(r.order())}
}

// folio returns folio i of r.
func (r run) folio(i uint64) entry {
	o := uint64(r.order())
	return entry{last: r.head() + (i+1)<<o - 1, val: r.val + i<<o}
}

// index returns the number, in r, of the folio holding page index idx.
func (r run) index(idx uint64) uint64 { return (idx - r.head()) >> r.order() }

// slice returns folios [i, j) of r.
func (r run) slice(i, j uint64) run {
	o := uint64(r.order())
	return run{last: r.head() + j<<o - 1, val: r.val + i<<o, n: j - i}
}

// maxRunFolios is the most folios a run holds (pgalloc.Run's Count).
const maxRunFolios = 1<<32 - 1

// joins reports whether s may follow r in one run.
func (r run) joins(s run) bool {
	return r.n+s.n <= maxRunFolios && r.last+1 == s.head() && r.order() == s.order() && r.flags() == s.flags() && r.pfn()+r.pages() == s.pfn()
}

// findRunLocked returns the run holding page index idx.
//
// +checklocksread:f.mu
func (f *File) findRunLocked(idx uint64) (run, bool) {
	var found run
	ok := false
	f.cache.AscendGreaterOrEqual(run{last: idx}, func(r run) bool {
		if r.head() <= idx {
			found, ok = r, true
		}
		return false
	})
	return found, ok
}

// findLocked returns the folio holding page index idx.
//
// +checklocksread:f.mu
func (f *File) findLocked(idx uint64) (entry, bool) {
	r, ok := f.findRunLocked(idx)
	if !ok {
		return entry{}, false
	}
	return r.folio(r.index(idx)), true
}

// ascendRunsLocked calls fn, in index order, for every run that holds a
// page of [first, last], whole, until fn returns false.
//
// +checklocksread:f.mu
func (f *File) ascendRunsLocked(first, last uint64, fn func(r run) bool) {
	f.cache.AscendGreaterOrEqual(run{last: first}, func(r run) bool {
		if r.head() > last {
			return false
		}
		return fn(r)
	})
}

// ascendLocked calls fn, in index order, for every folio that holds a page
// of [first, last], until fn returns false. fn must not change the cache.
//
// +checklocksread:f.mu
func (f *File) ascendLocked(first, last uint64, fn func(e entry) bool) {
	f.ascendRunsLocked(first, last, func(r run) bool {
		i := uint64(0)
		if h := r.head(); first > h {
			i = r.index(first)
		}
		for ; i < r.n; i++ {
			e := r.folio(i)
			if e.head() > last {
				return false
			}
			if !fn(e) {
				return false
			}
		}
		return true
	})
}

// insertRunLocked adds the folios of r to the page cache, joined to the
// runs before and after it where they may be.
//
// Preconditions:
//   - No folio of the cache holds a page of r.
//
// +checklocks:f.mu
func (f *File) insertRunLocked(r run) {
	f.nrPages += r.pages()
	if h := r.head(); h > 0 {
		if p, ok := f.findRunLocked(h - 1); ok && p.joins(r) {
			f.cache.Delete(p)
			r = run{last: r.last, val: p.val, n: p.n + r.n}
		}
	}
	if r.last < maxIndex {
		if s, ok := f.findRunLocked(r.last + 1); ok && r.joins(s) {
			f.cache.Delete(s)
			r = run{last: s.last, val: r.val, n: r.n + s.n}
		}
	}
	f.cache.ReplaceOrInsert(r)
}

// insertLocked adds a folio to the page cache.
//
// Preconditions:
//   - No folio of the cache holds a page of e.
//
// +checklocks:f.mu
func (f *File) insertLocked(e entry) { f.insertRunLocked(runOf(e)) }

// insertFreshLocked inserts the fresh segs of segs (in index order),
// consecutive ones as one run.
//
// +checklocks:f.mu
func (f *File) insertFreshLocked(segs []seg) {
	var cur run
	for _, s := range segs {
		if !s.fresh {
			continue
		}
		if r := runOf(s.e); cur.n > 0 && cur.joins(r) {
			cur = run{last: r.last, val: cur.val, n: cur.n + 1}
			continue
		}
		if cur.n > 0 {
			f.insertRunLocked(cur)
		}
		cur = runOf(s.e)
	}
	if cur.n > 0 {
		f.insertRunLocked(cur)
	}
}

// cutLocked takes folio e out of the run that holds it, leaving the
// folios before and after it in the cache, and returns false if no run
// holds e.
//
// +checklocks:f.mu
func (f *File) cutLocked(e entry) bool {
	r, ok := f.findRunLocked(e.head())
	if !ok {
		return false
	}
	i := r.index(e.head())
	if r.folio(i) != e {
		return false
	}
	f.cache.Delete(r)
	if i > 0 {
		f.cache.ReplaceOrInsert(r.slice(0, i))
	}
	if i+1 < r.n {
		f.cache.ReplaceOrInsert(r.slice(i+1, r.n))
	}
	f.nrPages -= e.pages()
	return true
}

// setFlagsLocked gives the cached folio e the flags fl.
//
// +checklocks:f.mu
func (f *File) setFlagsLocked(e entry, fl uint64) {
	if e.flags() == fl {
		return
	}
	if !f.cutLocked(e) {
		panic("memfd: setting the flags of a folio the page cache does not hold")
	}
	f.insertLocked(e.withFlags(fl))
}

// setRunFlagsLocked gives the folios of pr, cached at page index first
// on, the flags fl: pr is part of one run of the cache.
//
// +checklocks:f.mu
func (f *File) setRunFlagsLocked(first uint64, pr pgalloc.Run, fl uint64) {
	r, ok := f.findRunLocked(first)
	n := uint64(pr.Count)
	if !ok || r.folio(r.index(first)).folio() != pr.Folio(0) || r.index(first)+n > r.n {
		panic(fmt.Sprintf("memfd: setting the flags of folios %+v at index %#x, which are not one run of the page cache", pr, first))
	}
	i := r.index(first)
	part := r.slice(i, i+n)
	if part.flags() == fl {
		return
	}
	f.cache.Delete(r)
	if i > 0 {
		f.cache.ReplaceOrInsert(r.slice(0, i))
	}
	if i+n < r.n {
		f.cache.ReplaceOrInsert(r.slice(i+n, r.n))
	}
	f.nrPages -= part.pages()
	part.val = part.val&^(flagDirty|flagUptodate) | fl
	f.insertRunLocked(part)
}

// removeLocked removes a folio from the page cache and drops the cache's
// reference on it.
//
// +checklocks:f.mu
func (f *File) removeLocked(e entry) {
	if !f.cutLocked(e) {
		panic("memfd: removing a folio the page cache does not hold")
	}
	f.mf.DecRef(e.folio())
}

// clearLocked removes every folio from the page cache and drops the
// cache's references.
//
// +checklocks:f.mu
func (f *File) clearLocked() {
	f.cache.Ascend(func(r run) bool {
		f.mf.DecRefRun(r.pg())
		return true
	})
	f.cache.Clear(false)
	f.nrPages = 0
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
	if !f.cutLocked(e) {
		panic("memfd: splitting a folio the page cache does not hold")
	}
	f.insertRunLocked(run{last: e.last, val: e.folio().PFN | e.flags(), n: e.pages()})
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
// such folio is free), order 0 elsewhere. The order-0 folios up to the next
// 2 MiB boundary are taken in one allocator call, next to each other
// (pgalloc.MemoryFile.AllocatePages), so that a write fills them in one
// system call, the page cache holds them as one run and a guest maps them
// with one mmap; if the memory file has no such room, a block at a time
// (the largest power of two that fits, split into pages). It stops at the
// first page it cannot allocate and returns ENOMEM with what it allocated
// so far.
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
		// Order-0 pages up to the next block that may be huge: all of
		// them next to each other if the memory file has room, else a
		// block at a time.
		stop := min(end, (idx/hugePages+1)*hugePages)
		if r, err := f.mf.AllocatePages(stop - idx); err == nil {
			for i := range uint64(r.Count) {
				out = append(out, seg{e: makeEntry(idx+i, r.Folio(i), flags), fresh: true})
			}
			idx = stop
			continue
		}
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
