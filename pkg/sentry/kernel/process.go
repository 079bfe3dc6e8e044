package kernel

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

const (
	// handshakeTimeout bounds how long a new connection may take to send
	// its Hello.
	handshakeTimeout = 10 * time.Second
)

// readBufferSize is the size of a guest connection's read buffer.
const readBufferSize = 4 << 10

// A call in progress keeps a restart's Pause waiting, so each call has one
// absolute deadline for all of its I/O with the guest: transferTimeout
// after the call started, plus the time its bytes take at
// minTransferRate. The payload of a write counts from the start; the data
// of a read extends the deadline as it is produced. A guest that drains
// (or sends) slower than that is dropped. Variables so that tests can
// shorten them.
var (
	transferTimeout = 10 * time.Second
	// minTransferRate is in bytes per second.
	minTransferRate int64 = 1 << 20
)

// Process is a guest process: one connection of the guest socket and its fd
// table.
type Process struct {
	k    *Kernel
	id   uint64
	conn *net.UnixConn
	r    *bufio.Reader
	fdt  *FDTable
	// mm is the process's mappings of sentry files.
	mm *memoryMap
	// pid is the host pid of the peer (SO_PEERCRED), 0 if unknown.
	pid int32
	// version is the protocol version the guest speaks (its Hello).
	version uint32
	// helloFlags are the flags of the guest's Hello (StartGated reads
	// them from another goroutine).
	helloFlags atomic.Uint32
	// intr is the process's part in interrupting calls at a pause.
	intr interruptState
	// done is closed when serve has returned.
	done chan struct{}

	// callStart and callBytes are the start of the call in progress and
	// the bytes of I/O allowed for so far (see transferTimeout).
	callStart time.Time
	callBytes int64
}

// allow extends the deadline of the call in progress by n bytes' worth of
// I/O at minTransferRate.
func (p *Process) allow(n int64) {
	p.callBytes += n
	d := transferTimeout + time.Duration(float64(p.callBytes)/float64(minTransferRate)*float64(time.Second))
	p.conn.SetDeadline(p.callStart.Add(d))
	if p.intr.interrupted.Load() {
		// Pause interrupted the call: keep its deadline at now.
		p.conn.SetDeadline(time.Now())
	}
}

// newProcess registers a process for c, or returns nil if the kernel has
// handed over or shut down, or (full) has maxGuests guests already.
func (k *Kernel) newProcess(c *net.UnixConn) (p *Process, full bool) {
	p = &Process{
		k:    k,
		conn: c,
		// Small: every idle guest has one. Reads of a payload larger
		// than the buffer bypass it.
		r:    bufio.NewReaderSize(c, readBufferSize),
		fdt:  &FDTable{},
		mm:   &memoryMap{},
		done: make(chan struct{}),
	}
	if raw, err := c.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
				p.pid = cred.Pid
			}
		})
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.handedOver || k.shutdown {
		return nil, false
	}
	if len(k.procs) >= maxGuests {
		k.logf("guest (pid %d) refused: %d guests connected already", p.pid, len(k.procs))
		return nil, true
	}
	k.lastID++
	p.id = k.lastID
	k.procs[p] = struct{}{}
	return p, false
}

// refuseFull answers a guest over maxGuests: its hello gets EAGAIN, then
// the connection is closed.
func refuseFull(c *net.UnixConn) {
	defer c.Close()
	var b [abiguest.HelloSize]byte
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return
	}
	abiguest.Hello{Version: abiguest.Version, Errno: uint32(unix.EAGAIN)}.Encode(b[:])
	c.Write(b[:])
}

// FDTable returns the process's fd table.
func (p *Process) FDTable() *FDTable { return p.fdt }

// errFatal marks an error after which the connection is closed.
type errFatal struct{ err error }

func (e errFatal) Error() string { return e.err.Error() }
func (e errFatal) Unwrap() error { return e.err }

