package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"golang.org/x/sys/unix"
)

// DevLiveupdate is the one path a guest can open.
const DevLiveupdate = "/dev/liveupdate"

// oLargefile is O_LARGEFILE as x86-64 Linux reports it in F_GETFL: open(2)
// adds it on 64-bit kernels. (Go's unix.O_LARGEFILE is 0 on amd64.)
const oLargefile = 0x8000

// The generic ioctls of do_vfs_ioctl that guests can meet.
const (
	ioctlFIONCLEX = 0x5450
	ioctlFIOCLEX  = 0x5451
	ioctlFIONBIO  = 0x5421
	ioctlFIOASYNC = 0x5452
	ioctlFIONREAD = 0x541B
	ioctlFIOQSIZE = 0x5460
)

// ioctlFile is a file that answers ioctls: /dev/liveupdate and LUO
// session fds.
type ioctlFile interface {
	Ioctl(fdt luo.FDTable, cmd uint32, arg []byte) ([]byte, error)
}

// syscall is one guest call in progress.
type syscall struct {
	p *Process
	h *abiguest.RequestHeader
	// left is the number of payload bytes not read from the connection.
	left int64
	// broken is set when the connection failed mid-call.
	broken error
}

// fd returns argument i as an fd (an int in Linux).
func (c *syscall) fd(i int) int32 { return int32(c.h.Args[i]) }

// smallPayload reads the whole payload of a call that takes a name, a path
// or an ioctl struct.
func (c *syscall) smallPayload() ([]byte, error) {
	b := make([]byte, c.left)
	if _, err := io.ReadFull(c.p.r, b); err != nil {
		c.broken = fmt.Errorf("reading the %d-byte payload: %w", c.left, err)
		return nil, c.broken
	}
	c.left = 0
	return b, nil
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
		return c.onMemfd(unix.EINVAL, func(f *memfd.File) (int64, []byte, error) {
			return 0, nil, f.Truncate(int64(a[1]))
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

// onMemfd runs fn if argument 0 is a memfd, and fails with notMemfd if it
// is another file.
func (c *syscall) onMemfd(notMemfd unix.Errno, fn func(f *memfd.File) (int64, []byte, error)) (int64, []byte, error) {
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		f, ok := d.file.(*memfd.File)
		if !ok {
			return 0, nil, notMemfd
		}
		return fn(f)
	})
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
	fd, err := c.p.fdt.install(f, f.StatusFlags(), uint32(flags)&unix.MFD_CLOEXEC != 0, 0)
	return int64(fd), nil, err
}

// noReadWrite is the errno of read(2), write(2), pread64(2) or
// pwrite64(2) on a file other than a memfd: a session fd (an anonymous
// inode) cannot pread/pwrite (ESPIPE, no FMODE_PREAD); then, as vfs_read
// and vfs_write check, an fd without the access mode is EBADF, and a file
// without the op (/dev/liveupdate, a session) EINVAL.
func noReadWrite(d descriptor, positional bool, access int) error {
	if _, ok := d.file.(*luo.Device); !ok && positional {
		return unix.ESPIPE
	}
	if acc := d.statusFlags & unix.O_ACCMODE; acc != unix.O_RDWR && acc != access {
		return unix.EBADF
	}
	return unix.EINVAL
}

// read is read(2) (off -1) and pread64(2): the bytes go out as data frames
// straight from the memory file.
func (c *syscall) read(off int64) (int64, []byte, error) {
	count := int64(min(c.h.Args[1], abiguest.MaxReadCount))
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		f, ok := d.file.(*memfd.File)
		if !ok {
			return 0, nil, noReadWrite(d, off >= 0, unix.O_RDONLY)
		}
		w := dataWriter{p: c.p}
		n, err := f.ReadToAt(&w, count, off)
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
// connection into the memfd's page cache.
func (c *syscall) write(off int64) (int64, []byte, error) {
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		f, ok := d.file.(*memfd.File)
		if !ok {
			return 0, nil, noReadWrite(d, off >= 0, unix.O_WRONLY)
		}
		r := payloadReader{c: c}
		n, err := f.WriteFromAt(&r, c.left, off)
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

// lseek is lseek(2); anything but a memfd cannot seek (ESPIPE), but, as
// ksys_lseek checks, an unknown whence is EINVAL first.
func (c *syscall) lseek() (int64, []byte, error) {
	a := c.h.Args
	whence := uint32(a[2])
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		if whence > unix.SEEK_MAX {
			return 0, nil, unix.EINVAL
		}
		f, ok := d.file.(*memfd.File)
		if !ok {
			return 0, nil, unix.ESPIPE
		}
		off, err := f.Seek(int64(a[1]), int(whence))
		return off, nil, err
	})
}

// fallocate is fallocate(2). A memfd checks everything itself; any other
// file goes through vfs_fallocate's argument, mode and access checks
// before it is refused with ENODEV (not a regular file).
func (c *syscall) fallocate() (int64, []byte, error) {
	a := c.h.Args
	mode, off, length := uint32(a[1]), int64(a[2]), int64(a[3])
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		if f, ok := d.file.(*memfd.File); ok {
			return 0, nil, f.Fallocate(mode, off, length)
		}
		if err := fallocateArgs(mode, off, length); err != nil {
			return 0, nil, err
		}
		if d.statusFlags&unix.O_ACCMODE == unix.O_RDONLY {
			return 0, nil, unix.EBADF
		}
		return 0, nil, unix.ENODEV
	})
}

