package kho

import (
	"fmt"
	"math/bits"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// checkMutableLocked fails with EBUSY once the map has been finalized: the
// serialized map would no longer describe the tracker. Abort makes the map
// mutable again.
//
// +checklocks:k.mu
func (k *KHO) checkMutableLocked() error {
	if k.out.finalized {
		return fmt.Errorf("kho: the preserved-memory map is finalized (abort first): %w", unix.EBUSY)
	}
	return nil
}

// PreserveFolio marks the folio f to be handed over to the next sentry with
// its order. It takes no reference: the caller keeps f allocated until the
// restart. Preserving an already preserved folio again is a no-op. It fails
// with EINVAL for a folio outside the file, misaligned, at PFN 0 or of an
// order outside [0, pgalloc.MaxOrder], with ENOMEM if a page of the radix
// tree cannot be allocated, and with EBUSY after Finalize. It mirrors
// kho_preserve_folio.
func (k *KHO) PreserveFolio(f pgalloc.Folio) error {
	if err := k.checkBlock(f.PFN, f.Order); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return err
	}
	return k.setLocked(f.PFN, f.Order)
}

// UnpreserveFolio undoes PreserveFolio(f). f must match a preserved block
// exactly, PFN and order: a part of a preserved block cannot be unpreserved.
// It fails with ENOENT if f is not preserved as such and with EBUSY after
// Finalize. It mirrors kho_unpreserve_folio.
func (k *KHO) UnpreserveFolio(f pgalloc.Folio) error {
	if err := k.checkBlock(f.PFN, f.Order); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return err
	}
	if !k.out.tree.clear(f.PFN, f.Order) {
		return fmt.Errorf("kho: unpreserving %v: not preserved with this pfn and order: %w", f, unix.ENOENT)
	}
	return nil
}

// splitBlocks calls fn for each maximal naturally aligned power-of-two block
// of [pfn, pfn+n), in address order, until fn returns false. Linux splits
// without an upper bound; blocks here stop at pgalloc.MaxOrder because
// larger ones could not be adopted (nor restored: kho_restore_page rejects
// orders above MAX_PAGE_ORDER).
func splitBlocks(pfn, n uint64, fn func(pfn uint64, order int) bool) {
	end := pfn + n
	for pfn < end {
		order := min(bits.TrailingZeros64(pfn), bits.Len64(end-pfn)-1, pgalloc.MaxOrder)
		if !fn(pfn, order) {
			return
		}
		pfn += 1 << order
	}
}

// checkRange checks that [pfn, pfn+n) is a non-empty range of the file that
// does not include PFN 0.
func (k *KHO) checkRange(pfn, n uint64) error {
	if n == 0 || pfn == 0 || pfn >= k.mf.Pages() || n > k.mf.Pages()-pfn {
		return fmt.Errorf("kho: pages [%#x, +%d): not a non-empty range inside the %d-page memory file (pfn 0 excluded): %w", pfn, n, k.mf.Pages(), unix.EINVAL)
	}
	return nil
}

// PreservePages marks the n pages from pfn to be handed over, as maximal
// naturally aligned power-of-two blocks, and rolls back the blocks it marked
// if it fails. It fails with EINVAL for an empty range or one outside the
// file or including PFN 0, with ENOMEM if a page of the radix tree cannot
// be allocated, and with EBUSY after Finalize. It mirrors
// kho_preserve_pages.
func (k *KHO) PreservePages(pfn, n uint64) error {
	if err := k.checkRange(pfn, n); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return err
	}
	// A block fails only when a tree node cannot be allocated; then the
	// blocks marked before it are unmarked (__kho_unpreserve up to
	// failed_pfn).
	t, err := k.treeLocked()
	if err != nil {
		return fmt.Errorf("kho: preserving pages [%#x, +%d): %w", pfn, n, err)
	}
	failed := pfn + n
	splitBlocks(pfn, n, func(p uint64, o int) bool {
		if err = t.set(p, o); err != nil {
			failed = p
			return false
		}
		return true
	})
	if err != nil {
		splitBlocks(pfn, failed-pfn, func(p uint64, o int) bool {
			t.clear(p, o)
			return true
		})
		return fmt.Errorf("kho: preserving pages [%#x, +%d): %w", pfn, n, err)
	}
	return nil
}