// serve runs the process until its connection ends.
func (p *Process) serve() {
	k := p.k
	defer func() {
		// A guest that dies while the kernel is paused for a restart
		// is released only once the restart has its outcome, as its
		// calls are held: like a frozen task's SIGKILL, its death takes
		// effect after the thaw. After a handoff its fds (and so its
		// sessions) cross to the next sentry; after a rollback they
		// are closed here. Released at once, the sessions it held
		// would be unpreserved before the freeze, or not, depending on
		// a race with it.
		k.mu.Lock()
		for k.pause != pauseNone && !k.handedOver && !k.shutdown {
			k.cond.Wait()
		}
		handedOver := k.handedOver
		k.mu.Unlock()
		if !handedOver {
			// The guest process is gone: close its fds and unpin its
			// mappings as exit does. It stays in k.procs until then,
			// so that Shutdown waits for this before it unmaps the
			// memory file.
			p.fdt.CloseAll()
			p.mm.releaseAll()
		}
		p.conn.Close()
		k.mu.Lock()
		delete(k.procs, p)
		k.mu.Unlock()
		close(p.done)
	}()
	if err := p.handshake(); err != nil {
		k.logf("guest %d (pid %d): handshake: %v", p.id, p.pid, err)
		return
	}
	var hb [abiguest.RequestHeaderSize]byte
	for {
		p.conn.SetReadDeadline(time.Time{})
		if _, err := io.ReadFull(p.r, hb[:]); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				k.logf("guest %d (pid %d): reading a request: %v", p.id, p.pid, err)
			}
			return
		}
		h, err := abiguest.DecodeRequestHeader(hb[:])
		if err != nil {
			k.logf("guest %d (pid %d): malformed frame: %v", p.id, p.pid, err)
			p.fatal(err.Error())
			return
		}
		if err := p.call(&h); err != nil {
			k.logf("guest %d (pid %d): %s: %v", p.id, p.pid, h.Op, err)
			var fe errFatal
			if errors.As(err, &fe) {
				p.fatal(fe.Error())
			}
			return
		}
	}
}

// handshake exchanges Hellos.
func (p *Process) handshake() error {
	var b [abiguest.HelloSize]byte
	p.conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
	if _, err := io.ReadFull(p.r, b[:]); err != nil {
		return fmt.Errorf("reading hello: %w", err)
	}
	h, err := abiguest.DecodeHello(b[:])
	if err != nil {
		p.fatal(err.Error())
		return err
	}
	p.version = h.Version
	reply := abiguest.Hello{Version: abiguest.Version}
	if h.Version < abiguest.MinVersion || h.Version > abiguest.Version {
		reply.Errno = uint32(unix.EPROTONOSUPPORT)
	} else {
		// Before the answer: once the guest has it, StartGated knows.
		p.helloFlags.Store(h.Flags)
	}
	reply.Encode(b[:])
	p.conn.SetWriteDeadline(time.Now().Add(transferTimeout))
	if _, err := p.conn.Write(b[:]); err != nil {
		return fmt.Errorf("writing hello: %w", err)
	}
	if reply.Errno != 0 {
		return fmt.Errorf("guest speaks protocol version %d, this sentry %d", h.Version, abiguest.Version)
	}
	return nil
}

