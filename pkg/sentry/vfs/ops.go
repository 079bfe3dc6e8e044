package vfs

import (
	"encoding/binary"
	"io"

	"golang.org/x/sys/unix"
)

// OLargefile is O_LARGEFILE as x86-64 Linux reports it in F_GETFL
// (0100000): open(2) adds it on 64-bit kernels. Go's unix.O_LARGEFILE is 0
// on amd64.
const OLargefile = 0x8000

// The generic ioctls of do_vfs_ioctl, as x86-64 numbers them. FIOCLEX and
// FIONCLEX change the fd, so the fd table answers them; Ioctl runs the
// others.
const (
	FIONCLEX = 0x5450
	FIOCLEX  = 0x5451
	FIONBIO  = 0x5421
	FIOASYNC = 0x5452
	FIONREAD = 0x541B
	FIOQSIZE = 0x5460
)

// fallocModeMask is FALLOC_FL_MODE_MASK: the modes vfs_fallocate knows.
const fallocModeMask = unix.FALLOC_FL_ALLOCATE_RANGE | unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_COLLAPSE_RANGE |
	unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_INSERT_RANGE | unix.FALLOC_FL_UNSHARE_RANGE | unix.FALLOC_FL_WRITE_ZEROES

// canAccess reports whether an fd with status flags flags is open for want
// (O_RDONLY or O_WRONLY): FMODE_READ or FMODE_WRITE.
func canAccess(flags, want int) bool {
	acc := flags & unix.O_ACCMODE
	return acc == unix.O_RDWR || acc == want
}

// Read is read(2) on an fd of f with status flags flags (vfs_read): EBADF
// if the fd is not open for reading, else f's ReadTo.
func Read(f FileDescription, flags int, dst io.Writer, count int64) (int64, error) {
	if !canAccess(flags, unix.O_RDONLY) {
		return 0, unix.EBADF
	}
	return f.ReadTo(dst, count)
}

// PRead is pread64(2) at offset off >= 0 (ksys_pread64): ESPIPE if f has
// no FModePRead, then as Read.
func PRead(f FileDescription, flags int, dst io.Writer, count, off int64) (int64, error) {
	if f.FMode()&FModePRead == 0 {
		return 0, unix.ESPIPE
	}
	if !canAccess(flags, unix.O_RDONLY) {
		return 0, unix.EBADF
	}
	return f.PReadTo(dst, count, off)
}

// Write is write(2) on an fd of f with status flags flags (vfs_write):
// EBADF if the fd is not open for writing, else f's WriteFrom.
func Write(f FileDescription, flags int, src io.Reader, count int64) (int64, error) {
	if !canAccess(flags, unix.O_WRONLY) {
		return 0, unix.EBADF
	}
	return f.WriteFrom(src, count)
}

// PWrite is pwrite64(2) at offset off >= 0 (ksys_pwrite64): ESPIPE if f
// has no FModePWrite, then as Write.
func PWrite(f FileDescription, flags int, src io.Reader, count, off int64) (int64, error) {
	if f.FMode()&FModePWrite == 0 {
		return 0, unix.ESPIPE
	}
	if !canAccess(flags, unix.O_WRONLY) {
		return 0, unix.EBADF
	}
	return f.PWriteFrom(src, count, off)
}

// Seek is lseek(2) (ksys_lseek): a whence above SEEK_MAX is EINVAL
// whatever the file, else f's Seek.
func Seek(f FileDescription, off int64, whence uint32) (int64, error) {
	if whence > unix.SEEK_MAX {
		return 0, unix.EINVAL
	}
	return f.Seek(off, int(whence))
}

// Truncate is ftruncate(2) with a length >= 0 (do_ftruncate): EINVAL if
// the fd is not open for writing, else f's Truncate.
func Truncate(f FileDescription, flags int, length int64) error {
	if !canAccess(flags, unix.O_WRONLY) {
		return unix.EINVAL
	}
	return f.Truncate(length)
}

// Fallocate is fallocate(2) (vfs_fallocate): the argument checks of
// FallocateArgs, EBADF if the fd is not open for writing, then f's
// Fallocate.
func Fallocate(f FileDescription, flags int, mode uint32, off, length int64) error {
	if err := FallocateArgs(mode, off, length); err != nil {
		return err
	}
	if !canAccess(flags, unix.O_WRONLY) {
		return unix.EBADF
	}
	return f.Fallocate(mode, off, length)
}

// FallocateArgs makes vfs_fallocate's checks of its arguments, which come
// before any file-specific ones: EINVAL for a negative offset or a length
// that is not positive, EOPNOTSUPP for an unknown mode bit or a mode that
// does not combine with KEEP_SIZE as it must.
func FallocateArgs(mode uint32, off, length int64) error {
	if off < 0 || length <= 0 {
		return unix.EINVAL
	}
	if mode&^(fallocModeMask|unix.FALLOC_FL_KEEP_SIZE) != 0 {
		return unix.EOPNOTSUPP
	}
	switch mode & fallocModeMask {
	case unix.FALLOC_FL_ALLOCATE_RANGE, unix.FALLOC_FL_UNSHARE_RANGE, unix.FALLOC_FL_ZERO_RANGE:
	case unix.FALLOC_FL_PUNCH_HOLE:
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
			return unix.EOPNOTSUPP
		}
	case unix.FALLOC_FL_COLLAPSE_RANGE, unix.FALLOC_FL_INSERT_RANGE, unix.FALLOC_FL_WRITE_ZEROES:
		if mode&unix.FALLOC_FL_KEEP_SIZE != 0 {
			return unix.EOPNOTSUPP
		}
	default:
		return unix.EOPNOTSUPP
	}
	return nil
}

