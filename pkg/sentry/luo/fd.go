package luo

import (
	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// vfsDefaults gives Device and Session, by embedding, the answers of a file
// without an op for every vfs.FileDescription op they do not have: both
// are files with nothing but ioctls.
type vfsDefaults = vfs.FileDescriptionDefaultImpl

// An open /dev/liveupdate and a session fd are file descriptions. Their
// IncRef, DecRef and Ioctl (in device.go and session.go) implement
// vfs.FileDescription as they are.
var (
	_ vfs.FileDescription = (*Device)(nil)
	_ vfs.FileDescription = (*Session)(nil)
)

// FMode implements vfs.FileDescription.FMode: /dev/liveupdate is opened
// through a path, so pread64 and pwrite64 reach the (missing) read and
// write ops and are EINVAL, not ESPIPE.
func (d *Device) FMode() vfs.FMode { return vfs.FModePRead | vfs.FModePWrite }

// StatusFlags implements vfs.FileDescription.StatusFlags. The device is
// only ever installed by open(2), which takes the flags from its
// arguments; this is what open(O_RDWR) gives.
func (d *Device) StatusFlags() int { return unix.O_RDWR | vfs.OLargefile }

// Stat implements vfs.FileDescription.Stat: a misc character device node,
// crw------- (10, dynamic).
func (d *Device) Stat() abiguest.Stat {
	return abiguest.Stat{Blksize: 4096, Mode: unix.S_IFCHR | 0o600, Nlink: 1}
}
