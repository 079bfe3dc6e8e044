package handover

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// previewOld is an old sentry that shows its memory file before the pause
// (a Previewer) and finalizes with generation gen.
type previewOld struct {
	oldSide
	gen uint64
}

func (o previewOld) Preview(p *Preview, peerReads []string) *os.File {
	if o.snapshot().paused {
		o.violate("Preview while paused")
	}
	fd, err := unix.FcntlInt(o.mem.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		o.violate("dup: %v", err)
		return nil
	}
	p.Root, p.MemorySize, p.Generation = 0x1000, 1<<20, o.gen
	return os.NewFile(uintptr(fd), "shown")
}

func (o previewOld) Prepare(d *Descriptor, peerReads []string) ([]*os.File, error) {
	files, err := o.oldSide.Prepare(d, peerReads)
	d.Generation = o.gen
	return files, err
}

// previewNew is a new sentry that reads ahead (a PreviewTarget): it
// records each Preview and what its file holds, and the descriptor's
// generation at Boot.
type previewNew struct {
	newSide
	seen *[]string
}

func (n previewNew) Preview(p *Preview, mem *os.File) {
	defer mem.Close()
	buf := make([]byte, len(memContents))
	mem.ReadAt(buf, 0)
	*n.seen = append(*n.seen, fmt.Sprintf("preview root %#x size %d generation %d paused %v file %q", p.Root, p.MemorySize, p.Generation, n.snapshot().paused, buf))
}

func (n previewNew) Boot(d *Descriptor, files []*os.File, t *Timing) error {
	*n.seen = append(*n.seen, fmt.Sprintf("boot generation %d", d.Generation))
	return n.newSide.Boot(d, files, t)
}

// acceptPreviewing runs Accept on newCh with a previewNew of w speaking
// protocol proto (0: the newest), and returns what it sees and its end.
func acceptPreviewing(w *world, newCh *Channel, proto int) (*[]string, <-chan error) {
	var seen []string
	done := make(chan error, 1)
	go func() {
		_, _, err := Accept(newCh, previewNew{newSide{w}, &seen}, Options{Version: "new", PID: 200, Reads: w.newReads, Protocol: proto})
		done <- err
	}()
	return &seen, done
}

// A transfer-mode restart between two sentries of protocol 5 shows the new
// one the memory file, the KHO root and the tree generation before the old
// one pauses, and the descriptor carries the generation finalized; with a
// side of protocol 4 no preview is sent and the restart is as before.
func TestTheNewSentryIsShownTheHandoverBeforeThePause(t *testing.T) {
	for _, tc := range []struct {
		oldProto, newProto int
		want               []string
	}{
		{ProtocolVersion, ProtocolVersion, []string{
			`preview root 0x1000 size 1048576 generation 42 paused false file "preserved bytes"`,
			"boot generation 42",
		}},
		{commitProtocol, ProtocolVersion, []string{"boot generation 0"}},
		{ProtocolVersion, commitProtocol, []string{"boot generation 0"}},
	} {
		t.Run(fmt.Sprintf("old %d new %d", tc.oldProto, tc.newProto), func(t *testing.T) {
			w := newWorld(t)
			oldCh, newCh := channelPair(t)
			seen, done := acceptPreviewing(w, newCh, tc.newProto)
			if _, err := Offer(oldCh, previewOld{oldSide{w}, 42}, Options{Version: "old", PID: 100, Deadline: time.Now().Add(5 * time.Second), StopPeer: func() {}, Protocol: tc.oldProto}); err != nil {
				t.Fatalf("Offer: %v", err)
			}
			if err := <-done; err != nil {
				t.Fatalf("Accept: %v", err)
			}
			if strings.Join(*seen, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("the new sentry saw\n%s\nwant\n%s", strings.Join(*seen, "\n"), strings.Join(tc.want, "\n"))
			}
			if st := w.snapshot(); !st.serving || !st.handedOff {
				t.Fatalf("serving %v, handed off %v; want a restart done", st.serving, st.handedOff)
			}
		})
	}
}

// A Source that is no Previewer still sends protocol 5's Preview, saying
// there is nothing to read ahead, and a PreviewTarget is not called.
func TestAPreviewOfNothingReachesNoTarget(t *testing.T) {
	w := newWorld(t)
	oldCh, newCh := channelPair(t)
	seen, done := acceptPreviewing(w, newCh, 0)
	if _, err := Offer(oldCh, oldSide{w}, Options{Version: "old", PID: 100, Deadline: time.Now().Add(5 * time.Second), StopPeer: func() {}}); err != nil {
		t.Fatalf("Offer: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Accept: %v", err)
	}
	if len(*seen) != 1 || (*seen)[0] != "boot generation 0" {
		t.Fatalf("the new sentry saw %q, want only its boot", *seen)
	}
}

// A malformed Preview is refused: the new sentry answers with the error,
// naming the field, and exits without booting.
func TestTheNewSentryRefusesABadPreview(t *testing.T) {
	memfd := func(t *testing.T) *os.File {
		fd, err := unix.MemfdCreate("shown", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "shown")
		t.Cleanup(func() { f.Close() })
		return f
	}
	good := Preview{Kind: previewKind, Root: 0x1000, MemorySize: 1 << 20, Generation: 3}
	for _, tc := range []struct {
		name  string
		p     func(*Preview)
		files int
		want  string
	}{
		{"another kind", func(p *Preview) { p.Kind = "peek" }, 1, `kind "peek"`},
		{"no file", func(p *Preview) {}, 0, "0 files came"},
		{"two files", func(p *Preview) {}, 2, "2 files came"},
		{"a root off a page", func(p *Preview) { p.Root = 0x1001 }, 1, "root 0x1001 is not a page address"},
		{"a root past the file", func(p *Preview) { p.Root = 1 << 20 }, 1, "memory size 1048576 is not a page multiple holding root 0x100000"},
		{"a size off a page", func(p *Preview) { p.MemorySize = 5000 }, 1, "memory size 5000"},
		{"nothing to read ahead, with a file", func(p *Preview) { *p = Preview{Kind: previewKind} }, 1, "root 0 (nothing to read ahead) with 1 files"},
		{"nothing to read ahead, with a generation", func(p *Preview) { *p = Preview{Kind: previewKind, Generation: 9} }, 0, "generation 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			oldCh, newCh := channelPair(t)
			seen, done := acceptPreviewing(w, newCh, 0)
			var ready Ready
			if _, err := oldCh.Recv(&ready); err != nil {
				t.Fatal(err)
			}
			p := good
			tc.p(&p)
			var files []*os.File
			for range tc.files {
				files = append(files, memfd(t))
			}
			if err := oldCh.Send(&p, files...); err != nil {
				t.Fatal(err)
			}
			var answer Previewed
			if _, err := oldCh.Recv(&answer); err != nil || !strings.Contains(answer.Error, tc.want) {
				t.Fatalf("answer %+v, %v; want an error containing %q", answer, err, tc.want)
			}
			if err := <-done; err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Accept: %v; want an error containing %q", err, tc.want)
			}
			if len(*seen) != 0 {
				t.Fatalf("the new sentry went on: %q", *seen)
			}
		})
	}
}