// fallocateArgs are vfs_fallocate's checks of its arguments, made before
// the file type is looked at.
func fallocateArgs(mode uint32, off, length int64) error {
	return memfd.FallocateArgs(mode, off, length)
}

// fstat is fstat(2).
func (c *syscall) fstat() (int64, []byte, error) {
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		var s abiguest.Stat
		switch f := d.file.(type) {
		case *memfd.File:
			ms := f.Stat()
			s = abiguest.Stat{Size: ms.Size, Blocks: ms.Blocks, Blksize: ms.Blksize, Mode: ms.Mode, Nlink: ms.Nlink, Ino: ms.Ino}
		case *luo.Device:
			// A misc character device node, crw------- (10, dynamic).
			s = abiguest.Stat{Blksize: 4096, Mode: unix.S_IFCHR | 0o600, Nlink: 1}
		default:
			// An anonymous inode: no file type bits, mode 0600.
			s = abiguest.Stat{Blksize: 4096, Mode: 0o600, Nlink: 1}
		}
		b := make([]byte, abiguest.StatSize)
		s.Encode(b)
		return 0, b, nil
	})
}

// fcntl is fcntl(2) for the commands guests have: F_GETFD, F_SETFD,
// F_GETFL, F_DUPFD, F_DUPFD_CLOEXEC, F_ADD_SEALS and F_GET_SEALS. Any other
// command is EINVAL, as Linux answers a command it does not know; a bad fd
// is EBADF whatever the command.
func (c *syscall) fcntl() (int64, []byte, error) {
	fdt := c.p.fdt
	fd, cmd, arg := c.fd(0), int(int32(c.h.Args[1])), c.h.Args[2]
	d, err := fdt.get(fd)
	if err != nil {
		return 0, nil, err
	}
	d.file.DecRef()
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
		// f_dupfd: a bad fd is EBADF before the bound is checked.
		d, err := fdt.get(fd)
		if err != nil {
			return 0, nil, err
		}
		defer d.file.DecRef()
		// f_dupfd takes the argument as an int: the high bits go.
		min := int64(int32(arg))
		if min < 0 || min >= MaxFDs {
			return 0, nil, unix.EINVAL
		}
		nfd, err := fdt.install(d.file, d.statusFlags, cmd == unix.F_DUPFD_CLOEXEC, int(min))
		return int64(nfd), nil, err
	case unix.F_GETFL:
		return c.withFile(func(d descriptor) (int64, []byte, error) {
			return int64(d.statusFlags), nil, nil
		})
	case unix.F_ADD_SEALS:
		return c.onMemfd(unix.EINVAL, func(f *memfd.File) (int64, []byte, error) {
			return 0, nil, f.AddSeals(uint32(arg))
		})
	case unix.F_GET_SEALS:
		return c.onMemfd(unix.EINVAL, func(f *memfd.File) (int64, []byte, error) {
			s, err := f.GetSeals()
			return int64(s), nil, err
		})
	}
	return 0, nil, unix.EINVAL
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
	fd, err := c.p.fdt.install(dev, flags&unix.O_ACCMODE|oLargefile, flags&unix.O_CLOEXEC != 0, 0)
	return int64(fd), nil, err
}

