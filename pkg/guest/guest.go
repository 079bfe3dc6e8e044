// Package guest is the client library of guest programs: Linux-shaped calls
// (MemfdCreate, Read, Write, Pread, Pwrite, Seek, Ftruncate, Fallocate,
// Fstat, fcntl helpers, Close, Dup, Dup3, and the /dev/liveupdate calls
// OpenLiveUpdate, CreateSession, RetrieveSession, PreserveFD, RetrieveFD,
// FinishSession) that a host program makes into its sandbox's sentry.
//
// A Conn is one guest process with its own fd table in the sentry. Calls
// return the errno Linux would give as a unix.Errno, so callers test them
// with errors.Is(err, unix.EBADF). Any other error means the connection
// failed (the sentry went away, for example because it restarted); the
// Conn is then unusable.
//
// A program the sentry launches finds its sandbox through the
// LIVESENTRY_GUEST_SOCKET environment variable: Dial("") uses it. Calls on
// one Conn are serialised; use several Conns for concurrency.
package guest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"golang.org/x/sys/unix"
)

// Conn is a connection to a sentry: one guest process.
type Conn struct {
	// mu serialises calls: it is held from sending a request until its
	// response is read.
	mu sync.Mutex

	// +checklocks:mu
	conn *net.UnixConn
	// +checklocks:mu
	r *bufio.Reader
	// broken is the error that ended the connection, if any.
	//
	// +checklocks:mu
	broken error
	// hdr and rhdr are the buffers of a request's and a response's header.
	//
	// +checklocks:mu
	hdr [abiguest.RequestHeaderSize]byte
	// +checklocks:mu
	rhdr [abiguest.ResponseHeaderSize]byte
	// maps are the process's mappings of sentry files (their own lock).
	maps mappings
}

// SocketPath returns the guest socket path the sentry gave this program,
// from the environment, or "" if there is none.
func SocketPath() string { return os.Getenv(abiguest.EnvSocket) }

// LiveupdateNumber returns the sandbox's liveupdate number when the sentry
// launched this program (0 after a cold boot, n after the n-th live
// restart), or 0 if the environment does not say.
func LiveupdateNumber() uint64 {
	n, _ := strconv.ParseUint(os.Getenv(abiguest.EnvLiveupdateNumber), 10, 64)
	return n
}

// Dial connects to the sentry listening on the guest socket at path, or at
// SocketPath() if path is empty, and performs the version handshake.
func Dial(path string) (*Conn, error) {
	if path == "" {
		path = SocketPath()
		if path == "" {
			return nil, fmt.Errorf("guest: no socket path given and %s is not set", abiguest.EnvSocket)
		}
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("guest: connecting to %s: %w", path, err)
	}
	return NewConn(c)
}

// NewConn performs the handshake on an already connected socket and
// returns the Conn, which owns c.
func NewConn(c *net.UnixConn) (*Conn, error) {
	var b [abiguest.HelloSize]byte
	// Every program that links this package waits at a start gate when
	// it is given one (startgate.go).
	abiguest.Hello{Version: abiguest.Version, Flags: abiguest.HelloStartGate}.Encode(b[:])
	if _, err := c.Write(b[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("guest: sending hello: %w", err)
	}
	r := bufio.NewReaderSize(c, 64<<10)
	if _, err := io.ReadFull(r, b[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("guest: reading the sentry's hello: %w", err)
	}
	h, err := abiguest.DecodeHello(b[:])
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("guest: %w", err)
	}
	if h.Errno == uint32(unix.EPROTONOSUPPORT) {
		c.Close()
		return nil, fmt.Errorf("guest: the sentry (protocol version %d) refused version %d: %w", h.Version, abiguest.Version, unix.Errno(h.Errno))
	}
	if h.Errno != 0 {
		// EAGAIN: the sandbox has as many guests as it takes.
		c.Close()
		return nil, fmt.Errorf("guest: the sentry refused the connection: %w", unix.Errno(h.Errno))
	}
	return &Conn{conn: c, r: r}, nil
}

// Disconnect closes the connection; the sentry closes every fd of this
// guest process, as at process exit.
func (c *Conn) Disconnect() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken == nil {
		c.broken = net.ErrClosed
	}
	return c.conn.Close()
}

