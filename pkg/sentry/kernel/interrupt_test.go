package kernel

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// rawConnVersion is rawConn with a Hello of the given protocol version.
func rawConnVersion(t *testing.T, s *sandbox, version uint32) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var b [abiguest.HelloSize]byte
	abiguest.Hello{Version: version}.Encode(b[:])
	c.Write(b[:])
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatalf("reading hello: %v", err)
	}
	if h, _ := abiguest.DecodeHello(b[:]); h.Errno != 0 {
		t.Fatalf("hello of version %d refused: errno %d", version, h.Errno)
	}
	return c
}

// rawMemfd creates a memfd on c and returns its fd.
func rawMemfd(t *testing.T, c net.Conn) uint64 {
	t.Helper()
	rawRequest(t, c, abiguest.OpMemfdCreate, 2, []byte("x\x00"), 0)
	h := rawResult(t, c)
	if h.Errno != 0 {
		t.Fatalf("memfd_create: errno %d", h.Errno)
	}
	return uint64(h.Result)
}

// pauseWithin pauses s's kernel with a deadline far longer than an
// interrupted call needs, and fails if the pause gave up.
func pauseWithin(t *testing.T, s *sandbox) {
	t.Helper()
	if err := s.k.Pause(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatalf("Pause with a guest stalled in a call: %v", err)
	}
}

func TestAPauseInterruptsAStalledWriteWhichCountsWhatArrived(t *testing.T) {
	for _, tc := range []struct {
		name      string
		version   uint32
		sent      int
		wantErrno uint32
		wantRes   int64
	}{
		{"version 3, part of the payload sent: restart after the bytes written", 3, 4096, abiguest.ErrnoRestart, 4096},
		{"version 3, nothing sent: restart from the start", 3, 0, abiguest.ErrnoRestart, 0},
		{"version 2, part sent: a short write, as after a signal", 2, 4096, 0, 4096},
		{"version 2, nothing sent: EINTR, as after a signal", 2, 0, uint32(unix.EINTR), -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSandbox(t)
			c := rawConnVersion(t, s, tc.version)
			fd := rawMemfd(t, c)
			const size = 1 << 20
			payload := bytes.Repeat([]byte{0xa5}, size)
			rawRequest(t, c, abiguest.OpWrite, size, payload[:tc.sent], fd)
			waitActive(t, s, 1)
			time.Sleep(10 * time.Millisecond) // the sentry reads what was sent
			pauseWithin(t, s)
			// Still paused: the rest of the payload is drained and the
			// call answered outside the dispatch gate.
			if _, err := c.Write(payload[tc.sent:]); err != nil {
				t.Fatal(err)
			}
			h := rawResult(t, c)
			if h.Errno != tc.wantErrno || h.Result != tc.wantRes {
				t.Fatalf("the interrupted write's result: errno %d, result %d; want errno %d, result %d", h.Errno, h.Result, tc.wantErrno, tc.wantRes)
			}
			s.k.Resume()
			rawRequest(t, c, abiguest.OpFstat, 0, nil, fd)
			st := rawResult(t, c)
			if st.Errno != 0 {
				t.Fatalf("fstat: errno %d", st.Errno)
			}
			rawRequest(t, c, abiguest.OpLseek, 0, nil, fd, 0, unix.SEEK_CUR)
			if pos := rawResult(t, c); pos.Result != int64(tc.sent) {
				t.Fatalf("file position after the interrupted write: %d, want %d (the bytes written)", pos.Result, tc.sent)
			}
		})
	}
	if abiguest.Version < abiguest.RestartVersion {
		t.Fatal("the protocol's version does not restart calls")
	}
}

func TestAPauseInterruptsAReaderThatDoesNotDrain(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	fd := mustFD(t)(g.MemfdCreate("data", 0))
	const size = 16 << 20
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(i*7 + i>>12)
	}
	if n, err := g.Write(fd, want); err != nil || n != size {
		t.Fatalf("write: %d, %v", n, err)
	}
	c := rawConn(t, s, true)
	rawRequest(t, c, abiguest.OpMemfdCreate, 2, []byte("x\x00"), 0)
	rfd := uint64(rawResult(t, c).Result)
	// Share the data: dup is per process, so write it again here.
	rawRequest(t, c, abiguest.OpWrite, size, want, rfd)
	if h := rawResult(t, c); h.Errno != 0 || h.Result != size {
		t.Fatalf("write: %+v", h)
	}
	rawRequest(t, c, abiguest.OpPread64, 0, nil, rfd, size, 0)
	waitActive(t, s, 1)
	time.Sleep(10 * time.Millisecond) // the socket's buffer fills
	pauseWithin(t, s)
	// Still paused: the frame the pause cut is completed from a copy, and
	// the result says how many bytes the frames carry.
	var got []byte
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		var hb [abiguest.ResponseHeaderSize]byte
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			t.Fatal(err)
		}
		h, err := abiguest.DecodeResponseHeader(hb[:])
		if err != nil {
			t.Fatal(err)
		}
		if h.Kind == abiguest.KindData {
			b := make([]byte, h.Len)
			if _, err := io.ReadFull(c, b); err != nil {
				t.Fatal(err)
			}
			got = append(got, b...)
			continue
		}
		if h.Kind != abiguest.KindResult || h.Errno != abiguest.ErrnoRestart || h.Result != int64(len(got)) {
			t.Fatalf("the interrupted read ended with %+v after %d data bytes; want ERESTARTSYS with result %d", h, len(got), len(got))
		}
		break
	}
	if len(got) == 0 || len(got) == size {
		t.Fatalf("the reader got %d of %d bytes: the pause did not cut the read", len(got), size)
	}
	if !bytes.Equal(got, want[:len(got)]) {
		t.Fatal("the bytes of the interrupted read differ from the file's")
	}
	s.k.Resume()
	// The guest library carries on for the rest: one call, all the bytes.
	buf := make([]byte, size)
	pauses := make(chan struct{})
	go func() {
		defer close(pauses)
		for range 5 {
			if err := s.k.Pause(time.Now().Add(10 * time.Second)); err == nil {
				time.Sleep(time.Millisecond)
				s.k.Resume()
			}
		}
	}()
	if n, err := g.Pread(fd, buf, 0); err != nil || n != size || !bytes.Equal(buf, want) {
		t.Fatalf("pread across pauses: %d, %v, equal %v", n, err, bytes.Equal(buf, want))
	}
	<-pauses
}

