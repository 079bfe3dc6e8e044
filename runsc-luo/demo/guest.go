// Package demo is runsc-luo's demo: the guest program of "demo" and of the
// end-to-end tests (Guest), and the demo itself (Run), which starts a
// sandbox running that guest, restarts it live and reports what happened.
package demo

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"golang.org/x/sys/unix"
)

// Guest is the demo's guest program. On a cold boot (liveupdate number 0)
// it fills memfds with a pattern derived from Seed and the generation,
// preserves them in sessions and holds the session fds until the restart
// stops it. After a restart it retrieves every file, reads the last byte,
// verifies every byte, finishes the sessions and exits — or, with Cycle,
// writes the next generation's contents into new memfds, preserves them and
// holds again. Each step prints one JSON line (an Event) to stdout.
type Guest struct {
	// Size is the total bytes in the preserved memfds.
	Size int64
	// Files is the number of memfds, Sessions the number of sessions
	// they are spread over.
	Files, Sessions int
	// Seed is the seed of the contents.
	Seed uint64
	// Cycle preserves new contents after verifying, and holds again.
	Cycle bool
	// SmallFolios makes the memfds' page cache 4 KiB folios only (every
	// 2 MiB range is touched with a 1-byte write first).
	SmallFolios bool
}

// Event is one line of the guest's output (JSON).
type Event struct {
	Event      string `json:"event"`
	Generation uint64 `json:"generation"`
	Files      int    `json:"files"`
	Sessions   int    `json:"sessions"`
	Bytes      int64  `json:"bytes"`
	// DataReadyAt is the CLOCK_MONOTONIC time (ns) at which the last byte
	// of the last file had been read after retrieval.
	DataReadyAt int64 `json:"data_ready_at,omitempty"`
	// RunAt is the CLOCK_MONOTONIC time (ns) at which the guest program
	// began to run (Run), after its process was started and its runtime
	// initialised: what a restart's time to data spends before it is the
	// runtime's relaunch, what it spends after it is the guest's own.
	RunAt      int64   `json:"run_at,omitempty"`
	RetrieveMS float64 `json:"retrieve_ms,omitempty"`
	VerifyMS   float64 `json:"verify_ms,omitempty"`
	WriteMS    float64 `json:"write_ms,omitempty"`
	Error      string  `json:"error,omitempty"`
}

func emit(e Event) {
	b, _ := json.Marshal(e)
	fmt.Println(string(b))
}

// splitmix64 is the pattern's mixing function.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// fillPattern writes the pattern of (key) for file offsets [off, off+len(b)),
// off a multiple of 8.
func fillPattern(b []byte, key uint64, off int64) {
	w := uint64(off / 8)
	i := 0
	for ; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], splitmix64(key^w))
		w++
	}
	if i < len(b) {
		var tail [8]byte
		binary.LittleEndian.PutUint64(tail[:], splitmix64(key^w))
		copy(b[i:], tail[:])
	}
}

func patternKey(seed, gen uint64, file int) uint64 {
	return splitmix64(seed ^ splitmix64(gen<<16|uint64(file)))
}

func sessionName(s int) string { return fmt.Sprintf("demo-session-%d", s) }

// fileSizes splits total over n files, each a different size.
func fileSizes(total int64, n int) []int64 {
	sizes := make([]int64, n)
	part := total / int64(n)
	var sum int64
	for i := range sizes {
		sizes[i] = part - int64(i)*4099
		if sizes[i] < 1 {
			sizes[i] = 1
		}
		sum += sizes[i]
	}
	sizes[n-1] += total - sum
	return sizes
}

const chunk = 4 << 20

// Run runs the guest: on a cold boot it preserves and holds (forever, until
// a restart stops it); after a restart it retrieves and verifies, then
// exits (returns nil) or, with Cycle, preserves again and holds.
func (g *Guest) Run() error {
	runAt := handover.Monotonic()
	if g.Size <= 0 || g.Files < 1 || g.Sessions < 1 || g.Sessions > g.Files {
		return fmt.Errorf("demo-guest: bad arguments (size %d, %d files, %d sessions)", g.Size, g.Files, g.Sessions)
	}
	gen := guest.LiveupdateNumber()
	c, err := guest.Dial("")
	if err != nil {
		return fmt.Errorf("demo-guest: %w", err)
	}
	dev, err := c.OpenLiveUpdate()
	if err != nil {
		return fmt.Errorf("demo-guest: open /dev/liveupdate: %w", err)
	}
	if gen > 0 {
		if err := g.retrieve(c, dev, gen, runAt); err != nil {
			emit(Event{Event: "failed", Generation: gen, Error: err.Error()})
			return fmt.Errorf("demo-guest: %w", err)
		}
		if !g.Cycle {
			return nil
		}
	}
	if err := g.preserve(c, dev, gen, g.Size); err != nil {
		emit(Event{Event: "failed", Generation: gen, Error: err.Error()})
		return fmt.Errorf("demo-guest: %w", err)
	}
	// Hold the session fds (and the connection) until the restart stops
	// this process: closing them would unpreserve the files. (A sleep, not
	// an empty select: a statically linked build would take that for a
	// deadlock and exit.)
	for {
		time.Sleep(time.Hour)
	}
}

