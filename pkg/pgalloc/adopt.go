package pgalloc

import (
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
)

// Adopt builds the allocator of a memory file opened with Open from the
// blocks the previous sentry preserved: each becomes an allocated folio of
// its order with one reference, and every other page becomes stale, to be
// scrubbed before it is handed out (lazily, or by the background releaser).
//
// Adopt runs in time proportional to len(preserved) (plus a sort if the
// blocks are not in address order), not to the size of the file. It
// validates every block first and changes nothing if one is out of range,
// misaligned, of an order above MaxOrder, covers PFN 0, or overlaps
// another; the error names the block.
func (f *MemoryFile) Adopt(preserved []Block) error {
	blocks := preserved
	if !slices.IsSortedFunc(blocks, cmpBlocks) {
		blocks = slices.Clone(blocks)
		slices.SortFunc(blocks, cmpBlocks)
	}
	var prev Block
	var prevEnd uint64
	n := 0
	for i, b := range blocks {
		if b.Order < 0 || b.Order > MaxOrder {
			return fmt.Errorf("adopting preserved block %v: order above %d: %w", b, MaxOrder, unix.EINVAL)
		}
		if b.PFN&(b.Pages()-1) != 0 {
			return fmt.Errorf("adopting preserved block %v: not aligned to its order: %w", b, unix.EINVAL)
		}
		if b.PFN == 0 {
			return fmt.Errorf("adopting preserved block %v: PFN 0 is reserved: %w", b, unix.EINVAL)
		}
		if b.PFN >= f.pages || b.Pages() > f.pages-b.PFN {
			return fmt.Errorf("adopting preserved block %v: outside the %d-page memory file: %w", b, f.pages, unix.ERANGE)
		}
		if i > 0 && b.PFN < prevEnd {
			return fmt.Errorf("adopting preserved block %v: overlaps preserved block %v: %w", b, prev, unix.EINVAL)
		}
		if i == 0 || !extendsRun(prev, b) {
			n++ // runs to build
		}
		prev, prevEnd = b, b.PFN+b.Pages()
	}

	runs := make([]Run, 0, n)
	for _, b := range blocks {
		if n := len(runs); n > 0 {
			r := &runs[n-1]
			if int(r.Order) == b.Order && r.End() == b.PFN && r.Count < maxRunCount {
				r.Count++
				continue
			}
		}
		runs = append(runs, Run{PFN: b.PFN, Count: 1, Order: uint8(b.Order)})
	}
	return f.adoptRuns(runs)
}

// extendsRun reports whether b directly follows prev with the same order.
func extendsRun(prev, b Block) bool {
	return prev.Order == b.Order && prev.PFN+prev.Pages() == b.PFN
}

// Run is Count consecutive naturally aligned blocks of 2^Order pages from
// PFN: the compact form of a preserved set that AdoptRuns takes.
type Run struct {
	PFN   uint64
	Count uint32
	Order uint8
}

// Pages returns the number of pages in r.
func (r Run) Pages() uint64 { return uint64(r.Count) << r.Order }

// Folio returns block i of r, as a folio. A memfd's page cache and its
// mappings keep runs of folios allocated together rather than folios, so
// that a GiB of 4 KiB folios is a few entries rather than 262,144.
//
// Preconditions:
//   - i < r.Count.
func (r Run) Folio(i uint64) Folio { return Folio{PFN: r.PFN + i<<r.Order, Order: int(r.Order)} }

// maxRunCount is the largest Count of a Run.
const maxRunCount = 1<<32 - 1

// End returns the PFN just past r.
func (r Run) End() uint64 { return r.PFN + uint64(r.Count)<<r.Order }