// call sends a request with payload and reads the response. Data frames
// go to dst (nil for calls that have none). It returns the result, the
// reply payload and the call's error.
//
// A call that a restart's pause interrupted before doing anything is sent
// again: it waits in the sentry until the sentry serves again, as Linux
// restarts a syscall that returned -ERESTARTSYS. One interrupted after n
// bytes returns n and errPartial; the caller asks for the rest.
func (c *Conn) call(op abiguest.Op, args []uint64, payload []byte, dst []byte) (int64, []byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		res, reply, err := c.callOnce(op, args, payload, dst)
		if err == errRestartNothing {
			continue
		}
		return res, reply, err
	}
}

// errPartial is call's error when a pause interrupted a read or write
// after the bytes its result counts.
var errPartial = errors.New("interrupted after part of the transfer")

// errRestartNothing is callOnce's error when a pause interrupted the call
// before it did anything.
const errRestartNothing = unix.Errno(abiguest.ErrnoRestart)

// +checklocks:c.mu
func (c *Conn) callOnce(op abiguest.Op, args []uint64, payload []byte, dst []byte) (int64, []byte, error) {
	if c.broken != nil {
		return -1, nil, c.broken
	}
	h := abiguest.RequestHeader{Op: op, DataLen: uint32(len(payload))}
	copy(h.Args[:], args)
	h.Encode(c.hdr[:])
	bufs := net.Buffers{c.hdr[:], payload}
	if _, err := bufs.WriteTo(c.conn); err != nil {
		return -1, nil, c.fail(fmt.Errorf("sending %s: %w", op, err))
	}
	got := 0
	for {
		if _, err := io.ReadFull(c.r, c.rhdr[:]); err != nil {
			return -1, nil, c.fail(fmt.Errorf("reading the response to %s: %w", op, err))
		}
		rh, err := abiguest.DecodeResponseHeader(c.rhdr[:])
		if err != nil {
			return -1, nil, c.fail(fmt.Errorf("response to %s: %w", op, err))
		}
		switch rh.Kind {
		case abiguest.KindData:
			if uint64(got)+uint64(rh.Len) > uint64(len(dst)) {
				return -1, nil, c.fail(fmt.Errorf("response to %s: %d data bytes for a %d-byte buffer", op, got+int(rh.Len), len(dst)))
			}
			if _, err := io.ReadFull(c.r, dst[got:got+int(rh.Len)]); err != nil {
				return -1, nil, c.fail(fmt.Errorf("reading data of %s: %w", op, err))
			}
			got += int(rh.Len)
		case abiguest.KindFatal:
			msg := make([]byte, rh.Len)
			io.ReadFull(c.r, msg)
			return -1, nil, c.fail(fmt.Errorf("the sentry closed the connection during %s: %s", op, msg))
		case abiguest.KindResult:
			reply := make([]byte, rh.Len)
			if _, err := io.ReadFull(c.r, reply); err != nil {
				return -1, nil, c.fail(fmt.Errorf("reading the reply of %s: %w", op, err))
			}
			if rh.Errno == abiguest.ErrnoRestart {
				switch {
				case rh.Result < 0 || rh.Result > int64(max(len(payload), len(dst))) || dst != nil && rh.Result != int64(got):
					return -1, nil, c.fail(fmt.Errorf("response to %s: interrupted after %d bytes, with %d data bytes, of a %d-byte transfer", op, rh.Result, got, max(len(payload), len(dst))))
				case rh.Result == 0:
					return 0, nil, errRestartNothing
				}
				return rh.Result, nil, errPartial
			}
			if rh.Errno != 0 {
				return -1, nil, unix.Errno(rh.Errno)
			}
			if dst != nil && rh.Result != int64(got) {
				return -1, nil, c.fail(fmt.Errorf("response to %s: result %d but %d data bytes", op, rh.Result, got))
			}
			return rh.Result, reply, nil
		}
	}
}