// Ioctl is ioctl(2) on f after the commands that change the fd
// (FIOCLEX, FIONCLEX), which the fd table answers. It runs the rest of
// do_vfs_ioctl's generic commands, whose int or loff_t argument is arg (a
// shorter arg is EFAULT, as a bad pointer):
//
//   - FIONBIO is accepted: O_NONBLOCK has no effect on these files.
//   - FIOASYNC turning async notification on is ENOTTY: no file here has
//     fasync.
//   - FIONREAD on a regular file replies with the bytes between the file
//     position and the end, as an int; on another file, f's Ioctl decides.
//   - FIOQSIZE on a regular file replies with its allocated bytes as a
//     loff_t; on another file it is ENOTTY.
//
// Any other command is f's Ioctl.
func Ioctl(f FileDescription, fdt FDTable, cmd uint32, arg []byte) ([]byte, error) {
	intArg := func() (int32, error) {
		if len(arg) < 4 {
			return 0, unix.EFAULT
		}
		return int32(binary.LittleEndian.Uint32(arg)), nil
	}
	switch cmd {
	case FIONBIO:
		_, err := intArg()
		return nil, err
	case FIOASYNC:
		on, err := intArg()
		if err == nil && on != 0 {
			err = unix.ENOTTY
		}
		return nil, err
	case FIONREAD:
		st := f.Stat()
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			break
		}
		if len(arg) < 4 {
			return nil, unix.EFAULT
		}
		pos, err := f.Seek(0, unix.SEEK_CUR)
		if err != nil {
			return nil, err
		}
		b := make([]byte, 4)
		binary.LittleEndian.PutUint32(b, uint32(int32(st.Size-pos)))
		return b, nil
	case FIOQSIZE:
		st := f.Stat()
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil, unix.ENOTTY
		}
		if len(arg) < 8 {
			return nil, unix.EFAULT
		}
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, uint64(st.Blocks*512))
		return b, nil
	}
	return f.Ioctl(fdt, cmd, arg)
}

// legacyMapMask is LEGACY_MAP_MASK: the flags MAP_SHARED ignores unknown
// bits beyond and MAP_SHARED_VALIDATE refuses bits beyond (EOPNOTSUPP).
const legacyMapMask = unix.MAP_SHARED | unix.MAP_PRIVATE | unix.MAP_FIXED | unix.MAP_ANONYMOUS |
	unix.MAP_DENYWRITE | unix.MAP_EXECUTABLE | 0x4000000 /* MAP_UNINITIALIZED */ | unix.MAP_GROWSDOWN |
	unix.MAP_LOCKED | unix.MAP_NORESERVE | unix.MAP_POPULATE | unix.MAP_NONBLOCK | unix.MAP_STACK | unix.MAP_HUGETLB

// taskSize is TASK_SIZE of x86-64 with 4-level page tables: no mapping is
// larger.
const taskSize = 1<<47 - 4096

// Mmap is mmap(2) of an fd of f with status flags flags, after the
// checks of sys_mmap and do_mmap in their order: an offset that is not a
// multiple of the page size or a zero length is EINVAL; a length that does
// not fit in the address space ENOMEM; a range whose last page overflows or
// ends beyond the largest file offset EOVERFLOW; a mapping type other than MAP_SHARED, MAP_SHARED_VALIDATE or
// MAP_PRIVATE EINVAL; unknown flags with MAP_SHARED_VALIDATE EOPNOTSUPP; a
// shared writable mapping of an fd not open for writing, or any mapping of
// // an fd not open for reading, EACCES; a file without FModeMmap ENODEV;
// MAP_GROWSDOWN EINVAL. Then f's Mmap with the length rounded up to pages.
func Mmap(f FileDescription, flags int, opts MmapOpts) (Mapping, error) {
	const page = 4096
	if opts.Offset%page != 0 || opts.Length == 0 {
		return nil, unix.EINVAL
	}
	if opts.Length > taskSize {
		return nil, unix.ENOMEM
	}
	opts.Length = (opts.Length + page - 1) &^ (page - 1)
	pgoff := opts.Offset / page
	if pgoff+opts.Length/page < pgoff {
		return nil, unix.EOVERFLOW
	}
	// file_mmap_ok: the mapping must end within MAX_LFS_FILESIZE.
	const maxPages = (1<<63 - 1) / page
	if opts.Length/page > maxPages || pgoff > maxPages-opts.Length/page {
		return nil, unix.EOVERFLOW
	}
	switch opts.Flags & unix.MAP_TYPE {
	case unix.MAP_SHARED, unix.MAP_SHARED_VALIDATE:
		if opts.Flags&unix.MAP_TYPE == unix.MAP_SHARED_VALIDATE && opts.Flags&^legacyMapMask&^unix.MAP_TYPE != 0 {
			return nil, unix.EOPNOTSUPP
		}
		if opts.Prot&unix.PROT_WRITE != 0 && !canAccess(flags, unix.O_WRONLY) {
			return nil, unix.EACCES
		}
		fallthrough
	case unix.MAP_PRIVATE:
		if !canAccess(flags, unix.O_RDONLY) {
			return nil, unix.EACCES
		}
	default:
		return nil, unix.EINVAL
	}
	if f.FMode()&FModeMmap == 0 {
		return nil, unix.ENODEV
	}
	if opts.Flags&unix.MAP_GROWSDOWN != 0 {
		return nil, unix.EINVAL
	}
	return f.Mmap(opts)
}