// AdoptRuns is Adopt for a preserved set given as runs of equal-order
// blocks: it costs time in proportion to len(runs), so that a large
// contiguous preserved area is adopted in constant time. The runs must be
// sorted by PFN; AdoptRuns checks every run like Adopt checks every block
// (plus a zero Count) and changes nothing if one is bad. It takes ownership
// of runs: the caller must not modify the slice afterwards.
func (f *MemoryFile) AdoptRuns(runs []Run) error {
	var prevEnd uint64
	for i, r := range runs {
		if r.Order > MaxOrder || r.Count == 0 {
			return fmt.Errorf("adopting preserved run %+v: order above %d or no block: %w", r, MaxOrder, unix.EINVAL)
		}
		if r.PFN&(1<<r.Order-1) != 0 {
			return fmt.Errorf("adopting preserved run %+v: not aligned to its order: %w", r, unix.EINVAL)
		}
		if r.PFN == 0 {
			return fmt.Errorf("adopting preserved run %+v: PFN 0 is reserved: %w", r, unix.EINVAL)
		}
		if r.PFN >= f.pages || uint64(r.Count)<<r.Order > f.pages-r.PFN {
			return fmt.Errorf("adopting preserved run %+v: outside the %d-page memory file: %w", r, f.pages, unix.ERANGE)
		}
		if i > 0 && r.PFN < prevEnd {
			return fmt.Errorf("adopting preserved run %+v: overlaps or precedes the previous run, or runs are not sorted: %w", r, unix.EINVAL)
		}
		prevEnd = r.End()
	}
	return f.adoptRuns(runs)
}

// adoptRuns adopts checked, sorted, disjoint runs.
func (f *MemoryFile) adoptRuns(runs []Run) error {
	var folios [MaxOrder + 1]uint64
	sections := make([]bool, f.numSections())
	for _, r := range runs {
		folios[r.Order] += uint64(r.Count)
		for sec := r.PFN >> sectionShift; sec <= (r.End()-1)>>sectionShift; sec++ {
			sections[sec] = true
		}
	}
	return f.adoptSet(runSet(runs), folios, sections)
}

// adoptedSet is the preserved set a file was adopted with, in the form it
// was given (runs or bitmaps). The allocator keeps it, unchanged, to derive
// what Adopt does not build inside a restart's blackout: the page metadata
// of a section when the section is first needed, and the stale ranges when
// the first allocation or releaser round needs them.
type adoptedSet interface {
	// fill calls set with the head pfn and metadata of every block whose
	// head is in [start, end), part of one section.
	fill(start, end uint64, set func(pfn uint64, pi pageInfo))
	// gaps returns the ranges of [1, pages) that no block covers, in
	// address order.
	gaps(pages uint64) []pfnRange
}

// adoptSet makes a checked preserved set the file's allocator state:
// folios[o] blocks of order o, sections[i] set for every section that holds
// a block. Page metadata and stale ranges are derived from set later
// (pageInfoLocked, buildStaleLocked), outside the restart's blackout.
func (f *MemoryFile) adoptSet(set adoptedSet, folios [MaxOrder + 1]uint64, sections []bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.adopted {
		return fmt.Errorf("adopting a memory file whose allocator is already running: %w", unix.EBUSY)
	}
	f.set, f.setSections = set, sections
	f.folios = folios
	f.stalePages = f.pages - 1
	for o, n := range f.folios {
		f.stalePages -= n << o
	}
	f.staleUnbuilt = f.stalePages > 0
	f.adopted = true
	if f.stalePages > 0 {
		f.wakeReleaser()
	}
	return nil
}

// runSet is a preserved set given as sorted, disjoint runs.
type runSet []Run

// fill implements adoptedSet.fill.
func (rs runSet) fill(start, end uint64, set func(pfn uint64, pi pageInfo)) {
	j, _ := slices.BinarySearchFunc(rs, start, func(r Run, pfn uint64) int {
		if r.End() <= pfn {
			return -1
		}
		return 1
	})
	for ; j < len(rs) && rs[j].PFN < end; j++ {
		r := rs[j]
		n := uint64(1) << r.Order
		// The first head of r at or after start (start is aligned to a
		// chunk, not to every order).
		first := r.PFN
		if start > first {
			first += (start - first + n - 1) &^ (n - 1)
		}
		for pfn := first; pfn < min(r.End(), end); pfn += n {
			set(pfn, pageInfo{refs: 1, order: r.Order, head: true})
		}
	}
}

// gaps implements adoptedSet.gaps.
func (rs runSet) gaps(pages uint64) []pfnRange {
	stale := make([]pfnRange, 0, len(rs)+1)
	next := uint64(1)
	for _, r := range rs {
		if r.PFN > next {
			stale = append(stale, pfnRange{start: next, end: r.PFN})
		}
		next = r.End()
	}
	if next < pages {
		stale = append(stale, pfnRange{start: next, end: pages})
	}
	return stale
}

func cmpBlocks(a, b Block) int {
	switch {
	case a.PFN < b.PFN:
		return -1
	case a.PFN > b.PFN:
		return 1
	}
	return 0
}