// transfer runs a read or write of len(p) bytes (one request each: op
// with args, then off advanced for a positioned one) until it is done or
// stops short: a pause that interrupted it after some bytes has it carry
// on for the rest, so the caller sees one call, as with Linux's
// restarted syscalls.
func (c *Conn) transfer(op abiguest.Op, fd int, p []byte, off int64, write bool) (int, error) {
	done := 0
	for {
		rest := p[done:]
		var args []uint64
		switch op {
		case abiguest.OpRead:
			args = []uint64{uint64(fd), uint64(len(rest))}
		case abiguest.OpPread64:
			args = []uint64{uint64(fd), uint64(len(rest)), uint64(off + int64(done))}
		case abiguest.OpWrite:
			args = []uint64{uint64(fd)}
		case abiguest.OpPwrite64:
			args = []uint64{uint64(fd), uint64(off + int64(done))}
		}
		var n int64
		var err error
		if write {
			n, _, err = c.call(op, args, rest, nil)
		} else {
			n, _, err = c.call(op, args, nil, rest)
		}
		switch {
		case err == errPartial:
			done += int(n)
			if done < len(p) {
				continue
			}
			return done, nil
		case err != nil && done > 0:
			// The call restarted for the rest failed: what was done
			// counts, as a short transfer.
			return done, nil
		case err != nil:
			return int(n), err
		}
		return done + int(n), nil
	}
}

// fail marks the connection broken with err and returns it.
//
// +checklocks:c.mu
func (c *Conn) fail(err error) error {
	ce := &ConnError{Err: err}
	c.broken = ce
	c.conn.Close()
	return ce
}

// ConnError is the error of a call whose connection failed (the sentry
// went away or broke the protocol), as opposed to a unix.Errno the sentry
// returned. The Conn is unusable afterwards.
type ConnError struct {
	// Err is what failed.
	Err error
}

// Error implements error.
func (e *ConnError) Error() string { return "guest: connection failed: " + e.Err.Error() }

// Unwrap returns e.Err.
func (e *ConnError) Unwrap() error { return e.Err }

func (c *Conn) fdResult(op abiguest.Op, args []uint64, payload []byte) (int, error) {
	r, _, err := c.call(op, args, payload, nil)
	return int(r), err
}

// MemfdCreate is memfd_create(2): it returns the new fd.
func (c *Conn) MemfdCreate(name string, flags uint) (int, error) {
	return c.fdResult(abiguest.OpMemfdCreate, []uint64{uint64(flags)}, append([]byte(name), 0))
}

// Close is close(2).
func (c *Conn) Close(fd int) error {
	_, err := c.fdResult(abiguest.OpClose, []uint64{uint64(fd)}, nil)
	return err
}

// Dup is dup(2).
func (c *Conn) Dup(fd int) (int, error) {
	return c.fdResult(abiguest.OpDup, []uint64{uint64(fd)}, nil)
}

// Dup3 is dup3(2).
func (c *Conn) Dup3(oldfd, newfd, flags int) (int, error) {
	return c.fdResult(abiguest.OpDup3, []uint64{uint64(oldfd), uint64(newfd), uint64(flags)}, nil)
}

// Read is read(2): it reads up to len(p) bytes from the file position.
func (c *Conn) Read(fd int, p []byte) (int, error) {
	return c.transfer(abiguest.OpRead, fd, p, 0, false)
}

// Pread is pread64(2).
func (c *Conn) Pread(fd int, p []byte, off int64) (int, error) {
	return c.transfer(abiguest.OpPread64, fd, p, off, false)
}

