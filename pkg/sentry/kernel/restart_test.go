package kernel

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"golang.org/x/sys/unix"
)

// retrieveOne has a new guest of s retrieve session name and its file
// token, and checks that the file reads data; it returns the guest, the
// session and the file.
func retrieveOne(t *testing.T, s *sandbox, name string, token uint64, data []byte) (g *guest.Conn, sess, fd int) {
	t.Helper()
	g = s.dial(t)
	dev := mustFD(t)(g.OpenLiveUpdate())
	sess = mustFD(t)(g.RetrieveSession(dev, name))
	fd = mustFD(t)(g.RetrieveFD(sess, token))
	got := make([]byte, len(data))
	if n, err := g.Pread(fd, got, 0); err != nil || n != len(data) || !bytes.Equal(got, data) {
		t.Fatalf("session %s file %d: read %d bytes, %v; want its %d preserved bytes", name, token, n, err, len(data))
	}
	return g, sess, fd
}

// preserveOne has g create a memfd with contents data and preserve it in a
// new session name under token; it returns the session fd and the memfd.
func preserveOne(t *testing.T, g *guest.Conn, dev int, name string, token uint64, data []byte) (sess, fd int) {
	t.Helper()
	fd = mustFD(t)(g.MemfdCreate(name, 0))
	if _, err := g.Write(fd, data); err != nil {
		t.Fatal(err)
	}
	sess = mustFD(t)(g.CreateSession(dev, name))
	if err := g.PreserveFD(sess, fd, token); err != nil {
		t.Fatalf("PreserveFD: %v", err)
	}
	return sess, fd
}

// restartInProcess hands s's kernel over to a new kernel in the same
// process, as a transfer-mode restart does across processes.
func restartInProcess(t testing.TB, s *sandbox) *sandbox {
	t.Helper()
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	return handOverPaused(t, s)
}

// handOverPaused is restartInProcess for a kernel already paused.
func handOverPaused(t testing.TB, s *sandbox) *sandbox {
	t.Helper()
	return handOverPausedTo(t, s, nil)
}

// negotiatedRestart is restartInProcess to a sentry of the same build as
// two of them negotiate it (the newest formats, kho-v2).
func negotiatedRestart(t testing.TB, s *sandbox) *sandbox {
	t.Helper()
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	return handOverPausedTo(t, s, Reads())
}

// handOverPausedTo is handOverPaused to a sentry that reads peerReads
// (nil: the default formats).
func handOverPausedTo(t testing.TB, s *sandbox, peerReads []string) *sandbox {
	t.Helper()
	h, err := s.k.PrepareHandover(nil, peerReads)
	if err != nil {
		t.Fatalf("PrepareHandover: %v", err)
	}
	return acceptHandover(t, s, h)
}

// acceptHandover boots a new kernel from h, s's prepared handover, hands
// s's kernel off and serves the new one.
func acceptHandover(t testing.TB, s *sandbox, h Handover) *sandbox {
	t.Helper()
	file, err := s.k.MemoryFile().DupFile()
	if err != nil {
		t.Fatal(err)
	}
	k2, err := NewFromHandover(file, h.Root, Options{Logf: t.Logf}, nil)
	if err != nil {
		t.Fatalf("NewFromHandover: %v", err)
	}
	s.k.Handoff()
	k2.Commit()
	if got := k2.LUO().LiveupdateNumber(); got != h.LiveupdateNumber+1 {
		t.Errorf("liveupdate number after the restart: %d, want %d", got, h.LiveupdateNumber+1)
	}
	s2 := startKernel(t, k2)
	t.Cleanup(k2.Shutdown)
	return s2
}

