package kernel

import (
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/guest"
	"golang.org/x/sys/unix"
)

// lowestFreeFD returns the lowest fd number not open in this process.
func lowestFreeFD(t *testing.T) uint64 {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	open := map[uint64]bool{}
	for _, e := range ents {
		if n, err := strconv.ParseUint(e.Name(), 10, 64); err == nil {
			open[n] = true
		}
	}
	var fd uint64
	for open[fd] {
		fd++
	}
	return fd
}

func TestServeSurvivesRunningOutOfFDs(t *testing.T) {
	s := newSandbox(t)
	// The client socket exists before the fd table is full: connecting
	// needs no new fd, accepting it does.
	cfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
			t.Fatalf("restoring RLIMIT_NOFILE: %v", err)
		}
	}
	full := unix.Rlimit{Cur: lowestFreeFD(t), Max: old.Max}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &full); err != nil {
		t.Fatal(err)
	}
	err = unix.Connect(cfd, &unix.SockaddrUnix{Name: s.path})
	// Serve's accept fails with EMFILE now; give it a few attempts.
	time.Sleep(100 * time.Millisecond)
	restore()
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	select {
	case err := <-s.done:
		s.done <- err
		t.Fatalf("Serve returned after EMFILE: %v", err)
	default:
	}
	f := os.NewFile(uintptr(cfd), "guest")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var b [abiguest.HelloSize]byte
	abiguest.Hello{Version: abiguest.Version}.Encode(b[:])
	c.Write(b[:])
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatalf("the handshake of the guest that connected while fds ran out: %v", err)
	}
	rawRequest(t, c, abiguest.OpMemfdCreate, 2, []byte("x\x00"), 0)
	if h := rawResult(t, c); h.Errno != 0 || h.Result != 0 {
		t.Fatalf("memfd_create: %+v", h)
	}
	// And later guests too.
	g := s.dial(t)
	if _, err := g.MemfdCreate("later", 0); err != nil {
		t.Fatal(err)
	}
}

func TestGuestsBeyondTheCapAreRefused(t *testing.T) {
	old := maxGuests
	maxGuests = 3
	t.Cleanup(func() { maxGuests = old })
	s := newSandbox(t)
	for i := 0; i < 3; i++ {
		if _, err := s.dial(t).MemfdCreate("m", 0); err != nil {
			t.Fatal(err)
		}
	}
	if g, err := guest.Dial(s.path); !errors.Is(err, unix.EAGAIN) {
		if g != nil {
			g.Disconnect()
		}
		t.Fatalf("the fourth guest: %v, want EAGAIN", err)
	}
	if got := s.k.Guests(); got != 3 {
		t.Fatalf("%d guests connected, want 3", got)
	}
}
