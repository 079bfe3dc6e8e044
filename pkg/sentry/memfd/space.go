package memfd

import (
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// Truncate sets the file size, like ftruncate(2) (shmem_setattr). Shrinking
// frees the folios beyond the new end and zeroes the rest of the last page;
// growing allocates nothing. Truncating to the current size also frees
// folios that fallocate(FALLOC_FL_KEEP_SIZE) placed beyond the end, as on
// Linux. A negative size is EINVAL; shrinking with F_SEAL_SHRINK, growing
// with F_SEAL_GROW and any change of size while frozen are EPERM. The size
// of an MFD_HUGETLB file must be a multiple of its huge page size (EINVAL).
func (f *File) Truncate(size int64) error {
	if size < 0 {
		return unix.EINVAL
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	old := f.size.Load()
	if f.hugetlb && size&(1<<f.hpageShift-1) != 0 {
		return unix.EINVAL
	}
	if size < old && f.seals&unix.F_SEAL_SHRINK != 0 || size > old && f.seals&unix.F_SEAL_GROW != 0 {
		return unix.EPERM
	}
	if size != old && f.frozen.Load() {
		return unix.EPERM
	}
	f.size.Store(size)
	if size <= old && !f.hugetlb {
		f.truncateRangeLocked(uint64(size), MaxFileSize+1)
	}
	return nil
}

// truncateRangeLocked removes the bytes [start, end) from the page cache
// (shmem_truncate_range / shmem_undo_range): the pages it covers entirely
// are freed, the parts of pages at either end are zeroed. A large folio
// that the range covers in part is split first; if it is pinned, the part
// is zeroed and the folio stays, as Linux does when a split fails.
//
// Preconditions:
//   - start < end <= MaxFileSize+1.
//
// +checklocks:f.mu
func (f *File) truncateRangeLocked(start, end uint64) {
	first := (start + pageSize - 1) >> pageShift // first page to free
	stop := end >> pageShift                     // page after the last to free
	f.zeroFileRangeLocked(start, min(end, first<<pageShift))
	if stop < first {
		return
	}
	f.zeroFileRangeLocked(max(start, stop<<pageShift), end)
	if first == stop {
		return
	}
	if first == 0 && stop > maxIndex {
		f.clearLocked()
		return
	}
	f.splitAtLocked(first, anyFolio)
	f.splitAtLocked(stop, anyFolio)
	segs := f.scratch[:0]
	f.ascendLocked(first, stop-1, func(e entry) bool {
		segs = append(segs, seg{e: e})
		return true
	})
	for _, s := range segs {
		if s.e.head() >= first && s.e.last < stop {
			f.removeLocked(s.e)
			continue
		}
		// A pinned large folio: zero the part in the range.
		zs := max(first, s.e.head())
		ze := min(stop, s.e.last+1)
		f.zeroRange(s.e.addr(zs), (ze-zs)<<pageShift)
	}
	f.releaseScratch(segs)
}

// Fallocate allocates or punches out file space, like fallocate(2)
// (vfs_fallocate, shmem_fallocate). Mode 0 allocates the pages of [off,
// off+length) and grows the file to cover them; FALLOC_FL_KEEP_SIZE
// allocates without growing it; FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE
// frees the pages the range covers and zeroes the parts of pages at its
// ends. Allocated pages read as zeros and are holes for SEEK_DATA until
// written; pages already cached stay as they are, except that those
// fallocate had allocated become initialised (data for SEEK_DATA), as in
// shmem.
//
// Errors, in Linux's order: a negative offset or a length that is not
// positive is EINVAL; other modes (ZERO_RANGE, COLLAPSE_RANGE, ...) and
// PUNCH_HOLE without KEEP_SIZE are EOPNOTSUPP; a range that overflows is
// EFBIG; any mode while frozen is EPERM; punching with F_SEAL_WRITE or
// F_SEAL_FUTURE_WRITE, or allocating past the end with F_SEAL_GROW, is
// EPERM; a full memory file is ENOMEM, and the pages this call allocated are
// freed again. An MFD_HUGETLB file has no huge page pool here: allocating
// is ENOSPC, as on a host with no huge pages reserved.
func (f *File) Fallocate(mode uint32, off, length int64) error {
	if err := vfs.FallocateArgs(mode, off, length); err != nil {
		return err
	}
	if off+length < 0 {
		return unix.EFBIG
	}
	// shmem_fallocate and hugetlbfs_fallocate.
	if mode&^(unix.FALLOC_FL_KEEP_SIZE|unix.FALLOC_FL_PUNCH_HOLE) != 0 {
		return unix.EOPNOTSUPP
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.frozen.Load() {
		return unix.EPERM
	}
	end := off + length
	if mode&unix.FALLOC_FL_PUNCH_HOLE != 0 {
		if f.seals&(unix.F_SEAL_WRITE|unix.F_SEAL_FUTURE_WRITE) != 0 {
			return unix.EPERM
		}
		if !f.hugetlb {
			f.truncateRangeLocked(uint64(off), uint64(end))
		}
		return nil
	}
	if f.seals&unix.F_SEAL_GROW != 0 && end > f.size.Load() {
		return unix.EPERM
	}
	if f.hugetlb {
		return unix.ENOSPC
	}
	if err := f.allocateLocked(uint64(off)>>pageShift, (uint64(end)+pageSize-1)>>pageShift); err != nil {
		return err
	}
	if mode&unix.FALLOC_FL_KEEP_SIZE == 0 && end > f.size.Load() {
		f.size.Store(end)
	}
	return nil
}

// allocateLocked makes every page of [first, stop) cached: the loop of
// shmem_fallocate with SGP_FALLOC. New folios are dirty and not uptodate;
// cached folios that were not uptodate are zeroed and become uptodate;
// every folio of the range becomes dirty. On ENOMEM the new folios are
// freed.
//
// Preconditions:
//   - first < stop.
//
// +checklocks:f.mu
func (f *File) allocateLocked(first, stop uint64) error {
	// A folio that is not uptodate and that the range covers in part would
	// become uptodate in part.
	f.splitAtLocked(first, notUptodate)
	f.splitAtLocked(stop, notUptodate)
	huge := func(uint64) bool { return true }
	segs := f.scratch[:0]
	var allocErr error
	idx := first
	f.ascendLocked(first, stop-1, func(e entry) bool {
		if h := e.head(); idx < h {
			if segs, allocErr = f.allocHole(idx, h, huge, flagDirty, segs); allocErr != nil {
				return false
			}
		}
		segs = append(segs, seg{e: e})
		idx = e.last + 1
		return true
	})
	if allocErr == nil && idx < stop {
		segs, allocErr = f.allocHole(idx, stop, huge, flagDirty, segs)
	}
	for _, s := range segs {
		if s.fresh {
			continue
		}
		if !s.e.uptodate() {
			f.zeroRange(s.e.addr(s.e.head()), s.e.pages()<<pageShift)
		}
		if fl := s.e.flags() | flagDirty | flagUptodate; fl != s.e.flags() {
			f.setFlagsLocked(s.e, fl)
		}
	}
	if allocErr != nil {
		f.freeFresh(segs)
		f.releaseScratch(segs)
		return allocErr
	}
	f.insertFreshLocked(segs)
	f.releaseScratch(segs)
	return nil
}