// call runs one request: it enters the dispatch gate, so a paused kernel
// runs no call, dispatches, and leaves the gate; then it drains whatever
// payload the call did not consume and writes the result frame. Nothing
// done outside the gate touches the kernel's state, so a guest slow to
// send or to read does not hold a pause (see interrupt.go). An error
// return ends the connection.
func (p *Process) call(h *abiguest.RequestHeader) error {
	k := p.k
	if err := k.enter(); err != nil {
		return err
	}
	p.callStart, p.callBytes = time.Now(), 0
	p.allow(int64(h.DataLen))
	c := syscall{p: p, h: h, left: int64(h.DataLen)}
	res, reply, err := c.dispatch()
	k.exit()
	if c.broken != nil {
		return c.broken
	}
	if p.intr.interrupted.Load() {
		p.clearInterrupt()
		p.allow(c.left + int64(len(c.cut)))
	}
	if len(c.cut) > 0 {
		// The rest of a data frame that Pause cut (see dataWriter).
		if _, werr := p.conn.Write(c.cut); werr != nil {
			return fmt.Errorf("sending the rest of an interrupted data frame: %w", werr)
		}
	}
	if c.left > 0 {
		if _, derr := io.CopyN(io.Discard, p.r, c.left); derr != nil {
			return fmt.Errorf("skipping %d payload bytes: %w", c.left, derr)
		}
	}
	if c.post != nil && err == nil {
		if perr := c.post(); perr != nil {
			return perr
		}
	}
	rh := abiguest.ResponseHeader{Kind: abiguest.KindResult, Result: res}
	switch {
	case errors.Is(err, errRestart):
		rh, reply = p.restartResult(res), nil
	case err != nil:
		var errno unix.Errno
		if !errors.As(err, &errno) {
			k.logf("guest %d (pid %d): %s: internal error answered with EIO: %v", p.id, p.pid, h.Op, err)
			errno = unix.EIO
		}
		rh.Errno, rh.Result, reply = uint32(errno), -1, nil
	}
	if len(reply) > abiguest.MaxReplyPayload {
		return fmt.Errorf("reply of %d bytes exceeds the protocol's %d", len(reply), abiguest.MaxReplyPayload)
	}
	rh.Len = uint32(len(reply))
	b := make([]byte, abiguest.ResponseHeaderSize+len(reply))
	rh.Encode(b)
	copy(b[abiguest.ResponseHeaderSize:], reply)
	if _, err := p.conn.Write(b); err != nil {
		return fmt.Errorf("writing the result: %w", err)
	}
	return nil
}

// fatal sends a KindFatal frame carrying msg; errors are ignored since the
// connection is closed next.
func (p *Process) fatal(msg string) {
	if len(msg) > abiguest.MaxReplyPayload {
		msg = msg[:abiguest.MaxReplyPayload]
	}
	rh := abiguest.ResponseHeader{Kind: abiguest.KindFatal, Len: uint32(len(msg))}
	b := make([]byte, abiguest.ResponseHeaderSize+len(msg))
	rh.Encode(b)
	copy(b[abiguest.ResponseHeaderSize:], msg)
	p.conn.SetWriteDeadline(time.Now().Add(time.Second))
	p.conn.Write(b)
}

// dataFrameSize bounds a data frame, and so the copy an interrupted read
// makes of the frame it was cut in.
const dataFrameSize = 1 << 20

// dataWriter sends what is written to it as data frames, each one writev
// of a header and the caller's bytes (slices of the memory file), so file
// contents are not copied on their way to the socket. If c is set, its
// call is interruptible: a frame cut by Pause is counted as sent, the rest
// of it is copied to c.cut for call to send once out of the gate, and
// Write returns errRestart.
type dataWriter struct {
	p   *Process
	c   *syscall
	hdr [abiguest.ResponseHeaderSize]byte
	err error
}

// Write implements io.Writer.
func (w *dataWriter) Write(b []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	n := 0
	for len(b) > 0 {
		chunk := b[:min(len(b), dataFrameSize)]
		rh := abiguest.ResponseHeader{Kind: abiguest.KindData, Len: uint32(len(chunk))}
		rh.Encode(w.hdr[:])
		w.p.allow(int64(len(chunk)))
		bufs := net.Buffers{w.hdr[:], chunk}
		sent, err := bufs.WriteTo(w.p.conn)
		if err != nil {
			if w.c == nil || !w.p.interruptedBy(err) {
				w.err = err
				return n, err
			}
			w.err = errRestart
			if sent == 0 {
				return n, errRestart
			}
			// Cut inside the frame: it must be completed, from a copy.
			if h := int64(len(w.hdr)); sent < h {
				w.c.cut = append(append([]byte(nil), w.hdr[sent:]...), chunk...)
			} else {
				w.c.cut = append([]byte(nil), chunk[sent-h:]...)
			}
			return n + len(chunk), errRestart
		}
		n += len(chunk)
		b = b[len(chunk):]
	}
	return n, nil
}
