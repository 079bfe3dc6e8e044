package guest

import (
	"unsafe"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// Mmap is mmap(NULL, length, prot, flags, fd, off) of a sentry file: the
// returned slice is the file's pages mapped straight from the memory file,
// the same pages read and write use, so each sees the other's writes at
// once. MAP_SHARED, MAP_SHARED_VALIDATE and MAP_PRIVATE (copy-on-write in
// this process) are supported, with PROT_* prot; MAP_FIXED needs an
// address (MmapAt). Errors are the errnos Linux gives (EINVAL, EACCES,
// EPERM for a shared writable mapping of a write-sealed memfd, ENODEV for
// a file that cannot be mapped, ENOMEM, EOVERFLOW, EOPNOTSUPP).
//
// Pages of the mapping at or beyond the end of the file are reserved but
// not mapped: touching them faults with SIGSEGV (Linux: SIGBUS). The
// mapped folios stay pinned in the sentry until Munmap, or until this
// process exits or disconnects.
//
// The memory file crosses to this process for the duration of the call
// only. A guest that keeps a copy of it could map any page of it: guests
// are not isolated from each other.
func (c *Conn) Mmap(fd int, off int64, length int, prot, flags int) ([]byte, error) {
	return c.MmapAt(nil, fd, off, length, prot, flags)
}

// MmapAt is Mmap at addr: a hint, or with MAP_FIXED the exact address.
func (c *Conn) MmapAt(addr unsafe.Pointer, fd int, off int64, length int, prot, flags int) ([]byte, error) {
	if flags&unix.MAP_ANONYMOUS != 0 || length < 0 || off < 0 {
		return nil, unix.EINVAL
	}
	mem, runs, id, mflags, err := c.mmapCall(fd, uint64(off), uint64(length), prot, flags)
	if err != nil {
		return nil, err
	}
	defer mem.Close()
	size := uintptr((uint64(length) + pageSize - 1) &^ (pageSize - 1))
	// Reserve the whole range, then map each run of the memory file over
	// it.
	reserve := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS | unix.MAP_NORESERVE
	if flags&unix.MAP_FIXED != 0 {
		reserve |= unix.MAP_FIXED
	}
	base, err := unix.MmapPtr(-1, 0, addr, size, unix.PROT_NONE, reserve)
	if err != nil {
		c.munmapCall(id, 0, uint64(size)/pageSize)
		return nil, err
	}
	kind := unix.MAP_SHARED
	if flags&unix.MAP_TYPE == unix.MAP_PRIVATE {
		kind = unix.MAP_PRIVATE
	}
	kind |= unix.MAP_FIXED | flags&(unix.MAP_POPULATE|unix.MAP_NORESERVE|unix.MAP_LOCKED)
	for _, r := range runs {
		if _, err := unix.MmapPtr(int(mem.Fd()), int64(r.FileOffset), unsafe.Add(base, r.MapOffset), uintptr(r.Length), prot, kind); err != nil {
			unix.MunmapPtr(base, size)
			c.munmapCall(id, 0, uint64(size)/pageSize)
			return nil, err
		}
	}
	c.maps.add(mapping{addr: uintptr(base), length: size, id: id, mayWrite: mflags&abiguest.MmapMayWrite != 0})
	return unsafe.Slice((*byte)(base), length), nil
}

// Munmap is munmap(2) of b, or of part of a mapping Mmap returned: the
// pages are unmapped here and unpinned in the sentry.
func (c *Conn) Munmap(b []byte) error {
	if len(b) == 0 {
		return unix.EINVAL
	}
	p := unsafe.Pointer(unsafe.SliceData(b))
	addr, length := uintptr(p), uintptr(len(b))
	if addr%pageSize != 0 {
		return unix.EINVAL
	}
	length = (length + pageSize - 1) &^ (pageSize - 1)
	if err := unix.MunmapPtr(p, length); err != nil {
		return err
	}
	return c.unpin(addr, length)
}

// addrOf returns the address of b's first byte.
func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
