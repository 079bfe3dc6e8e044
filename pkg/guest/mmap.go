package guest

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

const pageSize = 4096

// mapping is one mmap of a sentry file in this process.
type mapping struct {
	addr, length uintptr
	id           uint64
	mayWrite     bool
}

// mappings are a process's mappings of sentry files, by address.
type mappings struct {
	mu sync.Mutex
	// +checklocks:mu
	list []mapping
}

func (ms *mappings) add(m mapping) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	i := 0
	for i < len(ms.list) && ms.list[i].addr <= m.addr {
		i++
	}
	ms.list = append(ms.list, mapping{})
	copy(ms.list[i+1:], ms.list[i:])
	ms.list[i] = m
}

// overlapping returns the mappings that overlap [addr, addr+length) and
// removes those the range covers entirely.
func (ms *mappings) overlapping(addr, length uintptr) []mapping {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	var out []mapping
	keep := ms.list[:0]
	for _, m := range ms.list {
		if m.addr < addr+length && addr < m.addr+m.length {
			out = append(out, m)
			if addr <= m.addr && m.addr+m.length <= addr+length {
				continue
			}
		}
		keep = append(keep, m)
	}
	ms.list = keep
	return out
}

// find returns the mapping holding addr.
func (ms *mappings) find(addr uintptr) (mapping, bool) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	for _, m := range ms.list {
		if m.addr <= addr && addr < m.addr+m.length {
			return m, true
		}
	}
	return mapping{}, false
}

// unpin unpins in the sentry the pages of [addr, addr+length) that
// mappings of sentry files held.
func (c *Conn) unpin(addr, length uintptr) error {
	for _, m := range c.maps.overlapping(addr, length) {
		s, t := max(addr, m.addr), min(addr+length, m.addr+m.length)
		if err := c.munmapCall(m.id, uint64(s-m.addr)/pageSize, uint64(t-s)/pageSize); err != nil {
			return err
		}
	}
	return nil
}

// Msync is msync(2) of b. A sentry memfd's mapping shares its pages with
// the file, so there is nothing to write back; the host checks the
// arguments (EINVAL, ENOMEM for an unmapped range, EBUSY).
func (c *Conn) Msync(b []byte, flags int) error {
	return unix.Msync(b, flags)
}

// Mprotect is mprotect(2) of b. Making a shared mapping of a write-sealed
// memfd writable is EACCES, as Linux refuses it (VM_MAYWRITE cleared).
func (c *Conn) Mprotect(b []byte, prot int) error {
	if len(b) > 0 && prot&unix.PROT_WRITE != 0 {
		if m, ok := c.maps.find(addrOf(b)); ok && !m.mayWrite {
			return unix.EACCES
		}
	}
	return unix.Mprotect(b, prot)
}

