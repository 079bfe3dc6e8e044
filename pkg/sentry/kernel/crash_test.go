package kernel

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// crashInProcess kills s's kernel as a crash would, at an instant when no
// guest call runs: the memory file and the KHO root are taken as they are,
// with no Serialize and no Finalize, the old kernel is dropped without
// releasing anything, and a new kernel recovers the file.
func crashInProcess(t *testing.T, s *sandbox) *sandbox {
	t.Helper()
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	// A dead process frees nothing: keep the old allocator from punching
	// out pages while the new kernel reads the file.
	s.k.MemoryFile().HoldReleases()
	root := s.k.KHO().RootAddr()
	file, err := s.k.MemoryFile().DupFile()
	if err != nil {
		t.Fatal(err)
	}
	s.k.Handoff()
	k2, err := Recover(file, root, Options{Logf: t.Logf}, nil)
	if err != nil {
		t.Fatalf("Recover: %v", err)
	}
	k2.Commit()
	s2 := startKernel(t, k2)
	t.Cleanup(k2.Shutdown)
	return s2
}

// crashFile is what the model expects of one preserved memfd.
type crashFile struct {
	fd   int
	data []byte
	// pos is the position at preserve: later seeks are lost by a crash.
	pos int64
}

// crashWorld drives one kernel's guest and the model of what a crash must
// keep: every session whose create returned and was not closed, every file
// whose preserve returned, with every byte written into it.
type crashWorld struct {
	t     *testing.T
	rng   *rand.Rand
	s     *sandbox
	g     *guest.Conn
	dev   int
	sess  map[string]int                   // name -> session fd
	files map[string]map[uint64]*crashFile // name -> token -> file
	next  int
}

func newCrashWorld(t *testing.T, s *sandbox, rng *rand.Rand) *crashWorld {
	w := &crashWorld{t: t, rng: rng, s: s, sess: map[string]int{}, files: map[string]map[uint64]*crashFile{}}
	w.attach(s)
	return w
}

func (w *crashWorld) attach(s *sandbox) {
	w.s = s
	w.g = s.dial(w.t)
	w.dev = mustFD(w.t)(w.g.OpenLiveUpdate())
}

func (w *crashWorld) names() []string {
	var ns []string
	for n := range w.sess {
		ns = append(ns, n)
	}
	sort.Strings(ns)
	return ns
}

// preserve creates a memfd of random size and contents, moves its position
// and preserves it into session name under token.
func (w *crashWorld) preserve(name string, token uint64) {
	t, g := w.t, w.g
	size := w.rng.IntN(3*4096 + 100)
	if w.rng.IntN(5) == 0 {
		size = 0
	}
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(w.rng.Uint32())
	}
	fd := mustFD(t)(g.MemfdCreate(fmt.Sprintf("%s-%d", name, token), 0))
	if _, err := g.Write(fd, data); err != nil {
		t.Fatal(err)
	}
	pos := int64(w.rng.IntN(size + 1))
	if _, err := g.Seek(fd, pos, unix.SEEK_SET); err != nil {
		t.Fatal(err)
	}
	if err := g.PreserveFD(w.sess[name], fd, token); err != nil {
		t.Fatalf("PreserveFD(%q, %d): %v", name, token, err)
	}
	w.files[name][token] = &crashFile{fd: fd, data: data, pos: pos}
}

// step runs one random LUO operation and says what it did.
func (w *crashWorld) step() string {
	t, g := w.t, w.g
	names := w.names()
	switch op := w.rng.IntN(6); {
	case op == 0 || len(names) == 0:
		w.next++
		name := fmt.Sprintf("s%d", w.next)
		w.sess[name] = mustFD(t)(g.CreateSession(w.dev, name))
		w.files[name] = map[uint64]*crashFile{}
		return "create " + name
	case op <= 2:
		name := names[w.rng.IntN(len(names))]
		w.next++
		w.preserve(name, uint64(w.next))
		return fmt.Sprintf("preserve %d into %s", w.next, name)
	case op == 3:
		name := names[w.rng.IntN(len(names))]
		if err := g.Close(w.sess[name]); err != nil {
			t.Fatal(err)
		}
		delete(w.sess, name)
		delete(w.files, name)
		return "close " + name
	default:
		for _, name := range names {
			for token, f := range w.files[name] {
				if len(f.data) == 0 {
					continue
				}
				off := w.rng.IntN(len(f.data))
				p := make([]byte, 1+w.rng.IntN(len(f.data)-off))
				for i := range p {
					p[i] = byte(w.rng.Uint32())
				}
				if _, err := g.Pwrite(f.fd, p, int64(off)); err != nil {
					t.Fatal(err)
				}
				copy(f.data[off:], p)
				// A seek after preserve: a crash loses it.
				if _, err := g.Seek(f.fd, int64(w.rng.IntN(len(f.data)+1)), unix.SEEK_SET); err != nil {
					t.Fatal(err)
				}
				return fmt.Sprintf("write %d bytes at %d into %d of %s, and seek", len(p), off, token, name)
			}
		}
		return "nothing to write"
	}
}