// pausedWithOne returns a sandbox whose guest preserved one memfd holding
// data in session "s" under token 1, its kernel paused.
func pausedWithOne(t *testing.T, data []byte) *sandbox {
	t.Helper()
	s := newSandbox(t)
	g := s.dial(t)
	preserveOne(t, g, mustFD(t)(g.OpenLiveUpdate()), "s", 1, data)
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestRestartInProcessKeepsPreservedMemfds(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	dev := mustFD(t)(g.OpenLiveUpdate())
	rng := rand.NewChaCha8([32]byte{7})
	contents := map[string][]byte{}
	for i, n := range []int{1, 3 << 20, 12345} {
		name := []string{"a", "b", "c"}[i]
		contents[name] = make([]byte, n)
		rng.Read(contents[name])
		preserveOne(t, g, dev, name, uint64(i+1), contents[name])
	}
	// A memfd that is not preserved does not cross.
	mustFD(t)(g.MemfdCreate("lost", 0))

	s2 := restartInProcess(t, s)
	if _, err := g.Write(0, []byte("x")); err == nil || guest.IsErrno(err) {
		t.Fatalf("a guest of the old kernel could still call after the handoff (err %v)", err)
	}
	g2 := s2.dial(t)
	dev2 := mustFD(t)(g2.OpenLiveUpdate())
	for i, name := range []string{"a", "b", "c"} {
		sess := mustFD(t)(g2.RetrieveSession(dev2, name))
		fd := mustFD(t)(g2.RetrieveFD(sess, uint64(i+1)))
		want := contents[name]
		got := make([]byte, len(want)+1)
		n, err := g2.Pread(fd, got, 0)
		if err != nil || n != len(want) || !bytes.Equal(got[:n], want) {
			t.Fatalf("memfd %q after the restart: %d bytes (want %d), %v, equal %v", name, n, len(want), err, bytes.Equal(got[:n], want))
		}
		if off, _ := g2.Seek(fd, 0, unix.SEEK_CUR); off != int64(len(want)) {
			t.Errorf("memfd %q position: %d, want %d", name, off, len(want))
		}
		if err := g2.FinishSession(sess); err != nil {
			t.Fatalf("FinishSession: %v", err)
		}
	}
	if _, err := g2.RetrieveSession(dev2, "lost"); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("retrieving a session never created: %v, want ENOENT", err)
	}
}

func TestAbortedHandoverResumesWithEverythingIntact(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	dev := mustFD(t)(g.OpenLiveUpdate())
	data := bytes.Repeat([]byte("abcd"), 3000)
	_, fd := preserveOne(t, g, dev, "s", 1, data)
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.k.PrepareHandover(nil, nil); err != nil {
		t.Fatal(err)
	}
	st := s.k.LUO().Status()
	if len(st.Sessions) != 1 || len(st.Sessions[0].Files) != 1 || st.Sessions[0].Files[0].State != "frozen" {
		t.Fatalf("LUO status after PrepareHandover: %+v; want one frozen file", st)
	}
	if err := s.k.AbortHandover(); err != nil {
		t.Fatal(err)
	}
	s.k.Resume()
	st = s.k.LUO().Status()
	if len(st.Sessions) != 1 || len(st.Sessions[0].Files) != 1 || st.Sessions[0].Files[0].State != "preserved" {
		t.Fatalf("LUO status after AbortHandover: %+v; want the file preserved and unfrozen", st)
	}
	// The guest goes on: an in-place write (a preserved memfd's size is
	// fixed from preserve on, as in Linux) reaches the next restart.
	if _, err := g.Pwrite(fd, []byte("more"), 100); err != nil {
		t.Fatalf("write after the abort: %v", err)
	}
	if _, err := g.Pwrite(fd, []byte("x"), int64(len(data))); !errors.Is(err, unix.EPERM) {
		t.Fatalf("growing write to a preserved memfd: %v, want EPERM", err)
	}
	copy(data[100:], "more")
	// And a later restart carries the session.
	retrieveOne(t, restartInProcess(t, s), "s", 1, data)
}

