package kernel

import (
	"bytes"
	"errors"
	"testing"
	"time"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// fillMemoryFile has a guest write a memfd until the memory file has no
// free page left, and returns that memfd.
func fillMemoryFile(t *testing.T, s *sandbox, g interface {
	MemfdCreate(string, uint) (int, error)
	Write(int, []byte) (int, error)
}) {
	t.Helper()
	fd := mustFD(t)(g.MemfdCreate("filler", 0))
	page := bytes.Repeat([]byte{0xf1}, pgalloc.PageSize)
	for i := 0; ; i++ {
		if _, err := g.Write(fd, page); err != nil {
			if !errors.Is(err, unix.ENOMEM) {
				t.Fatalf("filling the memory file: write %d: %v", i, err)
			}
			break
		}
	}
	mf := s.k.MemoryFile()
	mf.Drain()
	if st := mf.Stats(); st.FreePages != 0 || st.ReleasingPages != 0 {
		t.Fatalf("memory file not full: %+v", st)
	}
	if fo, err := mf.Allocate(0); err == nil {
		t.Fatalf("allocated %v from a full memory file", fo)
	}
}

func TestAFullMemoryFileStillRestarts(t *testing.T) {
	for _, format := range []string{abikho.CompatibleV2, abikho.CompatibleV1} {
		t.Run(format, func(t *testing.T) {
			s := newSandboxSized(t, 16<<20)
			g := s.dial(t)
			dev := mustFD(t)(g.OpenLiveUpdate())
			data := bytes.Repeat([]byte("full file "), 50000)
			preserveOne(t, g, dev, "kept", 7, data)
			fillMemoryFile(t, s, g)
			before := s.k.MemoryFile().Stats().AllocatedPages

			if err := s.k.Pause(time.Time{}); err != nil {
				t.Fatal(err)
			}
			var peerReads []string
			for _, r := range Reads() {
				if r != abikho.CompatibleV2 || format == abikho.CompatibleV2 {
					peerReads = append(peerReads, r)
				}
			}
			h, err := s.k.PrepareHandover(nil, peerReads)
			if err != nil {
				t.Fatalf("PrepareHandover on a full memory file: %v", err)
			}
			if h.Written[0] != format {
				t.Fatalf("handover written as %q, want %q", h.Written, format)
			}
			if after := s.k.MemoryFile().Stats().AllocatedPages; after != before {
				t.Errorf("the freeze and finalize allocated %d pages", int64(after)-int64(before))
			}
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
			s2 := startKernel(t, k2)
			t.Cleanup(k2.Shutdown)
			g2, sess, _ := retrieveOne(t, s2, "kept", 7, data)
			if err := g2.FinishSession(sess); err != nil {
				t.Fatal(err)
			}
		})
	}
}
