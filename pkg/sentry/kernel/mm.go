package kernel

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// memoryMap is a guest process's mappings of sentry files (its mm_struct,
// as far as the sentry sees it): each mapping pins the folios it maps
// until the guest unmaps it, execs or goes away. It is safe for concurrent
// use.
type memoryMap struct {
	mu sync.Mutex
	// +checklocks:mu
	maps map[uint64]vfs.Mapping
	// +checklocks:mu
	lastID uint64
}

// add records m and returns its id.
func (mm *memoryMap) add(m vfs.Mapping) uint64 {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	if mm.maps == nil {
		mm.maps = make(map[uint64]vfs.Mapping)
	}
	mm.lastID++
	mm.maps[mm.lastID] = m
	return mm.lastID
}

// unmap unpins pages [first, first+n) of mapping id, forgetting the
// mapping once it holds nothing. EINVAL for an unknown id or a range
// outside the mapping.
func (mm *memoryMap) unmap(id, first, n uint64) error {
	mm.mu.Lock()
	m, ok := mm.maps[id]
	if ok && first == 0 && n == m.Pages() {
		delete(mm.maps, id)
	}
	mm.mu.Unlock()
	if !ok {
		return unix.EINVAL
	}
	if first == 0 && n == m.Pages() {
		m.Release()
		return nil
	}
	return m.Unmap(first, n)
}

// releaseAll unpins every mapping (exit, exec).
func (mm *memoryMap) releaseAll() {
	mm.mu.Lock()
	maps := mm.maps
	mm.maps = nil
	mm.mu.Unlock()
	for _, m := range maps {
		m.Release()
	}
}

// drop forgets every mapping without unpinning anything: the memory file
// is the next sentry's (Handoff).
func (mm *memoryMap) drop() {
	mm.mu.Lock()
	mm.maps = nil
	mm.mu.Unlock()
}

// fork returns a copy with pins of its own, the ids kept (the child's
// address space is a copy of the parent's).
func (mm *memoryMap) fork() *memoryMap {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	c := &memoryMap{lastID: mm.lastID, maps: make(map[uint64]vfs.Mapping, len(mm.maps))}
	for id, m := range mm.maps {
		c.maps[id] = m.Clone()
	}
	return c
}

// adopt takes over the mappings of from, which must not be used again.
// The map must be empty.
func (mm *memoryMap) adopt(from *memoryMap) {
	from.mu.Lock()
	maps, last := from.maps, from.lastID
	from.maps = nil
	from.mu.Unlock()
	mm.mu.Lock()
	mm.maps, mm.lastID = maps, last
	mm.mu.Unlock()
}

// len returns the number of mappings.
func (mm *memoryMap) len() int {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	return len(mm.maps)
}

// mmap is mmap(2): the memory file goes out in a KindFile frame, the
// mapping's runs in data frames, and the result is the mapping's id.
func (c *syscall) mmap() (int64, []byte, error) {
	a := c.h.Args
	opts := vfs.MmapOpts{Offset: a[1], Length: a[2], Prot: int(int32(a[3])), Flags: int(int32(a[4]))}
	if opts.Flags&unix.MAP_ANONYMOUS != 0 {
		// The guest maps anonymous memory itself; an fd with it is a
		// guest library bug.
		return 0, nil, unix.EINVAL
	}
	return c.withFile(func(d descriptor) (int64, []byte, error) {
		m, err := vfs.Mmap(d.file, d.statusFlags, opts)
		if err != nil {
			return 0, nil, err
		}
		// The frames go out once the call is out of the dispatch gate,
		// so that a guest slow to read them does not hold a pause. The
		// mapping is the process's from here on: if they fail, the
		// connection ends and the process's mappings are released.
		c.post = func() error { return c.sendMapping(m) }
		reply := make([]byte, abiguest.MmapReplySize)
		if m.MayWrite() {
			binary.LittleEndian.PutUint64(reply, abiguest.MmapMayWrite)
		}
		return int64(c.p.mm.add(m)), reply, nil
	})
}

