package pgalloc

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Split splits the folio fo into 2^fo.Order folios of order 0, each holding
// one reference, like Linux's split_folio. The pages and their contents do
// not move. A page cache uses it when an operation (a hole punched or a
// truncation inside a large folio) needs page granularity.
//
// Split fails with EBUSY, changing nothing, if fo holds more than the
// caller's one reference: like split_folio on a folio with extra pins, the
// other holders expect the folio to stay whole.
//
// Preconditions:
//   - fo is allocated and the caller holds a reference.
func (f *MemoryFile) Split(fo Folio) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	pi := f.headLocked(fo, "Split")
	if pi.refs != 1 {
		return fmt.Errorf("splitting %v with %d references: %w", fo, pi.refs, unix.EBUSY)
	}
	if fo.Order == 0 {
		return nil
	}
	for pfn := fo.PFN; pfn < fo.PFN+fo.Pages(); pfn++ {
		*f.pageInfoLocked(pfn, true) = pageInfo{refs: 1, order: 0, head: true}
	}
	f.folios[fo.Order]--
	f.folios[0] += fo.Pages()
	return nil
}