// Write is write(2).
func (c *Conn) Write(fd int, p []byte) (int, error) {
	if len(p) > abiguest.MaxWritePayload {
		p = p[:abiguest.MaxWritePayload]
	}
	return c.transfer(abiguest.OpWrite, fd, p, 0, true)
}

// Pwrite is pwrite64(2).
func (c *Conn) Pwrite(fd int, p []byte, off int64) (int, error) {
	if len(p) > abiguest.MaxWritePayload {
		p = p[:abiguest.MaxWritePayload]
	}
	return c.transfer(abiguest.OpPwrite64, fd, p, off, true)
}

// Seek is lseek(2).
func (c *Conn) Seek(fd int, off int64, whence int) (int64, error) {
	r, _, err := c.call(abiguest.OpLseek, []uint64{uint64(fd), uint64(off), uint64(whence)}, nil, nil)
	return r, err
}

// Ftruncate is ftruncate(2).
func (c *Conn) Ftruncate(fd int, length int64) error {
	_, _, err := c.call(abiguest.OpFtruncate, []uint64{uint64(fd), uint64(length)}, nil, nil)
	return err
}

// Fallocate is fallocate(2).
func (c *Conn) Fallocate(fd int, mode uint32, off, length int64) error {
	_, _, err := c.call(abiguest.OpFallocate, []uint64{uint64(fd), uint64(mode), uint64(off), uint64(length)}, nil, nil)
	return err
}

// Stat is what Fstat returns.
type Stat = abiguest.Stat

// Fstat is fstat(2): size, blocks, block size, mode, link count, inode.
func (c *Conn) Fstat(fd int) (Stat, error) {
	_, reply, err := c.call(abiguest.OpFstat, []uint64{uint64(fd)}, nil, nil)
	if err != nil {
		return Stat{}, err
	}
	s, err := abiguest.DecodeStat(reply)
	if err != nil {
		c.mu.Lock()
		err = c.fail(err)
		c.mu.Unlock()
	}
	return s, err
}

// Fcntl is fcntl(2) with an integer argument.
func (c *Conn) Fcntl(fd, cmd int, arg uint64) (int, error) {
	return c.fdResult(abiguest.OpFcntl, []uint64{uint64(fd), uint64(cmd), arg}, nil)
}

// GetFD is fcntl(fd, F_GETFD).
func (c *Conn) GetFD(fd int) (int, error) { return c.Fcntl(fd, unix.F_GETFD, 0) }

// SetFD is fcntl(fd, F_SETFD, flags).
func (c *Conn) SetFD(fd, flags int) error {
	_, err := c.Fcntl(fd, unix.F_SETFD, uint64(flags))
	return err
}

// GetFL is fcntl(fd, F_GETFL).
func (c *Conn) GetFL(fd int) (int, error) { return c.Fcntl(fd, unix.F_GETFL, 0) }

// AddSeals is fcntl(fd, F_ADD_SEALS, seals).
func (c *Conn) AddSeals(fd int, seals int) error {
	_, err := c.Fcntl(fd, unix.F_ADD_SEALS, uint64(seals))
	return err
}

// GetSeals is fcntl(fd, F_GET_SEALS).
func (c *Conn) GetSeals(fd int) (int, error) { return c.Fcntl(fd, unix.F_GET_SEALS, 0) }

// Open is open(2). The only file a guest can open is /dev/liveupdate.
func (c *Conn) Open(path string, flags int) (int, error) {
	return c.fdResult(abiguest.OpOpen, []uint64{uint64(flags)}, append([]byte(path), 0))
}

// Ioctl is ioctl(2) with arg the bytes of the argument struct; it returns
// the bytes the sentry copied back.
func (c *Conn) Ioctl(fd int, cmd uint32, arg []byte) ([]byte, error) {
	_, reply, err := c.call(abiguest.OpIoctl, []uint64{uint64(fd), uint64(cmd)}, arg, nil)
	return reply, err
}