// check verifies, on the kernel recovered from a crash, that exactly the
// model's sessions and files came back with every byte and the position
// each had at preserve, then finishes every session and preserves its
// files again into a new outgoing session of the same name, so that the
// world goes on in the recovered kernel.
func (w *crashWorld) check(after string) {
	t, g := w.t, w.g
	st := w.s.k.LUO().Status()
	got := map[string][]uint64{}
	for _, ss := range st.Sessions {
		if ss.Direction != "incoming" {
			t.Fatalf("after %s: recovered kernel has a %s session %q", after, ss.Direction, ss.Name)
		}
		got[ss.Name] = []uint64{}
		for _, f := range ss.Files {
			got[ss.Name] = append(got[ss.Name], f.Token)
		}
	}
	want := map[string][]uint64{}
	for name, fs := range w.files {
		want[name] = []uint64{}
		for token := range fs {
			want[name] = append(want[name], token)
		}
		sort.Slice(want[name], func(i, j int) bool { return want[name][i] < want[name][j] })
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after %s: recovered sessions and tokens %v, want %v", after, got, want)
	}
	for _, name := range w.names() {
		sess := mustFD(t)(g.RetrieveSession(w.dev, name))
		for token, f := range w.files[name] {
			fd := mustFD(t)(g.RetrieveFD(sess, token))
			b := make([]byte, len(f.data)+1)
			n, err := g.Pread(fd, b, 0)
			if err != nil || n != len(f.data) || !bytes.Equal(b[:n], f.data) {
				t.Fatalf("after %s: file %d of %s: %d bytes (want %d), %v, equal %v", after, token, name, n, len(f.data), err, bytes.Equal(b[:n], f.data))
			}
			if pos, err := g.Seek(fd, 0, unix.SEEK_CUR); err != nil || pos != f.pos {
				t.Fatalf("after %s: file %d of %s at position %d (%v), want %d, its position at preserve", after, token, name, pos, err, f.pos)
			}
			f.fd = fd
		}
		if err := g.FinishSession(sess); err != nil {
			t.Fatalf("after %s: finishing %s: %v", after, name, err)
		}
		if err := g.Close(sess); err != nil {
			t.Fatal(err)
		}
		out := mustFD(t)(g.CreateSession(w.dev, name))
		w.sess[name] = out
		for token, f := range w.files[name] {
			if err := g.PreserveFD(out, f.fd, token); err != nil {
				t.Fatalf("after %s: preserving %d of %s again: %v", after, token, name, err)
			}
		}
	}
}

func TestACrashAfterEveryStepKeepsExactlyTheCompletedPreserves(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprintf("seed %d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 0x1dea))
			w := newCrashWorld(t, newSandbox(t), rng)
			for i := 0; i < 25; i++ {
				what := w.step()
				w.attach(crashInProcess(t, w.s))
				w.check(fmt.Sprintf("step %d (%s)", i, what))
			}
		})
	}
}

func TestRecoverOfASentryThatNeverPreservedBootsEmpty(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	mustFD(t)(g.MemfdCreate("not preserved", 0))
	s2 := crashInProcess(t, s)
	if st := s2.k.LUO().Status(); len(st.Sessions) != 0 {
		t.Fatalf("sessions after recovering a sentry that created none: %+v", st.Sessions)
	}
	g2 := s2.dial(t)
	dev := mustFD(t)(g2.OpenLiveUpdate())
	if _, err := g2.RetrieveSession(dev, "x"); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("RetrieveSession: %v, want ENOENT", err)
	}
	// And it goes on: a session made after the recovery survives a
	// second crash.
	sess, _ := preserveOne(t, g2, dev, "later", 1, []byte("kept"))
	_ = sess
	s3 := crashInProcess(t, s2)
	if st := s3.k.LUO().Status(); len(st.Sessions) != 1 || st.Sessions[0].Name != "later" {
		t.Fatalf("sessions after the second crash: %+v", st.Sessions)
	}
}

// A recovering kernel is quarantined until its Commit, as an incoming one
// is: it scrubs nothing, so that one discarded before its Commit (the
// supervisor's spare sentry dying in its recovery) leaves the file to the
// next recovery, every byte there, once the root page it reused is put
// back.
func TestARecoveryDiscardedBeforeItsCommitLeavesTheFileRecoverable(t *testing.T) {
	data := bytes.Repeat([]byte("quarantine"), 40000)
	s := pausedWithOne(t, data)
	s.k.MemoryFile().HoldReleases()
	root := s.k.KHO().RootAddr()
	page, err := s.k.MemoryFile().Slice(root/pgalloc.PageSize, 1)
	if err != nil {
		t.Fatal(err)
	}
	saved := bytes.Clone(page)
	s.k.Handoff()
	recoverFrom := func() *Kernel {
		file, err := s.k.MemoryFile().DupFile()
		if err != nil {
			t.Fatal(err)
		}
		k, err := Recover(file, root, Options{Logf: t.Logf}, nil)
		if err != nil {
			t.Fatalf("Recover: %v", err)
		}
		return k
	}
	k2 := recoverFrom()
	// Time for a releaser that was not held to scrub what it regards as
	// stale (the dead kernel's tree pages among it).
	time.Sleep(200 * time.Millisecond)
	k2.MemoryFile().Close()
	copy(page, saved)
	k3 := recoverFrom()
	k3.Commit()
	s3 := startKernel(t, k3)
	t.Cleanup(k3.Shutdown)
	retrieveOne(t, s3, "s", 1, data)
}
