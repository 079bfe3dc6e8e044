package kernel

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// DevLiveupdate is the one path a guest can open.
const DevLiveupdate = "/dev/liveupdate"

// syscall is one guest call in progress.
type syscall struct {
	p *Process
	h *abiguest.RequestHeader
	// left is the number of payload bytes not read from the connection.
	left int64
	// broken is set when the connection failed mid-call.
	broken error
	// cut is the rest of a data frame that a pause cut, to be sent once
	// the call is out of the dispatch gate.
	cut []byte
	// post, if set, sends the frames that come before the result once
	// the call is out of the dispatch gate.
	post func() error
}

// fd returns argument i as an fd (an int in Linux).
func (c *syscall) fd(i int) int32 { return int32(c.h.Args[i]) }

// smallPayload reads the whole payload of a call that takes a name, a path
// or an ioctl struct.
// It is interruptible: nothing is done until it has all arrived.
func (c *syscall) smallPayload() ([]byte, error) {
	b := make([]byte, c.left)
	c.p.beginInterruptible()
	got, err := io.ReadFull(c.p.r, b)
	intr := c.p.endInterruptible()
	c.left -= int64(got)
	switch {
	case err == nil:
		if intr {
			// Interrupted as the last byte came: the call goes on.
			c.p.clearInterrupt()
		}
		return b, nil
	case intr && c.p.interruptedBy(err):
		return nil, errRestart
	}
	c.broken = fmt.Errorf("reading the %d-byte payload: %w", len(b), err)
	return nil, c.broken
}

// cString cuts b at its first NUL, as strncpy_from_user does.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// dispatch runs the call and returns its result and reply payload, or an
// error: a unix.Errno for the guest, or c.broken set.
func (c *syscall) dispatch() (int64, []byte, error) {
	fdt := c.p.fdt
	a := c.h.Args
	switch c.h.Op {
	case abiguest.OpMemfdCreate:
		return c.memfdCreate()
	case abiguest.OpClose:
		return 0, nil, fdt.Close(c.fd(0))
	case abiguest.OpDup:
		fd, err := fdt.Dup(c.fd(0), 0, false)
		return int64(fd), nil, err
	case abiguest.OpDup3:
		fd, err := fdt.Dup3(c.fd(0), c.fd(1), int(int32(a[2])))
		return int64(fd), nil, err
	case abiguest.OpRead:
		return c.read(-1)
	case abiguest.OpPread64:
		if int64(a[2]) < 0 {
			return 0, nil, unix.EINVAL
		}
		return c.read(int64(a[2]))
	case abiguest.OpWrite:
		return c.write(-1)
	case abiguest.OpPwrite64:
		if int64(a[1]) < 0 {
			return 0, nil, unix.EINVAL
		}
		return c.write(int64(a[1]))
	case abiguest.OpLseek:
		return c.lseek()
	case abiguest.OpFtruncate:
		// do_ftruncate: a negative length is EINVAL before the fd.
		if int64(a[1]) < 0 {
			return 0, nil, unix.EINVAL
		}
		return c.withFile(func(d descriptor) (int64, []byte, error) {
			return 0, nil, vfs.Truncate(d.file, d.statusFlags, int64(a[1]))
		})
	case abiguest.OpFallocate:
		return c.fallocate()
	case abiguest.OpFstat:
		return c.fstat()
	case abiguest.OpFcntl:
		return c.fcntl()
	case abiguest.OpOpen:
		return c.open()
	case abiguest.OpIoctl:
		return c.ioctl()
	case abiguest.OpMmap:
		return c.mmap()
	case abiguest.OpMunmap:
		return 0, nil, c.p.mm.unmap(a[0], a[1], a[2])
	case abiguest.OpFork:
		return c.fork()
	case abiguest.OpAttach:
		return c.attach()
	case abiguest.OpExecve:
		return c.execve()
	}
	return 0, nil, unix.ENOSYS
}

