package handover

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// maxMessage bounds a message's JSON.
	maxMessage = 1 << 20
	// maxFiles bounds the files one message carries.
	maxFiles = 16
)

// Channel is one end of the transfer-mode socket pair between two
// sentries.
type Channel struct {
	conn *net.UnixConn
}

// NewChannel wraps a connected Unix stream socket; the Channel owns it.
func NewChannel(f *os.File) (*Channel, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("handover channel: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("handover channel: %T is not a Unix socket", c)
	}
	return &Channel{conn: uc}, nil
}

// Pair returns a connected socket pair: a Channel for this process and the
// other end as a file to give to the new sentry (close-on-exec; os/exec's
// ExtraFiles clears that in the child).
func Pair() (*Channel, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	ch, err := NewChannel(os.NewFile(uintptr(fds[0]), "handover"))
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return ch, os.NewFile(uintptr(fds[1]), "handover-peer"), nil
}

// Close closes the channel.
func (c *Channel) Close() error { return c.conn.Close() }

// SetDeadline sets the deadline of every later Send and Recv.
func (c *Channel) SetDeadline(t time.Time) error { return c.conn.SetDeadline(t) }

// WarmCodecs encodes and decodes a value of each message of the protocol,
// and of each of extra, so that encoding/json has built its codecs for
// their types before a restart's blackout needs them: it builds a type's
// codec by reflection on the type's first use, which took 0.1-0.5 ms per
// type here (a 4 KiB notice: 456 us the first time, 22-60 us after).
// Both sentries call it before the pause.
func WarmCodecs(extra ...any) {
	msgs := []any{&Ready{Reads: []string{""}}, &Descriptor{Compatibles: []string{""}, Sandbox: []byte("{}"), OldGuests: []int{0}}, &Ack{}, &Commit{}, &Serving{}}
	for _, v := range append(msgs, extra...) {
		if b, err := json.Marshal(v); err == nil {
			json.Unmarshal(b, v)
		}
	}
}

// Send sends msg as JSON with files attached (SCM_RIGHTS).
func (c *Channel) Send(msg any, files ...*os.File) error {
	b, err := json.Marshal(msg)
	if err != nil {
		return fmt.Errorf("encoding %T: %w", msg, err)
	}
	if len(b) > maxMessage || len(files) > maxFiles {
		return fmt.Errorf("%T: %d bytes and %d files exceed the limits (%d, %d)", msg, len(b), len(files), maxMessage, maxFiles)
	}
	// The header and the body go in one sendmsg, the files with them:
	// the receiver wakes once, with the whole message in its buffer.
	buf := make([]byte, 8+len(b))
	binary.LittleEndian.PutUint32(buf[0:], uint32(len(b)))
	binary.LittleEndian.PutUint32(buf[4:], uint32(len(files)))
	copy(buf[8:], b)
	write := func(oob []byte) error {
		n, _, err := c.conn.WriteMsgUnix(buf, oob, nil)
		if err == nil && n < len(buf) {
			// A stream socket may take part of a large message.
			_, err = c.conn.Write(buf[n:])
		}
		return err
	}
	if len(files) == 0 {
		if err := write(nil); err != nil {
			return fmt.Errorf("sending %T: %w", msg, err)
		}
		return nil
	}
	// The fds are read through SyscallConn, not Fd: Fd would put each
	// file's open file description, which other dups (a listener serving
	// on it) share, into blocking mode.
	fds := make([]int, len(files))
	conns := make([]syscall.RawConn, len(files))
	for i, f := range files {
		rc, err := f.SyscallConn()
		if err != nil {
			return fmt.Errorf("sending %T: file %d: %w", msg, i, err)
		}
		conns[i] = rc
	}
	var send func(i int) error
	send = func(i int) error {
		if i == len(conns) {
			return write(unix.UnixRights(fds...))
		}
		var inner error
		if err := conns[i].Control(func(fd uintptr) {
			fds[i] = int(fd)
			inner = send(i + 1)
		}); err != nil {
			return err
		}
		return inner
	}
	if err := send(0); err != nil {
		return fmt.Errorf("sending %T: %w", msg, err)
	}
	return nil
}

// Recv receives a message into msg (a pointer) and returns the files that
// came with it, which the caller owns. A malformed message is an error
// naming what was wrong; its files are closed.
func (c *Channel) Recv(msg any) ([]*os.File, error) {
	var hdr [8]byte
	oob := make([]byte, unix.CmsgSpace(maxFiles*4))
	n, oobn, flags, _, err := c.conn.ReadMsgUnix(hdr[:], oob)
	if err != nil {
		return nil, fmt.Errorf("receiving %T: %w", msg, err)
	}
	files, ferr := parseRights(oob[:oobn])
	fail := func(err error) ([]*os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, err
	}
	if ferr != nil {
		return fail(fmt.Errorf("receiving %T: %w", msg, ferr))
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return fail(fmt.Errorf("receiving %T: more than %d files (control data truncated)", msg, maxFiles))
	}
	if n == 0 {
		return fail(fmt.Errorf("receiving %T: %w", msg, io.EOF))
	}
	if n < len(hdr) {
		if _, err := io.ReadFull(c.conn, hdr[n:]); err != nil {
			return fail(fmt.Errorf("receiving %T header: %w", msg, err))
		}
	}
	size, nfiles := binary.LittleEndian.Uint32(hdr[0:]), binary.LittleEndian.Uint32(hdr[4:])
	if size > maxMessage {
		return fail(fmt.Errorf("receiving %T: length %d exceeds %d", msg, size, maxMessage))
	}
	if int(nfiles) != len(files) {
		return fail(fmt.Errorf("receiving %T: header announces %d files, %d came", msg, nfiles, len(files)))
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(c.conn, b); err != nil {
		return fail(fmt.Errorf("receiving %T body: %w", msg, err))
	}
	if err := json.Unmarshal(b, msg); err != nil {
		return fail(fmt.Errorf("decoding %T: %w", msg, err))
	}
	return files, nil
}

// AwaitCommit is the new sentry's step after sending an accepted Ack: it
// waits, without a deadline (the old sentry kills this process if it rolls
// back), for the old sentry's Commit. Any other outcome — the channel ends
// because the old sentry died or closed it, a malformed message, files
// attached — is an error, and the caller must then exit without touching
// the state: the old sentry may have rolled back and be serving it again.
func (c *Channel) AwaitCommit(oldPID int) error {
	if err := c.conn.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("waiting for the old sentry's commit: %w", err)
	}
	var m Commit
	files, err := c.Recv(&m)
	for _, f := range files {
		f.Close()
	}
	switch {
	case err != nil:
		return fmt.Errorf("waiting for the old sentry's commit: %w", err)
	case len(files) != 0:
		return fmt.Errorf("the old sentry's commit came with %d files", len(files))
	case m.PID != oldPID:
		return fmt.Errorf("a commit from pid %d, but the old sentry is pid %d", m.PID, oldPID)
	}
	return nil
}

// parseRights returns the files of every SCM_RIGHTS message in oob.
func parseRights(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control data: %w", err)
	}
	var files []*os.File
	var errs []error
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), "handover-file"))
		}
	}
	if len(errs) > 0 {
		for _, f := range files {
			f.Close()
		}
		return nil, errors.Join(errs...)
	}
	return files, nil
}
