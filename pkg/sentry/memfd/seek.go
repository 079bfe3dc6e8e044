package memfd

import "golang.org/x/sys/unix"

// Seek sets the file position, like lseek(2), and returns the new position:
// whence is SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA or SEEK_HOLE
// (shmem_file_llseek). A resulting position that is negative, or a sum that
// overflows, is EINVAL. SEEK_DATA and SEEK_HOLE look at the page cache page
// by page: a cached, uptodate page is data; a page without a folio, or whose
// folio fallocate allocated and nothing wrote since, is a hole; the end of
// the file is a hole. An offset that is negative or at or beyond the end of
// the file is ENXIO for both.
//
// An MFD_HUGETLB file seeks like hugetlbfs (default_llseek): all of it is
// data.
func (f *File) Seek(off int64, whence int) (int64, error) {
	if whence < unix.SEEK_SET || whence > unix.SEEK_HOLE {
		return 0, unix.EINVAL
	}
	f.posMu.Lock()
	defer f.posMu.Unlock()
	if f.hugetlb {
		return f.defaultLlseek(off, whence)
	}
	switch whence {
	case unix.SEEK_CUR:
		if off == 0 {
			return f.pos.Load(), nil
		}
		off += f.pos.Load()
	case unix.SEEK_END:
		off += f.size.Load()
	case unix.SEEK_DATA, unix.SEEK_HOLE:
		if off < 0 {
			return 0, unix.ENXIO
		}
		f.mu.RLock()
		res, err := f.seekHoleDataLocked(off, whence == unix.SEEK_DATA)
		f.mu.RUnlock()
		if err != nil {
			return 0, err
		}
		off = res
	}
	// vfs_setpos.
	if off < 0 {
		return 0, unix.EINVAL
	}
	f.pos.Store(off)
	return off, nil
}

// seekHoleDataLocked finds the first data (or hole) at or after start
// (mapping_seek_hole_data).
//
// Where Linux computes the end of a folio that ends at MaxFileSize+1 in a
// signed 64-bit offset, it overflows and SEEK_HOLE returns a negative
// offset as if it were a position; here the end of the file is returned,
// which is where the hole is (docs/memfd.md).
//
// Preconditions:
//   - start >= 0.
//
// +checklocksread:f.mu
func (f *File) seekHoleDataLocked(start int64, data bool) (int64, error) {
	size := f.size.Load()
	if start >= size {
		return 0, unix.ENXIO
	}
	s, end := uint64(start), uint64(size)
	found := false
	f.ascendLocked(s>>pageShift, (end-1)>>pageShift, func(e entry) bool {
		if pos := e.head() << pageShift; s < pos {
			if !data {
				found = true
				return false
			}
			s = pos
		}
		// folio_seek_hole_data: an uptodate folio is data, any other a
		// hole (shmem has no is_partially_uptodate).
		if e.uptodate() == data {
			found = true
			return false
		}
		s = (e.last + 1) << pageShift
		return s < end
	})
	if !found && data {
		return 0, unix.ENXIO
	}
	return int64(min(s, end)), nil
}

// defaultLlseek is default_llseek, the lseek of hugetlbfs.
//
// +checklocks:f.posMu
func (f *File) defaultLlseek(off int64, whence int) (int64, error) {
	size := f.size.Load()
	switch whence {
	case unix.SEEK_END:
		off += size
	case unix.SEEK_CUR:
		if off == 0 {
			return f.pos.Load(), nil
		}
		off += f.pos.Load()
	case unix.SEEK_DATA:
		if off >= size {
			return 0, unix.ENXIO
		}
	case unix.SEEK_HOLE:
		if off >= size {
			return 0, unix.ENXIO
		}
		off = size
	}
	if off < 0 {
		return 0, unix.EINVAL
	}
	f.pos.Store(off)
	return off, nil
}