// withFile runs fn on the file behind argument 0 with a reference held.
func (c *syscall) withFile(fn func(d descriptor) (int64, []byte, error)) (int64, []byte, error) {
	d, err := c.p.fdt.get(c.fd(0))
	if err != nil {
		return 0, nil, err
	}
	defer d.file.DecRef()
	return fn(d)
}

// memfdCreate is memfd_create(2).
func (c *syscall) memfdCreate() (int64, []byte, error) {
	name, err := c.smallPayload()
	if err != nil {
		return 0, nil, err
	}
	flags := uint(c.h.Args[0])
	f, err := memfd.Create(c.p.k.mf, cString(name), flags)
	if err != nil {
		return 0, nil, err
	}
	defer f.DecRef()
	fd, err := c.p.fdt.InstallFD(f, uint32(flags)&unix.MFD_CLOEXEC != 0)
	return int64(fd), nil, err
}

// read is read(2) (off -1) and pread64(2): the bytes go out as data frames
// straight from the memory file.
func (c *syscall) read(off int64) (int64, []byte, error) {
	count := int64(min(c.h.Args[1], abiguest.MaxReadCount))
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		w := dataWriter{p: c.p, c: c}
		var n int64
		var err error
		c.p.beginInterruptible()
		if off < 0 {
			n, err = vfs.Read(d.file, d.statusFlags, &w, count)
		} else {
			n, err = vfs.PRead(d.file, d.statusFlags, &w, count, off)
		}
		c.p.endInterruptible()
		if w.err == errRestart {
			// The n bytes sent (or cut, and sent later) count, as the
			// file position says.
			return n, nil, errRestart
		}
		if w.err != nil {
			c.broken = fmt.Errorf("sending file data: %w", w.err)
			return 0, nil, c.broken
		}
		if err != nil && n > 0 {
			// A partial read returns what was read, as Linux does.
			err = nil
		}
		return n, nil, err
	})
}

// payloadReader reads a call's payload and counts what it consumed.
type payloadReader struct {
	c   *syscall
	err error
}

// Read implements io.Reader.
func (r *payloadReader) Read(b []byte) (int, error) {
	if r.c.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > r.c.left {
		b = b[:r.c.left]
	}
	n, err := r.c.p.r.Read(b)
	r.c.left -= int64(n)
	if err != nil {
		r.err = err
	}
	return n, err
}

// write is write(2) (off -1) and pwrite64(2): the payload streams from the
// connection into the file (a memfd's page cache).
func (c *syscall) write(off int64) (int64, []byte, error) {
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		r := payloadReader{c: c}
		var n int64
		var err error
		c.p.beginInterruptible()
		if off < 0 {
			n, err = vfs.Write(d.file, d.statusFlags, &r, c.left)
		} else {
			n, err = vfs.PWrite(d.file, d.statusFlags, &r, c.left, off)
		}
		intr := c.p.endInterruptible()
		if intr && c.p.interruptedBy(r.err) {
			// The payload read so far is in the file; call drains the
			// rest once out of the gate.
			return n, nil, errRestart
		}
		if r.err != nil {
			c.broken = fmt.Errorf("receiving data to write: %w", r.err)
			return 0, nil, c.broken
		}
		if err != nil && n > 0 {
			err = nil
		}
		return n, nil, err
	})
}

// lseek is lseek(2).
func (c *syscall) lseek() (int64, []byte, error) {
	a := c.h.Args
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		off, err := vfs.Seek(d.file, int64(a[1]), uint32(a[2]))
		return off, nil, err
	})
}

// fallocate is fallocate(2).
func (c *syscall) fallocate() (int64, []byte, error) {
	a := c.h.Args
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		return 0, nil, vfs.Fallocate(d.file, d.statusFlags, uint32(a[1]), int64(a[2]), int64(a[3]))
	})
}

// fstat is fstat(2).
func (c *syscall) fstat() (int64, []byte, error) {
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		s := d.file.Stat()
		b := make([]byte, abiguest.StatSize)
		s.Encode(b)
		return 0, b, nil
	})
}