// preserve writes generation gen's contents and preserves them.
func (g *Guest) preserve(c *guest.Conn, dev int, gen uint64, size int64) error {
	start := time.Now()
	sess := make([]int, g.Sessions)
	for s := range sess {
		fd, err := c.CreateSession(dev, sessionName(s))
		if err != nil {
			return fmt.Errorf("creating session %s: %w", sessionName(s), err)
		}
		sess[s] = fd
	}
	buf := make([]byte, chunk)
	for i, n := range fileSizes(size, g.Files) {
		fd, err := c.MemfdCreate(fmt.Sprintf("demo-%d", i), 0)
		if err != nil {
			return fmt.Errorf("memfd_create: %w", err)
		}
		key := patternKey(g.Seed, gen, i)
		if g.SmallFolios {
			// A 1-byte write into an empty 2 MiB range caches a 4 KiB
			// folio there, so later writes cannot use a 2 MiB one.
			for off := int64(0); off < n; off += 2 << 20 {
				if _, err := c.Pwrite(fd, buf[:1], off); err != nil {
					return fmt.Errorf("touching file %d at %d: %w", i, off, err)
				}
			}
		}
		for off := int64(0); off < n; off += chunk {
			b := buf[:min(chunk, n-off)]
			fillPattern(b, key, off)
			if _, err := c.Pwrite(fd, b, off); err != nil {
				return fmt.Errorf("writing file %d at %d: %w", i, off, err)
			}
		}
		// Leave the position somewhere to check that it survives.
		if _, err := c.Seek(fd, n/2, unix.SEEK_SET); err != nil {
			return err
		}
		if err := c.PreserveFD(sess[i%g.Sessions], fd, uint64(i+1)); err != nil {
			return fmt.Errorf("preserving file %d: %w", i, err)
		}
		if err := c.Close(fd); err != nil {
			return err
		}
	}
	emit(Event{Event: "preserved", Generation: gen, Files: g.Files, Sessions: g.Sessions, Bytes: size, WriteMS: float64(time.Since(start)) / 1e6})
	return nil
}

// retrieve retrieves, checks and finishes what generation gen-1 preserved;
// runAt is when Run began, for the verified event.
func (g *Guest) retrieve(c *guest.Conn, dev int, gen uint64, runAt int64) error {
	start := time.Now()
	sess := make([]int, g.Sessions)
	for s := range sess {
		fd, err := c.RetrieveSession(dev, sessionName(s))
		if err != nil {
			return fmt.Errorf("retrieving session %s: %w", sessionName(s), err)
		}
		sess[s] = fd
	}
	fds := make([]int, g.Files)
	st := make([]guest.Stat, g.Files)
	var total int64
	var last [1]byte
	for i := range fds {
		fd, err := c.RetrieveFD(sess[i%g.Sessions], uint64(i+1))
		if err != nil {
			return fmt.Errorf("retrieving file %d: %w", i, err)
		}
		fds[i] = fd
		if st[i], err = c.Fstat(fd); err != nil {
			return err
		}
		total += st[i].Size
		if _, err := c.Pread(fd, last[:], st[i].Size-1); err != nil {
			return fmt.Errorf("reading the last byte of file %d: %w", i, err)
		}
	}
	ready := handover.Monotonic()
	retrieveMS := float64(time.Since(start)) / 1e6
	vstart := time.Now()
	want := make([]byte, chunk)
	got := make([]byte, chunk)
	for i, fd := range fds {
		n := st[i].Size
		if pos, err := c.Seek(fd, 0, unix.SEEK_CUR); err != nil || pos != n/2 {
			return fmt.Errorf("file %d: position %d after the restart, want %d (%v)", i, pos, n/2, err)
		}
		key := patternKey(g.Seed, gen-1, i)
		for off := int64(0); off < n; off += chunk {
			w, b := want[:min(chunk, n-off)], got[:min(chunk, n-off)]
			fillPattern(w, key, off)
			k, err := c.Pread(fd, b, off)
			if err != nil || k != len(b) {
				return fmt.Errorf("file %d: reading %d bytes at %d: got %d, %v", i, len(b), off, k, err)
			}
			if !bytes.Equal(w, b) {
				j := 0
				for w[j] == b[j] {
					j++
				}
				return fmt.Errorf("file %d: byte %d is %#x, want %#x", i, off+int64(j), b[j], w[j])
			}
		}
		if _, err := c.Pwrite(fd, []byte{1}, n); !errors.Is(err, unix.EPERM) && err != nil {
			return fmt.Errorf("file %d: write after retrieve: %v", i, err)
		}
	}
	for _, s := range sess {
		if err := c.FinishSession(s); err != nil {
			return fmt.Errorf("finishing a session: %w", err)
		}
		c.Close(s)
	}
	for _, fd := range fds {
		c.Close(fd)
	}
	emit(Event{Event: "verified", Generation: gen, Files: g.Files, Sessions: g.Sessions, Bytes: total,
		DataReadyAt: ready, RunAt: runAt, RetrieveMS: retrieveMS, VerifyMS: float64(time.Since(vstart)) / 1e6})
	return nil
}