// A guest that dies while the kernel is paused for a restart keeps its
// sessions until the restart's outcome: after the handoff they cross,
// after a rollback they are released as at any exit. Released at once,
// they would be unpreserved before the freeze or not, by a race.
func TestAGuestDyingDuringThePauseIsReleasedAfterTheOutcome(t *testing.T) {
	for _, outcome := range []string{"handoff", "rollback"} {
		t.Run(outcome, func(t *testing.T) {
			s := newSandbox(t)
			g := s.dial(t)
			dev := mustFD(t)(g.OpenLiveUpdate())
			data := []byte("preserved before the guest died")
			preserveOne(t, g, dev, "dying", 1, data)
			if err := s.k.Pause(time.Time{}); err != nil {
				t.Fatal(err)
			}
			g.Disconnect()
			// Long enough for the connection's end to be processed.
			time.Sleep(100 * time.Millisecond)
			if n := len(s.k.LUO().Status().Sessions); n != 1 {
				t.Fatalf("%d sessions while paused after the guest died, want 1", n)
			}
			if outcome == "rollback" {
				s.k.Resume()
				deadline := time.Now().Add(5 * time.Second)
				for len(s.k.LUO().Status().Sessions) != 0 {
					if time.Now().After(deadline) {
						t.Fatal("the dead guest's session is still there a rollback later")
					}
					time.Sleep(time.Millisecond)
				}
				return
			}
			g2 := handOverPaused(t, s).dial(t)
			dev2 := mustFD(t)(g2.OpenLiveUpdate())
			sess := mustFD(t)(g2.RetrieveSession(dev2, "dying"))
			fd := mustFD(t)(g2.RetrieveFD(sess, 1))
			got := make([]byte, len(data))
			if n, err := g2.Pread(fd, got, 0); err != nil || n != len(data) || !bytes.Equal(got, data) {
				t.Fatalf("the dead guest's memfd after the restart: %q, %v", got[:n], err)
			}
		})
	}
}

// The fault hooks of a restart's two inner points run where they say:
// offer/frozen after LUO's freeze and before KHO's finalize, and
// accept/ingested after KHO's ingest and before LUO's deserialize. An
// error at either fails that step; the old kernel rolls back, and a later
// restart still carries every byte.
func TestHandoverInnerFaultPoints(t *testing.T) {
	data := bytes.Repeat([]byte("inner"), 5000)
	s := pausedWithOne(t, data)
	injected := errors.New("injected")
	var points []handover.Point
	_, err := s.k.PrepareHandoverWith(nil, nil, func(p handover.Point) error {
		points = append(points, p)
		if st := s.k.LUO().Status(); st.Sessions[0].Files[0].State != "frozen" {
			t.Errorf("at %s: LUO status %+v, want the file frozen", p, st)
		}
		return injected
	})
	if !errors.Is(err, injected) || !slices.Equal(points, []handover.Point{handover.OfferFrozen}) {
		t.Fatalf("PrepareHandoverWith: %v at %v, want the injected error at offer/frozen", err, points)
	}
	if st := s.k.LUO().Status(); st.Sessions[0].Files[0].State != "preserved" {
		t.Fatalf("after the failed prepare: %+v, want the file preserved and unfrozen", st)
	}

	h, err := s.k.PrepareHandover(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	file, err := s.k.MemoryFile().DupFile()
	if err != nil {
		t.Fatal(err)
	}
	points = nil
	_, err = NewFromHandover(file, h.Root, Options{Fault: func(p handover.Point) error {
		points = append(points, p)
		return injected
	}}, nil)
	if !errors.Is(err, injected) || !slices.Equal(points, []handover.Point{handover.AcceptIngested}) {
		t.Fatalf("NewFromHandover: %v at %v, want the injected error at accept/ingested", err, points)
	}
	if err := s.k.AbortHandover(); err != nil {
		t.Fatal(err)
	}
	s.k.Resume()

	retrieveOne(t, restartInProcess(t, s), "s", 1, data)
}