// UnpreservePages undoes PreservePages(pfn, n); the range must be the same,
// so that it splits into the same blocks. It fails with ENOENT, changing
// nothing, if one of the blocks is not preserved, and with EBUSY after
// Finalize. It mirrors kho_unpreserve_pages.
func (k *KHO) UnpreservePages(pfn, n uint64) error {
	if err := k.checkRange(pfn, n); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return err
	}
	var missing error
	t := &k.out.tree
	splitBlocks(pfn, n, func(p uint64, o int) bool {
		if !t.test(p, o) {
			missing = fmt.Errorf("kho: unpreserving pages [%#x, +%d): block at pfn %#x of order %d is not preserved: %w", pfn, n, p, o, unix.ENOENT)
			return false
		}
		return true
	})
	if missing != nil {
		return missing
	}
	splitBlocks(pfn, n, func(p uint64, o int) bool {
		t.clear(p, o)
		return true
	})
	return nil
}

// getOrder returns the order of the smallest power-of-two number of pages
// that holds size bytes (get_order).
//
// Preconditions: size > 0.
func getOrder(size uint64) int {
	return bits.Len64((size - 1) >> abikho.PageShift)
}

// AllocPreserve allocates a zeroed folio of at least size bytes (2^order
// pages, order = get_order(size)) and preserves it. It fails with EINVAL for
// size 0, E2BIG if the order is above pgalloc.MaxOrder, ENOMEM when the file
// is full and EBUSY after Finalize. It mirrors kho_alloc_preserve.
func (k *KHO) AllocPreserve(size uint64) (pgalloc.Folio, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.allocPreserveLocked(size)
}

// +checklocks:k.mu
func (k *KHO) allocPreserveLocked(size uint64) (pgalloc.Folio, error) {
	if size == 0 {
		return pgalloc.Folio{}, fmt.Errorf("kho: allocating a preserved block of 0 bytes: %w", unix.EINVAL)
	}
	order := getOrder(size)
	if order > pgalloc.MaxOrder {
		return pgalloc.Folio{}, fmt.Errorf("kho: allocating a preserved block of %d bytes: order %d above %d: %w", size, order, pgalloc.MaxOrder, unix.E2BIG)
	}
	if err := k.checkMutableLocked(); err != nil {
		return pgalloc.Folio{}, err
	}
	f, err := k.mf.Allocate(order)
	if err != nil {
		return pgalloc.Folio{}, fmt.Errorf("kho: allocating a preserved block of %d bytes: %w", size, err)
	}
	if err := k.setLocked(f.PFN, f.Order); err != nil {
		k.mf.DecRef(f)
		return pgalloc.Folio{}, fmt.Errorf("kho: preserving a block of %d bytes: %w", size, err)
	}
	return f, nil
}

// UnpreserveFree unpreserves the folio f that AllocPreserve returned and
// frees it (drops the reference AllocPreserve gave). The zero Folio is a
// no-op, like NULL in Linux. It fails like UnpreserveFolio and then frees
// nothing. It mirrors kho_unpreserve_free.
func (k *KHO) UnpreserveFree(f pgalloc.Folio) error {
	if f == (pgalloc.Folio{}) {
		return nil
	}
	if err := k.checkBlock(f.PFN, f.Order); err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return err
	}
	if got, _, ok := k.mf.Lookup(f.PFN); !ok || got != f {
		return fmt.Errorf("kho: unpreserving and freeing %v: not an allocated folio: %w", f, unix.EINVAL)
	}
	if !k.out.tree.clear(f.PFN, f.Order) {
		return fmt.Errorf("kho: unpreserving %v: not preserved with this pfn and order: %w", f, unix.ENOENT)
	}
	k.mf.DecRef(f)
	return nil
}

// unpreserveFreeLocked is UnpreserveFree for a folio k preserved itself.
//
// Preconditions: f is preserved and allocated.
//
// +checklocks:k.mu
func (k *KHO) unpreserveFreeLocked(f pgalloc.Folio) {
	k.out.tree.clear(f.PFN, f.Order)
	k.mf.DecRef(f)
}
