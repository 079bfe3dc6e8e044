package vfs

import (
	"io"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// FileDescriptionDefaultImpl gives every op of FileDescription except
// IncRef and DecRef the answer Linux gives for a file without it. A file
// type embeds it and overrides what it supports. The defaults describe an
// anonymous inode (anon_inode_getfile), such as a LUO session fd.
type FileDescriptionDefaultImpl struct{}

// FMode implements FileDescription.FMode: an anonymous inode has neither
// FMODE_PREAD nor FMODE_PWRITE.
func (FileDescriptionDefaultImpl) FMode() FMode { return 0 }

// StatusFlags implements FileDescription.StatusFlags: O_RDWR, without
// O_LARGEFILE (anon_inode_getfile does not add it).
func (FileDescriptionDefaultImpl) StatusFlags() int { return unix.O_RDWR }

// Stat implements FileDescription.Stat: an anonymous inode has no file
// type bits, mode 0600, one link and size 0.
func (FileDescriptionDefaultImpl) Stat() abiguest.Stat {
	return abiguest.Stat{Blksize: 4096, Mode: 0o600, Nlink: 1}
}

// ReadTo implements FileDescription.ReadTo: a file without a read op is
// EINVAL (vfs_read without FMODE_CAN_READ).
func (FileDescriptionDefaultImpl) ReadTo(io.Writer, int64) (int64, error) {
	return 0, unix.EINVAL
}

// PReadTo implements FileDescription.PReadTo: EINVAL, as ReadTo.
func (FileDescriptionDefaultImpl) PReadTo(io.Writer, int64, int64) (int64, error) {
	return 0, unix.EINVAL
}

// WriteFrom implements FileDescription.WriteFrom: a file without a write
// op is EINVAL (vfs_write without FMODE_CAN_WRITE).
func (FileDescriptionDefaultImpl) WriteFrom(io.Reader, int64) (int64, error) {
	return 0, unix.EINVAL
}

// PWriteFrom implements FileDescription.PWriteFrom: EINVAL, as WriteFrom.
func (FileDescriptionDefaultImpl) PWriteFrom(io.Reader, int64, int64) (int64, error) {
	return 0, unix.EINVAL
}

// Seek implements FileDescription.Seek: a file without llseek cannot seek
// (ESPIPE).
func (FileDescriptionDefaultImpl) Seek(int64, int) (int64, error) {
	return 0, unix.ESPIPE
}

// Truncate implements FileDescription.Truncate: only a regular file can be
// truncated (do_ftruncate: EINVAL).
func (FileDescriptionDefaultImpl) Truncate(int64) error { return unix.EINVAL }

// Fallocate implements FileDescription.Fallocate: a file that is neither
// regular nor a block device is ENODEV (vfs_fallocate).
func (FileDescriptionDefaultImpl) Fallocate(uint32, int64, int64) error { return unix.ENODEV }

// Ioctl implements FileDescription.Ioctl: a file without ioctls is ENOTTY.
func (FileDescriptionDefaultImpl) Ioctl(FDTable, uint32, []byte) ([]byte, error) {
	return nil, unix.ENOTTY
}

// Fcntl implements FileDescription.Fcntl: a command the file does not know
// is EINVAL, as do_fcntl answers (the seal commands on a file that is not
// a memfd included).
func (FileDescriptionDefaultImpl) Fcntl(int, uint64) (int64, error) { return 0, unix.EINVAL }

// Mmap implements FileDescription.Mmap: a file without an mmap op is
// ENODEV (do_mmap).
func (FileDescriptionDefaultImpl) Mmap(MmapOpts) (Mapping, error) { return nil, unix.ENODEV }