// sendMapping sends the memory file (SCM_RIGHTS on a KindFile frame) and
// m's runs (data frames).
func (c *syscall) sendMapping(m vfs.Mapping) error {
	p := c.p
	var hdr [abiguest.ResponseHeaderSize]byte
	rh := abiguest.ResponseHeader{Kind: abiguest.KindFile}
	rh.Encode(hdr[:])
	if _, _, err := p.conn.WriteMsgUnix(hdr[:], unix.UnixRights(p.k.mf.FD()), nil); err != nil {
		return fmt.Errorf("sending the memory file: %w", err)
	}
	runs := m.Runs()
	const perFrame = 1 << 14
	buf := make([]byte, min(len(runs), perFrame)*abiguest.MmapRunSize)
	w := dataWriter{p: p}
	for len(runs) > 0 {
		n := min(len(runs), perFrame)
		for i := range n {
			runs[i].Encode(buf[i*abiguest.MmapRunSize:])
		}
		if _, err := w.Write(buf[:n*abiguest.MmapRunSize]); err != nil {
			return fmt.Errorf("sending the mapping's runs: %w", err)
		}
		runs = runs[n:]
	}
	return nil
}

// forkedChild is a forked child's copy of its parent's fd table and
// mappings, waiting for the child's connection to attach it.
type forkedChild struct {
	fdt   *FDTable
	mm    *memoryMap
	timer *time.Timer
}

// forkTimeout is how long a forked child waits to be attached.
var forkTimeout = abiguest.ForkTimeoutSeconds * time.Second

// fork is the parent's half of fork(2): it copies the fd table and the
// mappings into a child that waits for a connection to attach it, and
// returns the child's token.
func (c *syscall) fork() (int64, []byte, error) {
	k := c.p.k
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return 0, nil, unix.EAGAIN
	}
	token := binary.LittleEndian.Uint64(b[:]) >> 1
	if token == 0 {
		token = 1
	}
	child := &forkedChild{fdt: c.p.fdt.Fork(), mm: c.p.mm.fork()}
	k.mu.Lock()
	if k.handedOver || k.shutdown {
		k.mu.Unlock()
		child.release()
		return 0, nil, unix.EAGAIN
	}
	if k.forks == nil {
		k.forks = make(map[uint64]*forkedChild)
	}
	k.forks[token] = child
	k.mu.Unlock()
	child.timer = time.AfterFunc(forkTimeout, func() {
		if ch := k.takeFork(token); ch != nil {
			k.logf("forked child %#x never attached: its fds are closed", token)
			ch.release()
		}
	})
	return int64(token), nil, nil
}

// release closes a child that never attached.
func (ch *forkedChild) release() {
	ch.fdt.CloseAll()
	ch.mm.releaseAll()
}

// takeFork removes and returns the forked child of token, or nil.
func (k *Kernel) takeFork(token uint64) *forkedChild {
	k.mu.Lock()
	defer k.mu.Unlock()
	ch := k.forks[token]
	delete(k.forks, token)
	return ch
}

// attach is the child's half of fork(2): the connection becomes the forked
// child. EBUSY if this process has fds or mappings already; EINVAL for an
// unknown or expired token.
func (c *syscall) attach() (int64, []byte, error) {
	p := c.p
	if p.fdt.Len() != 0 || p.mm.len() != 0 {
		return 0, nil, unix.EBUSY
	}
	ch := p.k.takeFork(c.h.Args[0])
	if ch == nil {
		return 0, nil, unix.EINVAL
	}
	ch.timer.Stop()
	p.fdt.adopt(ch.fdt)
	p.mm.adopt(ch.mm)
	return 0, nil, nil
}

// execve is the process telling the sentry it has exec'd: FD_CLOEXEC fds
// are closed and every mapping is dropped.
func (c *syscall) execve() (int64, []byte, error) {
	c.p.fdt.CloseOnExecFDs()
	c.p.mm.releaseAll()
	return 0, nil, nil
}
