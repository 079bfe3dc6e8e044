package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"golang.org/x/sys/unix"
)

// sessionNames returns the names of s's LUO sessions of direction dir.
func sessionNames(s *sandbox, dir string) []string {
	var names []string
	for _, ss := range s.k.LUO().Status().Sessions {
		if ss.Direction == dir {
			names = append(names, ss.Name)
		}
	}
	sort.Strings(names)
	return names
}

// readAll reads the whole of the memfd fd of g.
func readAll(t *testing.T, g *guest.Conn, fd int) []byte {
	t.Helper()
	st, err := g.Fstat(fd)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, st.Size)
	if n, err := g.Pread(fd, b, 0); err != nil || int64(n) != st.Size {
		t.Fatalf("reading %d bytes: %d, %v", st.Size, n, err)
	}
	return b
}

// TestIncomingSessionsSurviveTheNextCrash checks that a sentry booted from
// a handover loses no incoming session when it crashes in turn: those not
// retrieved come back as they came, a retrieved one comes back with the
// bytes written into it in place and its size at preserve (pages a
// truncate dropped are kept, pinned, until the finish), a finished one is
// gone, and a session made under an incoming one's name replaces it. The
// same holds across a planned restart, and once everything is finished
// nothing incoming is left preserved.
func TestIncomingSessionsSurviveTheNextCrash(t *testing.T) {
	s1 := newSandbox(t)
	g := s1.dial(t)
	dev := mustFD(t)(g.OpenLiveUpdate())
	a1 := bytes.Repeat([]byte("a1"), 3*4096)
	a2 := bytes.Repeat([]byte("a2"), 4*4096)
	sa, _ := preserveOne(t, g, dev, "A", 1, a1)
	fd := mustFD(t)(g.MemfdCreate("a2", 0))
	if _, err := g.Write(fd, a2); err != nil {
		t.Fatal(err)
	}
	if err := g.PreserveFD(sa, fd, 2); err != nil {
		t.Fatal(err)
	}
	preserveOne(t, g, dev, "B", 1, []byte("old b"))
	mustFD(t)(g.CreateSession(dev, "C"))
	preserveOne(t, g, dev, "D", 7, []byte("old d"))

	// A planned restart (kho-v2, as two sentries of this build negotiate
	// it), then a crash before anything is retrieved.
	sr := negotiatedRestart(t, s1)
	num := sr.k.LUO().LiveupdateNumber()
	s2 := crashInProcess(t, sr)
	if got := sessionNames(s2, "incoming"); len(got) != 4 {
		t.Fatalf("after a restart and a crash: incoming %v, want A, B, C and D", got)
	}
	// The dead sentry changed nothing: the recovered one boots as it did.
	if got := s2.k.LUO().LiveupdateNumber(); got != num {
		t.Errorf("liveupdate number after a crash of a sentry that changed nothing: %d, want its own %d", got, num)
	}

	// The second sentry retrieves A and writes into it in place, truncates
	// a2 to one page, finishes B and makes a new B, makes a new D without
	// retrieving the old one, and leaves C alone.
	g2 := s2.dial(t)
	dev2 := mustFD(t)(g2.OpenLiveUpdate())
	sa2 := mustFD(t)(g2.RetrieveSession(dev2, "A"))
	fa1 := mustFD(t)(g2.RetrieveFD(sa2, 1))
	if got := readAll(t, g2, fa1); !bytes.Equal(got, a1) {
		t.Fatalf("a1 after the first crash: %d bytes, want its %d preserved bytes", len(got), len(a1))
	}
	if _, err := g2.Pwrite(fa1, []byte("written in place"), 100); err != nil {
		t.Fatal(err)
	}
	copy(a1[100:], "written in place")
	fa2 := mustFD(t)(g2.RetrieveFD(sa2, 2))
	if err := g2.Ftruncate(fa2, 4096); err != nil {
		t.Fatal(err)
	}
	sb := mustFD(t)(g2.RetrieveSession(dev2, "B"))
	if err := g2.FinishSession(sb); err != nil {
		t.Fatal(err)
	}
	preserveOne(t, g2, dev2, "B", 1, []byte("new b"))
	preserveOne(t, g2, dev2, "D", 8, []byte("new d"))

	s3 := crashInProcess(t, s2)
	// This one did change them: its live update counts.
	if got := s3.k.LUO().LiveupdateNumber(); got != num+1 {
		t.Errorf("liveupdate number after a crash of a sentry that changed its records: %d, want %d", got, num+1)
	}
	if got, want := sessionNames(s3, "incoming"), []string{"A", "B", "C", "D"}; !slices.Equal(got, want) {
		t.Fatalf("after the second crash: incoming %v, want %v", got, want)
	}
	// A's files: a1 with the write, a2 whole, at its size at preserve.
	g3 := s3.dial(t)
	dev3 := mustFD(t)(g3.OpenLiveUpdate())
	sa3 := mustFD(t)(g3.RetrieveSession(dev3, "A"))
	for token, want := range map[uint64][]byte{1: a1, 2: a2} {
		if got := readAll(t, g3, mustFD(t)(g3.RetrieveFD(sa3, token))); !bytes.Equal(got, want) {
			t.Errorf("file %d of A after the second crash: %d bytes, not its %d bytes at preserve with the write in place", token, len(got), len(want))
		}
	}
	for name, want := range map[string][]byte{"B": []byte("new b"), "D": []byte("new d")} {
		sess := mustFD(t)(g3.RetrieveSession(dev3, name))
		token := uint64(1)
		if name == "D" {
			token = 8
			if _, err := g3.RetrieveFD(sess, 7); !errors.Is(err, unix.ENOENT) {
				t.Errorf("RetrieveFD of the replaced D's token: %v, want ENOENT", err)
			}
		}
		if got := readAll(t, g3, mustFD(t)(g3.RetrieveFD(sess, token))); !bytes.Equal(got, want) {
			t.Errorf("session %s after the second crash: %q, want %q", name, got, want)
		}
	}

	// C, never retrieved, crosses a planned restart too; then, finished,
	// it is gone.
	s4 := negotiatedRestart(t, s3)
	if got := sessionNames(s4, "incoming"); !slices.Equal(got, []string{"A", "B", "C", "D"}) {
		t.Fatalf("after a planned restart: incoming %v, want A, B, C and D", got)
	}
	g4 := s4.dial(t)
	dev4 := mustFD(t)(g4.OpenLiveUpdate())
	for _, name := range []string{"A", "B", "C", "D"} {
		sess := mustFD(t)(g4.RetrieveSession(dev4, name))
		if err := g4.FinishSession(sess); err != nil {
			t.Fatalf("finishing %s: %v", name, err)
		}
	}
	s5 := crashInProcess(t, s4)
	if got := sessionNames(s5, "incoming"); len(got) != 0 {
		t.Fatalf("after finishing everything and a crash: incoming %v, want none", got)
	}
	// What the finished sessions held is free: only KHO's and LUO's own
	// pages are preserved.
	if st := s5.k.MemoryFile().Stats(); st.AllocatedPages > 32 {
		t.Errorf("after finishing everything, %d pages are allocated, want at most 32 (the records and the tree)", st.AllocatedPages)
	}
}