func TestAPauseInterruptsACallWhosePayloadHasNotArrived(t *testing.T) {
	s := newSandbox(t)
	c := rawConn(t, s, true)
	// memfd_create's name, 2 bytes promised, 1 sent.
	rawRequest(t, c, abiguest.OpMemfdCreate, 2, []byte("x"), 0)
	waitActive(t, s, 1)
	pauseWithin(t, s)
	c.Write([]byte{0})
	if h := rawResult(t, c); h.Errno != abiguest.ErrnoRestart || h.Result != 0 {
		t.Fatalf("the interrupted memfd_create: %+v, want ERESTARTSYS with 0 done", h)
	}
	s.k.Resume()
	// Nothing was created: the next fd is still 0.
	if fd := rawMemfd(t, c); fd != 0 {
		t.Fatalf("memfd_create after the restarted one: fd %d, want 0", fd)
	}
}

// TestEightWritersAcrossPausesLoseNothingAndApplyNothingTwice runs 8
// guests, each appending records to its own memfd with write(2) and
// reading back a shared pattern, while the kernel is paused and resumed
// over and over (a restart that rolls back). Every file must hold exactly
// the records acknowledged, in order.
func TestEightWritersAcrossPausesLoseNothingAndApplyNothingTwice(t *testing.T) {
	s := newSandboxSized(t, 512<<20)
	const writers = 8
	const records = 16
	before := s.k.Interrupts()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	stop := make(chan struct{})
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g := s.dial(t)
			fd, err := g.MemfdCreate(fmt.Sprintf("w%d", w), 0)
			if err != nil {
				errs <- err
				return
			}
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			var log []byte
			for r := range records {
				rec := make([]byte, 256<<10+8*rng.IntN(256<<10))
				for i := 0; i < len(rec); i += 8 {
					binary.LittleEndian.PutUint64(rec[i:], uint64(w)<<48|uint64(r)<<32|uint64(i))
				}
				n, err := g.Write(fd, rec)
				if err != nil || n != len(rec) {
					errs <- fmt.Errorf("writer %d, record %d: %d of %d bytes, %v", w, r, n, len(rec), err)
					return
				}
				log = append(log, rec...)
			}
			got := make([]byte, len(log)+1)
			n, err := g.Pread(fd, got, 0)
			if err != nil || n != len(log) || !bytes.Equal(got[:n], log) {
				errs <- fmt.Errorf("writer %d: the file has %d bytes (err %v), %d acknowledged; equal %v", w, n, err, len(log), n == len(log) && bytes.Equal(got[:n], log))
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	pauses := 0
	go func() {
		defer close(stop)
		for {
			select {
			case <-done:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if err := s.k.Pause(time.Now().Add(10 * time.Second)); err != nil {
				errs <- fmt.Errorf("pause %d: %v", pauses, err)
				return
			}
			pauses++
			time.Sleep(time.Millisecond)
			s.k.Resume()
		}
	}()
	<-done
	<-stop
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d pauses, %d calls interrupted", pauses, s.k.Interrupts()-before)
	if s.k.Interrupts() == before {
		t.Fatal("no call was interrupted: the test did not exercise restarts")
	}
}

func TestStartGatedIsWhatTheGuestsHelloSaid(t *testing.T) {
	s := newSandbox(t)
	me := os.Getpid()
	raw := rawConnVersion(t, s, abiguest.Version)
	if s.k.StartGated(me) {
		t.Fatal("a guest whose hello has no flags is start-gated")
	}
	g := s.dial(t)
	if !s.k.StartGated(me) {
		t.Fatal("a pkg/guest connection (whose init waits at a start gate) is not start-gated")
	}
	if s.k.StartGated(me + 1) {
		t.Error("another pid is start-gated")
	}
	// Once the pkg/guest connection is gone, only the raw one (no
	// flags) is left.
	g.Disconnect()
	for deadline := time.Now().Add(5 * time.Second); s.k.StartGated(me); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("still start-gated 5 s after the gated guest disconnected")
		}
	}
	raw.Close()
}
