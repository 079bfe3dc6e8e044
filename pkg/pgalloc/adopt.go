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
		prev, prevEnd = b, b.PFN+b.Pages()
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	if f.adopted {
		return fmt.Errorf("adopting a memory file whose allocator is already running: %w", unix.EBUSY)
	}
	stale := make([]pfnRange, 0, len(blocks)+1)
	next := uint64(1)
	var sec *section
	secIdx := -1
	for _, b := range blocks {
		if b.PFN > next {
			stale = append(stale, pfnRange{start: next, end: b.PFN})
		}
		if i := int(b.PFN >> sectionShift); i != secIdx {
			sec = f.sections[i]
			if sec == nil {
				sec = new(section)
				f.sections[i] = sec
			}
			secIdx = i
		}
		sec[b.PFN&(sectionPages-1)] = pageInfo{refs: 1, order: uint8(b.Order), head: true}
		f.folios[b.Order]++
		next = b.PFN + b.Pages()
	}
	if next < f.pages {
		stale = append(stale, pfnRange{start: next, end: f.pages})
	}
	f.stale = stale
	f.stalePages = f.pages - 1
	for o, n := range f.folios {
		f.stalePages -= n << o
	}
	f.adopted = true
	if len(stale) > 0 {
		f.wakeReleaser()
	}
	return nil
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
