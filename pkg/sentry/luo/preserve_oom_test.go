package luo_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// TestAPreserveThatRunsOutOfMemoryAnywhereChangesNothing preserves a memfd
// of 4 KiB folios spanning two KHO bitmaps of order 0 (160 MiB) in a
// memory file with no free page, then with one more free page each time,
// until the preserve succeeds. Each failed preserve ran out of memory at
// another point (the record, the folio array, a KHO bitmap page part way
// through the folios) and must be ENOMEM with nothing changed: the same
// pages allocated (but for the pages KHO's radix tree grew by before the
// failure, which, as in Linux, it keeps), the file's data intact, and the
// file preservable once there is room.
func TestAPreserveThatRunsOutOfMemoryAnywhereChangesNothing(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "oom")
	fd := s.memfdWith(t, nil)
	const size = 160 << 20
	chunk := bytes.Repeat([]byte{0xA5}, 64<<10)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		// 64 KiB writes: 4 KiB folios, next to each other.
		if _, err := s.memfd(t, fd).Pwrite(chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	// A first file in the session, so that the session's own records
	// exist before the memory runs out.
	if err := s.preserveFD(sfd, s.memfdWith(t, []byte("x")), 2); err != nil {
		t.Fatal(err)
	}
	// The file's first and last folios, to check that a failed preserve
	// left neither preserved.
	f := s.memfd(t, fd)
	f.Lock()
	runs, err := f.PinFolios()
	f.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	f.UnpinFolios(runs)
	first, last := runs[0].Run.Folio(0), runs[len(runs)-1].Run.Folio(uint64(runs[len(runs)-1].Run.Count)-1)
	var fillers []pgalloc.Folio
	for {
		fo, err := s.mf.Allocate(0)
		if err != nil {
			break
		}
		fillers = append(fillers, fo)
	}
	failures := 0
	for {
		before := s.mf.Stats().AllocatedPages - s.k.TreePages()
		err := s.preserveFD(sfd, fd, 1)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.ENOMEM) {
			t.Fatalf("preserve with %d pages freed: %v, want ENOMEM", failures, err)
		}
		if after := s.mf.Stats().AllocatedPages - s.k.TreePages(); after != before {
			t.Fatalf("a preserve that failed with %d pages freed (%v) left %d pages allocated besides the tree's, %d before", failures, err, after, before)
		}
		for _, fo := range []pgalloc.Folio{first, last} {
			if uerr := s.k.UnpreserveFolio(fo); !errors.Is(uerr, unix.ENOENT) {
				t.Fatalf("a preserve that failed with %d pages freed (%v) left %v preserved: unpreserving it gives %v, want ENOENT", failures, err, fo, uerr)
			}
		}
		if len(fillers) == 0 {
			t.Fatalf("preserve fails with every filler page freed: %v", err)
		}
		failures++
		s.mf.DecRef(fillers[len(fillers)-1])
		fillers = fillers[:len(fillers)-1]
	}
	if failures < 160 {
		t.Fatalf("the preserve succeeded after %d failures; the folio array alone needs 160 pages", failures)
	}
	got := make([]byte, len(chunk))
	for _, off := range []int64{0, 128 << 20, size - int64(len(chunk))} {
		if _, err := s.memfd(t, fd).Pread(got, off); err != nil || !bytes.Equal(got, chunk) {
			t.Fatalf("bytes at %d after the failed preserves: %v, changed %t", off, err, !bytes.Equal(got, chunk))
		}
	}
	for _, fo := range fillers {
		s.mf.DecRef(fo)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "oom")
	rfd, err := n.retrieveFD(r, 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 128 << 20, size - int64(len(chunk))} {
		if _, err := n.memfd(t, rfd).Pread(got, off); err != nil || !bytes.Equal(got, chunk) {
			t.Fatalf("bytes at %d after the restart: %v, changed %t", off, err, !bytes.Equal(got, chunk))
		}
	}
}
