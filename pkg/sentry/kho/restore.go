package kho

import (
	"fmt"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// RestoreFolio returns the preserved folio whose head is at the byte address
// addr (an offset inside the head page is ignored, like PHYS_PFN), with the
// order it was preserved with. The folio holds the one reference Adopt gave
// it, which now belongs to the caller. Restore is one-shot: it fails with
// EINVAL for an address that was never preserved, is not the head of a
// preserved block, or was already restored or released. It mirrors
// kho_restore_folio.
func (k *KHO) RestoreFolio(addr uint64) (pgalloc.Folio, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.restoreFolioLocked(addr)
}

// RestoreFolios restores the folios at addrs in order, like RestoreFolio
// for each but under one lock, into out[:len(addrs)]. It stops at the first
// address that fails and returns how many were restored before it, with
// that address's error; those stay restored and are the caller's.
//
// Preconditions:
//   - len(out) >= len(addrs).
func (k *KHO) RestoreFolios(addrs []uint64, out []pgalloc.Folio) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for i, addr := range addrs {
		f, err := k.restoreFolioLocked(addr)
		if err != nil {
			return i, err
		}
		out[i] = f
	}
	return len(addrs), nil
}

// RestoreRun restores the n folios of the given order that follow each
// other from addr, as n RestoreFolio calls would, a word of KHO's bitmaps at
// a time: each must be the head of a preserved block of that order, not
// restored yet. It restores all of them, or none and fails with EINVAL;
// RestoreFolios then says which one is not.
func (k *KHO) RestoreRun(addr uint64, order int, n uint64) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	pfn := addr >> abikho.PageShift
	if k.in == nil || n == 0 || order < 0 || order > pgalloc.MaxOrder || pfn&(1<<order-1) != 0 || !k.in.mem.clearRun(pfn, order, n) {
		return fmt.Errorf("kho: restoring %d folios of order %d from %#x: not all preserved with that order and unrestored: %w", n, order, addr, unix.EINVAL)
	}
	return nil
}

// +checklocks:k.mu
func (k *KHO) restoreFolioLocked(addr uint64) (pgalloc.Folio, error) {
	if k.in == nil {
		return pgalloc.Folio{}, fmt.Errorf("kho: restoring the folio at %#x: no incoming handover: %w", addr, unix.EINVAL)
	}
	pfn := addr >> abikho.PageShift
	order, ok := k.in.mem.headOrder(pfn)
	if !ok {
		return pgalloc.Folio{}, fmt.Errorf("kho: restoring the folio at %#x: not the head of a preserved block, or already restored: %w", addr, unix.EINVAL)
	}
	k.in.mem.clear(pfn, order)
	return pgalloc.Folio{PFN: pfn, Order: order}, nil
}

// RestorePages restores the n pages that PreservePages(addr>>12, n)
// preserved: the range splits into the same naturally aligned blocks, and
// each must be a preserved, unrestored block of exactly that order. Like
// Linux (split_page), it returns the range as n order-0 folios in address
// order, each holding one reference. On failure it restores nothing. It
// mirrors kho_restore_pages. From a carried handover the blocks stop being
// preserved here: split, they could not be let go of as they were
// preserved.
func (k *KHO) RestorePages(addr, n uint64) ([]pgalloc.Folio, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.in == nil {
		return nil, fmt.Errorf("kho: restoring pages at %#x: no incoming handover: %w", addr, unix.EINVAL)
	}
	pfn := addr >> abikho.PageShift
	if err := k.checkRange(pfn, n); err != nil {
		return nil, err
	}
	var folios []pgalloc.Folio
	var bad error
	mem := &k.in.mem
	splitBlocks(pfn, n, func(p uint64, o int) bool {
		if !mem.clear(p, o) {
			bad = fmt.Errorf("kho: restoring pages [%#x, +%d): block at %#x of order %d is not preserved with that order, or already restored: %w", addr, n, p<<abikho.PageShift, o, unix.EINVAL)
			return false
		}
		folios = append(folios, pgalloc.Folio{PFN: p, Order: o})
		return true
	})
	if bad != nil {
		for _, f := range folios {
			k.in.mem.unclear(f.PFN, f.Order)
		}
		return nil, bad
	}
	pages := make([]pgalloc.Folio, 0, n)
	for i, f := range folios {
		// An adopted, unrestored folio holds exactly the one reference
		// Adopt gave it, so Split cannot fail with EBUSY unless someone
		// took a reference without restoring it: then give back what is
		// not split yet and fail.
		if err := k.mf.Split(f); err != nil {
			for _, g := range folios[i:] {
				k.in.mem.unclear(g.PFN, g.Order)
			}
			for _, p := range pages {
				k.mf.DecRef(p)
			}
			return nil, fmt.Errorf("kho: restoring pages [%#x, +%d): splitting %v: %w", addr, n, f, err)
		}
		for p := f.PFN; p < f.PFN+f.Pages(); p++ {
			pages = append(pages, pgalloc.Folio{PFN: p})
		}
	}
	if k.carried {
		for _, f := range folios {
			k.out.tree.clear(f.PFN, f.Order)
		}
	}
	return pages, nil
}

// RestoreFree restores the preserved folio at addr and frees it at once:
// for metadata blocks that have been read. Address 0 is a no-op, like NULL
// in Linux. It fails like RestoreFolio. It mirrors kho_restore_free.
func (k *KHO) RestoreFree(addr uint64) error {
	if addr == 0 {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.restoreFreeLocked(addr)
}

// +checklocks:k.mu
func (k *KHO) restoreFreeLocked(addr uint64) error {
	f, err := k.restoreFolioLocked(addr)
	if err != nil {
		return err
	}
	k.releaseLocked(f)
	return nil
}

// ReleaseRestored drops one reference on each of fs, folios restored from
// the incoming handover, after clearing their bits in the outgoing tree if
// the handover was carried (see Ingest): once its owner lets it go, a
// carried block is no longer preserved. Without a carried handover it is
// DecRef. The caller must have unpublished whatever named fs first.
func (k *KHO) ReleaseRestored(fs ...pgalloc.Folio) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, f := range fs {
		k.releaseLocked(f)
	}
}

// ReleaseRestoredRun is ReleaseRestored for each folio of r.
func (k *KHO) ReleaseRestoredRun(r pgalloc.Run) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for i := range uint64(r.Count) {
		k.releaseLocked(r.Folio(i))
	}
}

// releaseLocked is ReleaseRestored for one folio.
//
// +checklocks:k.mu
func (k *KHO) releaseLocked(f pgalloc.Folio) {
	if k.carried {
		k.out.tree.clear(f.PFN, f.Order)
	}
	k.mf.DecRef(f)
}

// ReleaseUnrestored frees every incoming preserved block that nobody
// restored (drops the reference Adopt gave it, after clearing its bit if
// the handover was carried) and returns the number of pages freed. Afterwards nothing incoming can be restored. LUO calls it
// when the incoming state is finished, so that nothing leaks; Linux has no
// counterpart because unclaimed preserved pages stay reserved until the next
// reboot.
func (k *KHO) ReleaseUnrestored() (pages uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.in == nil {
		return 0
	}
	mf, tree, carried := k.mf, &k.out.tree, k.carried
	k.in.mem.forEach(func(pfn uint64, order int) {
		// releaseLocked, for the closure.
		if carried {
			tree.clear(pfn, order)
		}
		mf.DecRef(pgalloc.Folio{PFN: pfn, Order: order})
		pages += 1 << order
	})
	k.in.mem = memTracker{}
	return pages
}
