// Package vfs is the sentry's file descriptions: the ops table that every
// kind of file a guest fd can refer to implements (Linux's struct file and
// its file_operations, gVisor's vfs.FileDescriptionImpl), the answers Linux
// gives for an op a file type does not have, and the checks a system call
// makes on an open file before it reaches the file's op.
//
// The rules, in one place:
//
//   - A file type implements FileDescription, embedding
//     FileDescriptionDefaultImpl and overriding the ops it has. The defaults
//     are the answers of a file without the op: read and write EINVAL, lseek
//     ESPIPE, ftruncate EINVAL, fallocate ENODEV, ioctl ENOTTY, fcntl
//     EINVAL; fstat and F_GETFL those of an anonymous inode.
//   - The fd table holds FileDescriptions and the system calls reach them
//     through this package's functions (Read, PRead, Write, PWrite, Seek,
//     Truncate, Fallocate, Ioctl), never by asking which type a file is.
//     Those functions make the checks Linux makes before calling f_op, in
//     Linux's order: pread64 and pwrite64 on a file without FModePRead or
//     FModePWrite are ESPIPE; an fd whose access mode lacks read or write is
//     EBADF (ftruncate: EINVAL); an unknown whence is EINVAL; then
//     vfs_fallocate's argument checks, and do_vfs_ioctl's generic ioctls.
//   - What needs the fd table (EBADF for a bad fd, FD_CLOEXEC, dup, F_GETFL)
//     and argument checks made before the fd is looked up (a negative
//     offset) belong to the system calls, not here.
//
// A new op is one method on FileDescription and its default on
// FileDescriptionDefaultImpl, as mmap was (ENODEV, as for a file without
// f_op->mmap).
//
// The package holds no locks of its own: a file description's ops take the
// file's locks, and the functions here are called with none held.
package vfs

import (
	"io"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
)

// FileDescription is an open file description (struct file): what an fd
// refers to, shared by dup'ed fds. Every method answers a guest, so every
// error is a unix.Errno. Implementations must be safe for concurrent use.
//
// Callers go through the functions of this package rather than calling
// ReadTo, PReadTo, WriteFrom, PWriteFrom, Seek, Truncate, Fallocate or Ioctl
// directly, so that the generic checks run first.
type FileDescription interface {
	// IncRef takes a reference on the description (fget, an fd, a
	// preservation).
	IncRef()
	// DecRef drops a reference. The last one releases the description
	// (fput, f_op->release).
	DecRef()

	// FMode returns the capabilities of the description that the generic
	// checks look at (f_mode beyond the fd's access mode).
	FMode() FMode
	// StatusFlags returns the file status flags (F_GETFL) that an fd of a
	// description the sentry creates gets: memfd_create, a LUO session fd,
	// a retrieved file. open(2) takes them from its flags instead.
	StatusFlags() int
	// Stat returns what fstat(2) shows.
	Stat() abiguest.Stat

	// ReadTo is read(2) (f_op->read): it writes up to count bytes from the
	// file position to dst, advances the position and returns how many
	// bytes it wrote. A failure of dst ends the read; the error returned
	// may then be dst's.
	ReadTo(dst io.Writer, count int64) (int64, error)
	// PReadTo is pread64(2): ReadTo at offset off (>= 0), leaving the file
	// position alone.
	PReadTo(dst io.Writer, count, off int64) (int64, error)
	// WriteFrom is write(2) (f_op->write): it reads up to count bytes from
	// src into the file at the file position, advances the position and
	// returns how many bytes it wrote.
	WriteFrom(src io.Reader, count int64) (int64, error)
	// PWriteFrom is pwrite64(2): WriteFrom at offset off (>= 0), leaving
	// the file position alone.
	PWriteFrom(src io.Reader, count, off int64) (int64, error)
	// Seek is lseek(2) (f_op->llseek) with a whence of at most SEEK_MAX.
	Seek(off int64, whence int) (int64, error)
	// Truncate is ftruncate(2) with a length >= 0 on an fd open for
	// writing.
	Truncate(length int64) error
	// Fallocate is fallocate(2) (f_op->fallocate) after vfs_fallocate's
	// argument checks (FallocateArgs), on an fd open for writing.
	Fallocate(mode uint32, off, length int64) error
	// Ioctl is the file's own ioctl (f_op->unlocked_ioctl), for a command
	// do_vfs_ioctl does not handle. arg is the argument struct's bytes as
	// the guest sent them; the result is the bytes to copy back. fdt is the
	// caller's fd table, for ioctls that install or look up fds.
	Ioctl(fdt FDTable, cmd uint32, arg []byte) ([]byte, error)
	// Fcntl is a file-specific fcntl(2) command (F_ADD_SEALS,
	// F_GET_SEALS, ...): every command that is not about the fd itself
	// (F_GETFD, F_SETFD, F_DUPFD, F_DUPFD_CLOEXEC) or the status flags
	// (F_GETFL).
	Fcntl(cmd int, arg uint64) (int64, error)
	// Mmap is the file's mmap (f_op->mmap) after do_mmap's generic checks
	// (see Mmap): it returns what the guest maps.
	Mmap(opts MmapOpts) (Mapping, error)
}

// MmapOpts is an mmap(2) request for a file: Length bytes (a positive
// multiple of the page size) from Offset (a multiple of the page size),
// with PROT_* Prot and MAP_* Flags. The address is the guest's own.
type MmapOpts struct {
	Offset, Length uint64
	Prot, Flags    int
}

// Mapping is what a guest maps of a file: runs of the memory file, pinned
// until unmapped. Implementations must be safe for concurrent use.
type Mapping interface {
	// Pages returns the mapping's length in pages.
	Pages() uint64
	// Runs returns the runs of the memory file that back the mapping, in
	// mapping order. Pages without a run are not mapped (past the end of
	// the file).
	Runs() []abiguest.MmapRun
	// MayWrite reports whether the mapping may be made writable later
	// (mprotect): false for a shared mapping of a write-sealed file.
	MayWrite() bool
	// Unmap unpins pages [first, first+n) of the mapping (munmap of part
	// of it); EINVAL outside the mapping.
	Unmap(first, n uint64) error
	// Release unpins every page left (munmap of the rest, exit, exec).
	Release()
	// Clone returns a copy with pins of its own (fork).
	Clone() Mapping
}

// FMode are the f_mode bits of a description that do not come from the
// fd's access mode.
type FMode uint32

const (
	// FModePRead is FMODE_PREAD: pread64(2) is allowed. Files opened
	// through a path have it; anonymous inodes, pipes and sockets do not,
	// and pread64 on them is ESPIPE.
	FModePRead FMode = 1 << iota
	// FModePWrite is FMODE_PWRITE, the same for pwrite64(2).
	FModePWrite
	// FModeMmap says the file has an mmap op (f_op->mmap): do_mmap answers
	// ENODEV for one without it before its last flag checks.
	FModeMmap
)

// FDTable is the calling guest's fd table, for ioctls that install or look
// up fds (LUO's sessions and preserved files).
type FDTable interface {
	// InstallFD installs f at the lowest free fd with f.StatusFlags(),
	// taking a new reference, with FD_CLOEXEC if cloexec is set. No free
	// fd is EMFILE.
	InstallFD(f FileDescription, cloexec bool) (int32, error)
	// FileFromFD returns the description behind fd with a new reference,
	// which the caller drops with DecRef (fget), or EBADF.
	FileFromFD(fd int32) (FileDescription, error)
}
