package memfd

import (
	"io"

	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// A memfd is a regular file: it has every op of a vfs.FileDescription but
// ioctl. The methods Stat, StatusFlags, Seek, Truncate and Fallocate
// implement it as they are.
var _ vfs.FileDescription = (*File)(nil)

// FMode implements vfs.FileDescription.FMode: a memfd allows pread64 and
// pwrite64, and can be mapped.
func (f *File) FMode() vfs.FMode { return vfs.FModePRead | vfs.FModePWrite | vfs.FModeMmap }

// ReadTo implements vfs.FileDescription.ReadTo (ReadToAt at the file
// position).
func (f *File) ReadTo(dst io.Writer, count int64) (int64, error) {
	return f.ReadToAt(dst, count, -1)
}

// PReadTo implements vfs.FileDescription.PReadTo.
func (f *File) PReadTo(dst io.Writer, count, off int64) (int64, error) {
	return f.ReadToAt(dst, count, off)
}

// WriteFrom implements vfs.FileDescription.WriteFrom (WriteFromAt at the
// file position).
func (f *File) WriteFrom(src io.Reader, count int64) (int64, error) {
	return f.WriteFromAt(src, count, -1)
}

// PWriteFrom implements vfs.FileDescription.PWriteFrom.
func (f *File) PWriteFrom(src io.Reader, count, off int64) (int64, error) {
	return f.WriteFromAt(src, count, off)
}

// Ioctl implements vfs.FileDescription.Ioctl: shmem has no ioctls of its
// own (ENOTTY); do_vfs_ioctl's FIONREAD and FIOQSIZE are vfs.Ioctl's.
func (f *File) Ioctl(vfs.FDTable, uint32, []byte) ([]byte, error) {
	return nil, unix.ENOTTY
}

// Fcntl implements vfs.FileDescription.Fcntl: F_ADD_SEALS and F_GET_SEALS
// (memfd_fcntl); any other command is EINVAL.
func (f *File) Fcntl(cmd int, arg uint64) (int64, error) {
	switch cmd {
	case unix.F_ADD_SEALS:
		return 0, f.AddSeals(uint32(arg))
	case unix.F_GET_SEALS:
		s, err := f.GetSeals()
		return int64(s), err
	}
	return 0, unix.EINVAL
}