// OpenLiveUpdate opens /dev/liveupdate (O_RDWR|O_CLOEXEC). Only one
// descriptor of it may be open in the sandbox at a time (EBUSY).
func (c *Conn) OpenLiveUpdate() (int, error) {
	return c.Open("/dev/liveupdate", unix.O_RDWR|unix.O_CLOEXEC)
}

// sessionIoctl is LIVEUPDATE_IOCTL_CREATE_SESSION or _RETRIEVE_SESSION.
func (c *Conn) sessionIoctl(devFD int, cmd uint32, name string) (int, error) {
	if len(name) >= abiluo.SessionNameLength {
		// The kernel copies at most 63 bytes and a NUL; a longer name
		// is a different name.
		return -1, unix.EINVAL
	}
	s := abiluo.CreateSession{Size: abiluo.CreateSessionSize}
	copy(s.Name[:], name)
	b := make([]byte, abiluo.CreateSessionSize)
	s.Encode(b)
	reply, err := c.Ioctl(devFD, cmd, b)
	if err != nil {
		return -1, err
	}
	if err := s.Decode(reply); err != nil {
		return -1, fmt.Errorf("guest: session ioctl reply: %w", err)
	}
	return int(s.FD), nil
}

// CreateSession is LIVEUPDATE_IOCTL_CREATE_SESSION: a new outgoing session
// named name; it returns the session fd (O_CLOEXEC). Closing the last fd of
// the session before the restart unpreserves everything in it.
func (c *Conn) CreateSession(devFD int, name string) (int, error) {
	return c.sessionIoctl(devFD, abiluo.IoctlCreateSession, name)
}

// RetrieveSession is LIVEUPDATE_IOCTL_RETRIEVE_SESSION: the session the
// previous sentry preserved under name (ENOENT if none, EINVAL if already
// retrieved).
func (c *Conn) RetrieveSession(devFD int, name string) (int, error) {
	return c.sessionIoctl(devFD, abiluo.IoctlRetrieveSession, name)
}

// PreserveFD is LIVEUPDATE_SESSION_PRESERVE_FD: preserve the file behind
// fd in the session under token.
func (c *Conn) PreserveFD(sessionFD, fd int, token uint64) error {
	s := abiluo.SessionFD{Size: abiluo.SessionPreserveFDSize, FD: int32(fd), Token: token}
	b := make([]byte, abiluo.SessionPreserveFDSize)
	s.Encode(b)
	_, err := c.Ioctl(sessionFD, abiluo.IoctlSessionPreserve, b)
	return err
}

// RetrieveFD is LIVEUPDATE_SESSION_RETRIEVE_FD: a new fd (O_CLOEXEC) for
// the file preserved under token.
func (c *Conn) RetrieveFD(sessionFD int, token uint64) (int, error) {
	s := abiluo.SessionFD{Size: abiluo.SessionRetrieveFDSize, Token: token}
	b := make([]byte, abiluo.SessionRetrieveFDSize)
	s.Encode(b)
	reply, err := c.Ioctl(sessionFD, abiluo.IoctlSessionRetrieve, b)
	if err != nil {
		return -1, err
	}
	if err := s.Decode(reply); err != nil {
		return -1, fmt.Errorf("guest: retrieve reply: %w", err)
	}
	return int(s.FD), nil
}

// FinishSession is LIVEUPDATE_SESSION_FINISH: the session's files are the
// guest's own from now on and LUO lets go of them.
func (c *Conn) FinishSession(sessionFD int) error {
	s := abiluo.SessionFinish{Size: abiluo.SessionFinishSize}
	b := make([]byte, abiluo.SessionFinishSize)
	s.Encode(b)
	_, err := c.Ioctl(sessionFD, abiluo.IoctlSessionFinish, b)
	return err
}

// IsErrno reports whether err is a Linux errno from the sentry, rather
// than a failure of the connection.
func IsErrno(err error) bool {
	var ce *ConnError
	if errors.As(err, &ce) {
		return false
	}
	var e unix.Errno
	return errors.As(err, &e)
}