// mmapCall makes the mmap call: it returns the memory file, the runs, the
// mapping's id and its flags.
func (c *Conn) mmapCall(fd int, off, length uint64, prot, flags int) (*os.File, []abiguest.MmapRun, uint64, uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return nil, nil, 0, 0, c.broken
	}
	h := abiguest.RequestHeader{Op: abiguest.OpMmap, Args: [5]uint64{uint64(fd), off, length, uint64(prot), uint64(flags)}}
	h.Encode(c.hdr[:])
	if _, err := c.conn.Write(c.hdr[:]); err != nil {
		return nil, nil, 0, 0, c.fail(fmt.Errorf("sending mmap: %w", err))
	}
	if c.r.Buffered() != 0 {
		return nil, nil, 0, 0, c.fail(fmt.Errorf("mmap: %d unread bytes before the response", c.r.Buffered()))
	}
	// The first frame is read from the socket itself, so that the file
	// it carries arrives with it.
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := c.conn.ReadMsgUnix(c.rhdr[:], oob)
	if err == nil && n < len(c.rhdr) {
		_, err = io.ReadFull(c.r, c.rhdr[n:])
	}
	if err != nil {
		return nil, nil, 0, 0, c.fail(fmt.Errorf("reading the response to mmap: %w", err))
	}
	var mem *os.File
	if oobn > 0 {
		if mem, err = receivedFile(oob[:oobn]); err != nil {
			return nil, nil, 0, 0, c.fail(fmt.Errorf("the memory file: %w", err))
		}
	}
	var runs []abiguest.MmapRun
	var data []byte
	for {
		rh, err := abiguest.DecodeResponseHeader(c.rhdr[:])
		if err != nil {
			mem.Close()
			return nil, nil, 0, 0, c.fail(fmt.Errorf("response to mmap: %w", err))
		}
		switch rh.Kind {
		case abiguest.KindFile:
			if mem == nil {
				return nil, nil, 0, 0, c.fail(fmt.Errorf("response to mmap: a file frame without a file"))
			}
		case abiguest.KindData:
			if rh.Len%abiguest.MmapRunSize != 0 || uint64(len(data))+uint64(rh.Len) > (length/pageSize+1)*abiguest.MmapRunSize {
				mem.Close()
				return nil, nil, 0, 0, c.fail(fmt.Errorf("response to mmap: %d bytes of runs", len(data)+int(rh.Len)))
			}
			start := len(data)
			data = append(data, make([]byte, rh.Len)...)
			if _, err := io.ReadFull(c.r, data[start:]); err != nil {
				mem.Close()
				return nil, nil, 0, 0, c.fail(fmt.Errorf("reading mmap's runs: %w", err))
			}
		case abiguest.KindFatal:
			mem.Close()
			msg := make([]byte, rh.Len)
			io.ReadFull(c.r, msg)
			return nil, nil, 0, 0, c.fail(fmt.Errorf("the sentry closed the connection during mmap: %s", msg))
		case abiguest.KindResult:
			reply := make([]byte, rh.Len)
			if _, err := io.ReadFull(c.r, reply); err != nil {
				mem.Close()
				return nil, nil, 0, 0, c.fail(fmt.Errorf("reading the reply of mmap: %w", err))
			}
			if rh.Errno != 0 {
				mem.Close()
				return nil, nil, 0, 0, unix.Errno(rh.Errno)
			}
			if mem == nil || len(reply) != abiguest.MmapReplySize || rh.Result <= 0 {
				mem.Close()
				return nil, nil, 0, 0, c.fail(fmt.Errorf("response to mmap: result %d, %d reply bytes, memory file %v", rh.Result, len(reply), mem != nil))
			}
			mapLen := (length + pageSize - 1) &^ (pageSize - 1)
			for i := 0; i < len(data); i += abiguest.MmapRunSize {
				r, err := abiguest.DecodeMmapRun(data[i:i+abiguest.MmapRunSize], mapLen)
				if err != nil {
					mem.Close()
					return nil, nil, 0, 0, c.fail(fmt.Errorf("response to mmap: %w", err))
				}
				runs = append(runs, r)
			}
			return mem, runs, uint64(rh.Result), binary.LittleEndian.Uint64(reply), nil
		}
		if _, err := io.ReadFull(c.r, c.rhdr[:]); err != nil {
			mem.Close()
			return nil, nil, 0, 0, c.fail(fmt.Errorf("reading the response to mmap: %w", err))
		}
	}
}

// receivedFile returns the one file an SCM_RIGHTS message carries,
// close-on-exec.
func receivedFile(oob []byte) (*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return nil, err
		}
		fds = append(fds, got...)
	}
	if len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("%d files came, want 1", len(fds))
	}
	unix.CloseOnExec(fds[0])
	return os.NewFile(uintptr(fds[0]), "memory-file"), nil
}

// munmapCall unpins pages [first, first+n) of mapping id in the sentry.
func (c *Conn) munmapCall(id, first, n uint64) error {
	_, _, err := c.call(abiguest.OpMunmap, []uint64{id, first, n}, nil, nil)
	return err
}

// ForkToken is the parent's half of fork(2) for a program that forks
// itself: the sentry copies this process's fd table and mappings for a
// child, which attaches them with Attach on its own connection within
// abiguest.ForkTimeoutSeconds.
func (c *Conn) ForkToken() (uint64, error) {
	r, _, err := c.call(abiguest.OpFork, nil, nil, nil)
	return uint64(r), err
}

// Attach is the child's half of fork(2): this new connection becomes the
// child whose copy ForkToken made. EINVAL for an unknown or expired token,
// EBUSY if this connection has fds already.
func (c *Conn) Attach(token uint64) error {
	_, _, err := c.call(abiguest.OpAttach, []uint64{token}, nil, nil)
	return err
}

// Exec tells the sentry this process has exec'd: its FD_CLOEXEC fds are
// closed and its mappings dropped, as a successful execve does.
func (c *Conn) Exec() error {
	_, _, err := c.call(abiguest.OpExecve, nil, nil, nil)
	if err == nil {
		c.maps.mu.Lock()
		c.maps.list = nil
		c.maps.mu.Unlock()
	}
	return err
}
