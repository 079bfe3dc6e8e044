package kernel

import (
	"bytes"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
)

// prereadFrom reads s's handover ahead, as a transfer-mode restart's new
// sentry does before the old one pauses (handover.Preview).
func prereadFrom(t *testing.T, s *sandbox) *Preread {
	t.Helper()
	root, generation, ok := s.k.Preview(Reads())
	if !ok {
		t.Fatal("Preview: nothing to read ahead in a handover to this build")
	}
	file, err := s.k.MemoryFile().DupFile()
	if err != nil {
		t.Fatal(err)
	}
	pre, err := PrereadHandover(file, root, generation)
	if err != nil {
		t.Fatalf("PrereadHandover: %v", err)
	}
	t.Cleanup(pre.Close)
	return pre
}

// bootPreread pauses s, prepares its handover for a sentry of this build
// and boots a new kernel from it with NewFromPreread(pre); it hands s off
// and serves the new kernel, and returns it with the boot's timing.
func bootPreread(t *testing.T, s *sandbox, pre *Preread) (*sandbox, handover.Timing) {
	t.Helper()
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	h, err := s.k.PrepareHandover(nil, Reads())
	if err != nil {
		t.Fatal(err)
	}
	file, err := s.k.MemoryFile().DupFile()
	if err != nil {
		t.Fatal(err)
	}
	var tm handover.Timing
	k2, err := NewFromPreread(pre, file, h.Root, h.Generation, Options{Logf: t.Logf}, &tm)
	if err != nil {
		t.Fatalf("NewFromPreread: %v", err)
	}
	s.k.Handoff()
	k2.Commit()
	s2 := startKernel(t, k2)
	t.Cleanup(k2.Shutdown)
	return s2, tm
}

// A handover read ahead and unchanged until the pause boots from the
// mapping and the tree read ahead (no mapping inside the pause), with
// every preserved byte.
func TestABootFromAPrereadTakesItsMapping(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	data := bytes.Repeat([]byte("read ahead "), 3000)
	preserveOne(t, g, mustFD(t)(g.OpenLiveUpdate()), "s", 1, data)
	pre := prereadFrom(t, s)
	s2, tm := bootPreread(t, s, pre)
	if tm.Map != 0 || !tm.ReadAhead {
		t.Errorf("the boot mapped the memory file in %v, read ahead %v; want the mapping and the tree read ahead", tm.Map, tm.ReadAhead)
	}
	retrieveOne(t, s2, "s", 1, data)
}

// A memfd preserved after the preread, before the pause, changes the tree
// generation: the boot reads the handover again and loses nothing. Booted
// from the stale tree, the late file's pages would not be preserved.
func TestAPreserveAfterThePrereadIsNotLost(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	dev := mustFD(t)(g.OpenLiveUpdate())
	early := bytes.Repeat([]byte("early "), 2000)
	late := bytes.Repeat([]byte("late "), 9000)
	preserveOne(t, g, dev, "early", 1, early)
	pre := prereadFrom(t, s)
	preserveOne(t, g, dev, "late", 2, late)
	s2, tm := bootPreread(t, s, pre)
	if tm.Map == 0 || tm.ReadAhead {
		t.Errorf("the boot took the mapping made ahead of a tree that changed since (map %v, read ahead %v)", tm.Map, tm.ReadAhead)
	}
	g2 := s2.dial(t)
	dev2 := mustFD(t)(g2.OpenLiveUpdate())
	for _, f := range []struct {
		name  string
		token uint64
		data  []byte
	}{{"early", 1, early}, {"late", 2, late}} {
		fd := mustFD(t)(g2.RetrieveFD(mustFD(t)(g2.RetrieveSession(dev2, f.name)), f.token))
		if got := readAll(t, g2, fd); !bytes.Equal(got, f.data) {
			t.Errorf("session %s: %d bytes, want its %d preserved bytes", f.name, len(got), len(f.data))
		}
	}
}

// A preread of another memory file is dropped: the boot is
// NewFromHandover's.
func TestAPrereadOfAnotherFileIsDropped(t *testing.T) {
	other := newSandbox(t)
	og := other.dial(t)
	preserveOne(t, og, mustFD(t)(og.OpenLiveUpdate()), "other", 1, []byte("other"))
	pre := prereadFrom(t, other)

	s := newSandbox(t)
	g := s.dial(t)
	data := []byte("this sandbox's")
	preserveOne(t, g, mustFD(t)(g.OpenLiveUpdate()), "s", 1, data)
	s2, tm := bootPreread(t, s, pre)
	if tm.Map == 0 || tm.ReadAhead {
		t.Errorf("the boot took the mapping of another memory file (map %v, read ahead %v)", tm.Map, tm.ReadAhead)
	}
	retrieveOne(t, s2, "s", 1, data)
}
