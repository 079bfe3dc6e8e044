package kernel

import (
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"unsafe"

	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// errnoOf returns err's errno, 0 for nil, -1 for anything else.
func errnoOf(err error) unix.Errno {
	if err == nil {
		return 0
	}
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return ^unix.Errno(0)
}

// hostIoctl is ioctl(fd, cmd, &v) on the host.
func hostIoctl(fd int, cmd uint32, v *int64) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(cmd), uintptr(unsafe.Pointer(v)))
	if e != 0 {
		return e
	}
	return nil
}

// The same calls on the host and in the sentry give the same errnos and
// values. The host's analogues: a memfd for a memfd, an epoll fd (an
// anonymous inode without read, write or llseek) for a LUO session fd,
// /dev/null (a character device opened with open(2)) for /dev/liveupdate
// where only the access mode and the file type matter.
func TestErrnosMatchTheHost(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	dev := mustFD(t)(g.OpenLiveUpdate())
	sess := mustFD(t)(g.CreateSession(dev, "s"))
	mfd := mustFD(t)(g.MemfdCreate("m", 0))
	hm, err := unix.MemfdCreate("m", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(hm)
	hep, err := unix.EpollCreate1(0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(hep)
	hnull, err := unix.Open("/dev/null", unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(hnull)
	// Ten bytes, offset 3: FIONREAD says 7.
	for _, w := range []func() error{
		func() error { _, err := g.Write(mfd, []byte("0123456789")); return err },
		func() error { _, err := g.Seek(mfd, 3, unix.SEEK_SET); return err },
		func() error { _, err := unix.Write(hm, []byte("0123456789")); return err },
		func() error { _, err := unix.Seek(hm, 3, unix.SEEK_SET); return err },
	} {
		if err := w(); err != nil {
			t.Fatal(err)
		}
	}
	const badFD = 999
	b := make([]byte, 8)
	tests := []struct {
		name   string
		host   func() (int64, error)
		sentry func() (int64, error)
	}{
		{"F_GETFL of a memfd", func() (int64, error) { v, err := unix.FcntlInt(uintptr(hm), unix.F_GETFL, 0); return int64(v), err },
			func() (int64, error) { v, err := g.Fcntl(mfd, unix.F_GETFL, 0); return int64(v), err }},
		{"F_GETFL of a session fd", func() (int64, error) { v, err := unix.FcntlInt(uintptr(hep), unix.F_GETFL, 0); return int64(v), err },
			func() (int64, error) { v, err := g.Fcntl(sess, unix.F_GETFL, 0); return int64(v), err }},
		{"F_GETFL of /dev/liveupdate opened O_RDWR", func() (int64, error) { v, err := unix.FcntlInt(uintptr(hnull), unix.F_GETFL, 0); return int64(v), err },
			func() (int64, error) { v, err := g.Fcntl(dev, unix.F_GETFL, 0); return int64(v), err }},
		{"fcntl of a bad fd with an unknown command", func() (int64, error) { _, err := unix.FcntlInt(badFD, 9999, 0); return 0, err },
			func() (int64, error) { _, err := g.Fcntl(badFD, 9999, 0); return 0, err }},
		{"F_SETFL of a bad fd", func() (int64, error) { _, err := unix.FcntlInt(badFD, unix.F_SETFL, 0); return 0, err },
			func() (int64, error) { _, err := g.Fcntl(badFD, unix.F_SETFL, 0); return 0, err }},
		{"F_DUPFD with high bits in its argument", func() (int64, error) {
			fd, _, e := unix.Syscall(unix.SYS_FCNTL, uintptr(hm), unix.F_DUPFD, 1<<32|900)
			if e != 0 {
				return 0, e
			}
			unix.Close(int(fd))
			return 0, nil
		}, func() (int64, error) {
			fd, err := g.Fcntl(mfd, unix.F_DUPFD, 1<<32|900)
			if err == nil && fd < 900 {
				return 0, errors.New("below the minimum")
			}
			return 0, err
		}},
		{"ftruncate of a bad fd to -1", func() (int64, error) { return 0, unix.Ftruncate(badFD, -1) },
			func() (int64, error) { return 0, g.Ftruncate(badFD, -1) }},
		{"pread64 of a session fd", func() (int64, error) { _, err := unix.Pread(hep, b, 0); return 0, err },
			func() (int64, error) { _, err := g.Pread(sess, b, 0); return 0, err }},
		{"pwrite64 of a session fd", func() (int64, error) { _, err := unix.Pwrite(hep, b, 0); return 0, err },
			func() (int64, error) { _, err := g.Pwrite(sess, b, 0); return 0, err }},
		{"read of a session fd", func() (int64, error) { _, err := unix.Read(hep, b); return 0, err },
			func() (int64, error) { _, err := g.Read(sess, b); return 0, err }},
		{"write of a session fd", func() (int64, error) { _, err := unix.Write(hep, b); return 0, err },
			func() (int64, error) { _, err := g.Write(sess, b); return 0, err }},
		{"lseek of a session fd with an unknown whence", func() (int64, error) { _, err := unix.Seek(hep, 0, 99); return 0, err },
			func() (int64, error) { _, err := g.Seek(sess, 0, 99); return 0, err }},
		{"fallocate of a session fd, length 0", func() (int64, error) { return 0, unix.Fallocate(hep, 0, 0, 0) },
			func() (int64, error) { return 0, g.Fallocate(sess, 0, 0, 0) }},
		{"fallocate of a session fd, negative offset", func() (int64, error) { return 0, unix.Fallocate(hep, 0, -1, 10) },
			func() (int64, error) { return 0, g.Fallocate(sess, 0, -1, 10) }},
		{"fallocate of a session fd, unknown mode", func() (int64, error) { return 0, unix.Fallocate(hep, 0x4000, 0, 10) },
			func() (int64, error) { return 0, g.Fallocate(sess, 0x4000, 0, 10) }},
		{"fallocate of a session fd, punch hole without keep size", func() (int64, error) { return 0, unix.Fallocate(hep, unix.FALLOC_FL_PUNCH_HOLE, 0, 10) },
			func() (int64, error) { return 0, g.Fallocate(sess, unix.FALLOC_FL_PUNCH_HOLE, 0, 10) }},
		{"fallocate of a session fd", func() (int64, error) { return 0, unix.Fallocate(hep, 0, 0, 10) },
			func() (int64, error) { return 0, g.Fallocate(sess, 0, 0, 10) }},
		{"fallocate of /dev/liveupdate", func() (int64, error) { return 0, unix.Fallocate(hnull, 0, 0, 10) },
			func() (int64, error) { return 0, g.Fallocate(dev, 0, 0, 10) }},
		{"FIOCLEX on a memfd", func() (int64, error) { var v int64; return 0, hostIoctl(hm, vfs.FIOCLEX, &v) },
			func() (int64, error) { _, err := g.Ioctl(mfd, vfs.FIOCLEX, nil); return 0, err }},
		{"FIONCLEX on a memfd", func() (int64, error) { var v int64; return 0, hostIoctl(hm, vfs.FIONCLEX, &v) },
			func() (int64, error) { _, err := g.Ioctl(mfd, vfs.FIONCLEX, nil); return 0, err }},
		{"FIOCLEX on a session fd", func() (int64, error) { var v int64; return 0, hostIoctl(hep, vfs.FIOCLEX, &v) },
			func() (int64, error) { _, err := g.Ioctl(sess, vfs.FIOCLEX, nil); return 0, err }},
		{"FIONBIO on a memfd", func() (int64, error) { v := int64(1); return 0, hostIoctl(hm, vfs.FIONBIO, &v) },
			func() (int64, error) { _, err := g.Ioctl(mfd, vfs.FIONBIO, []byte{1, 0, 0, 0}); return 0, err }},
		{"FIOASYNC on on a memfd", func() (int64, error) { v := int64(1); return 0, hostIoctl(hm, vfs.FIOASYNC, &v) },
			func() (int64, error) { _, err := g.Ioctl(mfd, vfs.FIOASYNC, []byte{1, 0, 0, 0}); return 0, err }},
		{"FIOASYNC off on a memfd", func() (int64, error) { v := int64(0); return 0, hostIoctl(hm, vfs.FIOASYNC, &v) },
			func() (int64, error) { _, err := g.Ioctl(mfd, vfs.FIOASYNC, []byte{0, 0, 0, 0}); return 0, err }},
		{"FIONREAD on a memfd", func() (int64, error) { var v int64; err := hostIoctl(hm, vfs.FIONREAD, &v); return v, err },
			func() (int64, error) {
				r, err := g.Ioctl(mfd, vfs.FIONREAD, make([]byte, 4))
				if err != nil || len(r) != 4 {
					return -1, err
				}
				return int64(int32(binary.LittleEndian.Uint32(r))), nil
			}},
		{"FIOQSIZE on a memfd", func() (int64, error) { var v int64; err := hostIoctl(hm, vfs.FIOQSIZE, &v); return v, err },
			func() (int64, error) {
				r, err := g.Ioctl(mfd, vfs.FIOQSIZE, make([]byte, 8))
				if err != nil || len(r) != 8 {
					return -1, err
				}
				return int64(binary.LittleEndian.Uint64(r)), nil
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hv, herr := tc.host()
			sv, serr := tc.sentry()
			if errnoOf(herr) != errnoOf(serr) || hv != sv {
				t.Errorf("host: %#x, %v; sentry: %#x, %v", hv, herr, sv, serr)
			}
		})
	}
	// A session has no llseek (an epoll fd has noop_llseek, so it is no
	// analogue here): ESPIPE once the whence is valid.
	if _, err := g.Seek(sess, 0, unix.SEEK_SET); !errors.Is(err, unix.ESPIPE) {
		t.Errorf("lseek of a session fd: %v, want ESPIPE", err)
	}
	// FIOCLEX really sets FD_CLOEXEC.
	if _, err := g.Ioctl(mfd, vfs.FIOCLEX, nil); err != nil {
		t.Fatal(err)
	}
	if v, err := g.Fcntl(mfd, unix.F_GETFD, 0); err != nil || v != unix.FD_CLOEXEC {
		t.Errorf("F_GETFD after FIOCLEX: %d, %v", v, err)
	}
	if _, err := g.Ioctl(mfd, vfs.FIONREAD, []byte{0}); !errors.Is(err, unix.EFAULT) {
		t.Errorf("FIONREAD with a 1-byte argument: %v, want EFAULT", err)
	}
}

// Read or write on /dev/liveupdate opened without that access mode is
// EBADF (vfs_read, vfs_write, vfs_fallocate check it first), as on the
// host's /dev/null; with it, EINVAL (no read or write op).
func TestDevLiveupdateAccessModes(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	b := make([]byte, 4)
	for _, mode := range []int{unix.O_RDONLY, unix.O_WRONLY, unix.O_RDWR} {
		dev, err := g.Open(DevLiveupdate, mode)
		if err != nil {
			t.Fatalf("open(%#x): %v", mode, err)
		}
		host, err := os.OpenFile("/dev/null", mode, 0)
		if err != nil {
			t.Fatal(err)
		}
		hfd := int(host.Fd())
		want := func(hostErr error, noOp bool) unix.Errno {
			if noOp && hostErr == nil {
				// /dev/null reads and writes; /dev/liveupdate has no op.
				return unix.EINVAL
			}
			return errnoOf(hostErr)
		}
		_, herr := unix.Read(hfd, b)
		_, serr := g.Read(dev, b)
		if w := want(herr, true); errnoOf(serr) != w {
			t.Errorf("read of /dev/liveupdate opened %#x: %v, want %v", mode, serr, w)
		}
		_, herr = unix.Write(hfd, b)
		_, serr = g.Write(dev, b)
		if w := want(herr, true); errnoOf(serr) != w {
			t.Errorf("write of /dev/liveupdate opened %#x: %v, want %v", mode, serr, w)
		}
		herr = unix.Fallocate(hfd, 0, 0, 10)
		serr = g.Fallocate(dev, 0, 0, 10)
		if errnoOf(serr) != errnoOf(herr) {
			t.Errorf("fallocate of /dev/liveupdate opened %#x: %v, host %v", mode, serr, herr)
		}
		hfl, _ := unix.FcntlInt(uintptr(hfd), unix.F_GETFL, 0)
		sfl, _ := g.Fcntl(dev, unix.F_GETFL, 0)
		if hfl != sfl {
			t.Errorf("F_GETFL of /dev/liveupdate opened %#x: %#x, host %#x", mode, sfl, hfl)
		}
		host.Close()
		if err := g.Close(dev); err != nil {
			t.Fatal(err)
		}
	}
}