// fcntl is fcntl(2): F_GETFD, F_SETFD, F_GETFL, F_DUPFD and
// F_DUPFD_CLOEXEC here; any other command is the file's (F_ADD_SEALS and
// F_GET_SEALS on a memfd; EINVAL for a command no file knows). A bad fd is
// EBADF whatever the command.
func (c *syscall) fcntl() (int64, []byte, error) {
	fdt := c.p.fdt
	fd, cmd, arg := c.fd(0), int(int32(c.h.Args[1])), c.h.Args[2]
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		switch cmd {
		case unix.F_GETFD:
			ce, err := fdt.CloseOnExec(fd)
			if ce {
				return unix.FD_CLOEXEC, nil, err
			}
			return 0, nil, err
		case unix.F_SETFD:
			return 0, nil, fdt.SetCloseOnExec(fd, arg&unix.FD_CLOEXEC != 0)
		case unix.F_DUPFD, unix.F_DUPFD_CLOEXEC:
			// f_dupfd takes the argument as an int: the high bits go.
			min := int64(int32(arg))
			if min < 0 || min >= MaxFDs {
				return 0, nil, unix.EINVAL
			}
			nfd, err := fdt.install(d.file, d.statusFlags, cmd == unix.F_DUPFD_CLOEXEC, int(min))
			return int64(nfd), nil, err
		case unix.F_GETFL:
			return int64(d.statusFlags), nil, nil
		}
		res, err := d.file.Fcntl(cmd, arg)
		return res, nil, err
	})
}

// open is open(2). The guest's filesystem holds only /dev/liveupdate.
func (c *syscall) open() (int64, []byte, error) {
	b, err := c.smallPayload()
	if err != nil {
		return 0, nil, err
	}
	path := cString(b)
	flags := int(int32(c.h.Args[0]))
	switch {
	case path == "":
		return 0, nil, unix.ENOENT
	case path != DevLiveupdate:
		if flags&unix.O_CREAT != 0 {
			// There is no writable directory to create it in.
			return 0, nil, unix.EACCES
		}
		return 0, nil, unix.ENOENT
	case flags&(unix.O_CREAT|unix.O_EXCL) == unix.O_CREAT|unix.O_EXCL:
		return 0, nil, unix.EEXIST
	case flags&unix.O_DIRECTORY != 0:
		return 0, nil, unix.ENOTDIR
	}
	dev, err := c.p.k.luo.OpenDevice()
	if err != nil {
		return 0, nil, err
	}
	defer dev.DecRef()
	fd, err := c.p.fdt.install(dev, flags&unix.O_ACCMODE|vfs.OLargefile, flags&unix.O_CLOEXEC != 0, 0)
	return int64(fd), nil, err
}

// ioctl is ioctl(2): FIOCLEX and FIONCLEX change the fd; every other
// command goes to vfs.Ioctl (the rest of do_vfs_ioctl, then the file's own
// ioctls: LUO's uapi structs on /dev/liveupdate and session fds). The
// argument struct is the payload.
func (c *syscall) ioctl() (int64, []byte, error) {
	arg, err := c.smallPayload()
	if err != nil {
		return 0, nil, err
	}
	fdt, fd, cmd := c.p.fdt, c.fd(0), uint32(c.h.Args[1])
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		switch cmd {
		case vfs.FIOCLEX:
			return 0, nil, fdt.SetCloseOnExec(fd, true)
		case vfs.FIONCLEX:
			return 0, nil, fdt.SetCloseOnExec(fd, false)
		}
		reply, err := vfs.Ioctl(d.file, fdt, cmd, arg)
		if err != nil {
			return 0, nil, err
		}
		if len(reply) > abiguest.MaxReplyPayload {
			return 0, nil, errors.New("ioctl reply larger than the protocol allows")
		}
		return 0, reply, nil
	})
}