// TestARefusedCarriedHandoverLeavesTheOldStateWhole checks that a new
// sentry that refuses a kho-v2 handover (its LUO records do not validate)
// writes nothing: the previous sentry's tree still marks every block, so
// that the same state, put right, is handed over with every byte.
func TestARefusedCarriedHandoverLeavesTheOldStateWhole(t *testing.T) {
	data := bytes.Repeat([]byte("whole"), 5000)
	s1 := pausedWithOne(t, data)
	h, err := s1.k.PrepareHandover(nil, Reads())
	if err != nil {
		t.Fatal(err)
	}
	// The session header, found as the next sentry finds it.
	mf := s1.k.MemoryFile()
	u64 := func(blob []byte, path ...string) uint64 {
		n, err := fdt.Parse(blob, len(blob))
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range path[:len(path)-1] {
			n = n.Child(c)
		}
		v, err := n.U64(path[len(path)-1])
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	page := func(addr uint64) []byte {
		b, err := mf.Slice(addr/pgalloc.PageSize, 1)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	luoFDT := u64(page(h.Root), abiluo.FDTName, abikho.PropPreservedData)
	hdr := page(u64(page(luoFDT), abiluo.FDTSessionNode, abiluo.FDTSessionHeader))
	count := binary.LittleEndian.Uint64(hdr)
	binary.LittleEndian.PutUint64(hdr, 1<<40)
	file, err := mf.DupFile()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewFromHandover(file, h.Root, Options{Logf: t.Logf}, nil); err == nil {
		t.Fatal("NewFromHandover accepted a session header count of 1<<40")
	}
	binary.LittleEndian.PutUint64(hdr, count)
	retrieveOne(t, acceptHandover(t, s1, h), "s", 1, data)
}

// TestACarriedRecordTheNextSentryCannotReadRefusesTheRestart checks that
// a restart to a sentry that reads only memfd-v1 is refused before the
// freeze while an incoming session carries a memfd-v2 record as it came
// (carried records are handed over unchanged), naming the session.
func TestACarriedRecordTheNextSentryCannotReadRefusesTheRestart(t *testing.T) {
	data := []byte("written as memfd-v2")
	s1 := pausedWithOne(t, data)
	h, err := s1.k.PrepareHandover(nil, Reads())
	if err != nil {
		t.Fatal(err)
	}
	s2 := acceptHandover(t, s1, h)
	if err := s2.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	var v1Only []string
	for _, r := range Reads() {
		if r != "memfd-v2" {
			v1Only = append(v1Only, r)
		}
	}
	_, err = s2.k.PrepareHandover(nil, v1Only)
	if err == nil {
		s2.k.AbortHandover()
		s2.k.Resume()
		t.Fatal("PrepareHandover to a memfd-v1 sentry with a carried memfd-v2 record succeeded")
	}
	if !errors.Is(err, luo.ErrNoCommonFormat) || !strings.Contains(err.Error(), `incoming session "s"`) {
		t.Fatalf("PrepareHandover to a memfd-v1 sentry with a carried memfd-v2 record: %v, want ErrNoCommonFormat naming session s", err)
	}
	// Retrieved and finished, the session no longer stands in the way.
	s2.k.Resume()
	g, sess, _ := retrieveOne(t, s2, "s", 1, data)
	if err := g.FinishSession(sess); err != nil {
		t.Fatal(err)
	}
	if err := s2.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.k.PrepareHandover(nil, v1Only); err != nil {
		t.Fatalf("PrepareHandover to a memfd-v1 sentry once the session is finished: %v", err)
	}
	if err := s2.k.AbortHandover(); err != nil {
		t.Fatal(err)
	}
	s2.k.Resume()
}