// ioctl is ioctl(2): first the generic commands of do_vfs_ioctl (FIOCLEX,
// FIONCLEX, FIONBIO, FIOASYNC; FIONREAD and FIOQSIZE on a memfd), whose
// int or loff_t argument is the payload (shorter: EFAULT, as a bad
// pointer); then /dev/liveupdate and session fds take the uapi structs as
// bytes; a memfd has no other ioctl (ENOTTY).
func (c *syscall) ioctl() (int64, []byte, error) {
	arg, err := c.smallPayload()
	if err != nil {
		return 0, nil, err
	}
	cmd := uint32(c.h.Args[1])
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		if res, reply, err, ok := c.genericIoctl(d, cmd, arg); ok {
			return res, reply, err
		}
		f, ok := d.file.(ioctlFile)
		if !ok {
			return 0, nil, unix.ENOTTY
		}
		reply, err := f.Ioctl(c.p.fdt, cmd, arg)
		if err != nil {
			return 0, nil, err
		}
		if len(reply) > abiguest.MaxReplyPayload {
			return 0, nil, errors.New("ioctl reply larger than the protocol allows")
		}
		return 0, reply, nil
	})
}

// genericIoctl runs the do_vfs_ioctl commands; ok is false for any other.
func (c *syscall) genericIoctl(d descriptor, cmd uint32, arg []byte) (res int64, reply []byte, err error, ok bool) {
	fdt, fd := c.p.fdt, c.fd(0)
	intArg := func() (int32, error) {
		if len(arg) < 4 {
			return 0, unix.EFAULT
		}
		return int32(binary.LittleEndian.Uint32(arg)), nil
	}
	memf, isMemfd := d.file.(*memfd.File)
	switch cmd {
	case ioctlFIOCLEX:
		return 0, nil, fdt.SetCloseOnExec(fd, true), true
	case ioctlFIONCLEX:
		return 0, nil, fdt.SetCloseOnExec(fd, false), true
	case ioctlFIONBIO:
		// O_NONBLOCK has no effect on these files.
		_, err := intArg()
		return 0, nil, err, true
	case ioctlFIOASYNC:
		// None of these files has fasync: turning it on is ENOTTY.
		on, err := intArg()
		if err == nil && on != 0 {
			err = unix.ENOTTY
		}
		return 0, nil, err, true
	case ioctlFIONREAD:
		if !isMemfd {
			// Not a regular file: the file's own ioctl decides.
			return 0, nil, nil, false
		}
		if len(arg) < 4 {
			return 0, nil, unix.EFAULT, true
		}
		pos, err := memf.Seek(0, unix.SEEK_CUR)
		if err != nil {
			return 0, nil, err, true
		}
		b := make([]byte, 4)
		binary.LittleEndian.PutUint32(b, uint32(int32(memf.Size()-pos)))
		return 0, b, nil, true
	case ioctlFIOQSIZE:
		if !isMemfd {
			return 0, nil, unix.ENOTTY, true
		}
		if len(arg) < 8 {
			return 0, nil, unix.EFAULT, true
		}
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, uint64(memf.Stat().Blocks*512))
		return 0, b, nil, true
	}
	return 0, nil, nil, false
}
