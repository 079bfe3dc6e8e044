package kho

import (
	"bytes"
	"os"
	"runtime"
	"strconv"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
)

// lockThread keeps the test's goroutine on its OS thread until the test
// ends, so that the per-thread counters ioField reads count the test's own
// reads and no other thread's: one extra read by another thread of the
// process was seen once under -race, cause not found.
func lockThread(t *testing.T) {
	runtime.LockOSThread()
	t.Cleanup(runtime.UnlockOSThread)
}

// bytesRead returns the bytes this thread has read so far (rchar of
// /proc/thread-self/io; see lockThread), less the bytes of this read itself, which are counted
// once it returns: the next call's value includes them, so it subtracts
// them through prev, the length of the previous call's read (0 the first
// time).
func bytesRead(t *testing.T, prev *int) int {
	t.Helper()
	n, b := ioField(t, "rchar")
	n -= *prev
	*prev += len(b)
	return n
}

// ioField returns the named counter of /proc/thread-self/io, the calling
// thread's, and the file's text.
func ioField(t *testing.T, name string) (int, []byte) {
	t.Helper()
	b, err := os.ReadFile("/proc/thread-self/io")
	if err != nil {
		t.Skipf("no read accounting: %v", err)
	}
	for line := range bytes.Lines(b) {
		if v, ok := bytes.CutPrefix(line, []byte(name+": ")); ok {
			n, err := strconv.Atoi(string(bytes.TrimSpace(v)))
			if err != nil {
				t.Fatalf("/proc/thread-self/io: %q: %v", line, err)
			}
			return n, b
		}
	}
	t.Fatalf("/proc/thread-self/io has no %s: %q", name, b)
	return 0, nil
}

// readCalls returns a counter of the test's read system calls (syscr of
// its thread, see lockThread) that does not count its own.
func readCalls(t *testing.T) func() int {
	t.Helper()
	lockThread(t)
	a, _ := ioField(t, "syscr")
	b, _ := ioField(t, "syscr")
	self := b - a // the calls ioField makes
	base := b
	return func() int {
		n, _ := ioField(t, "syscr")
		n -= base + self
		base += n + self
		return n
	}
}

// TestReadAheadReadsWhatIngestReads checks that ReadAhead reads, and only
// reads, as many pages as the next sentry's Ingest of the same state reads:
// the root page and every page of a radix tree with leaves of several
// orders and bitmap indexes. Without ReadAhead those pages would be read
// for the first time inside the blackout.
func TestReadAheadReadsWhatIngestReads(t *testing.T) {
	k1, mf1 := newKHO(t, 1<<30)
	// Order-0 leaves in four bitmap indexes (a leaf covers 32768 blocks),
	// an order-3 and an order-9 block.
	for _, r := range []struct{ pfn, n uint64 }{{1, 1}, {40000, 1}, {80001, 1}, {200000, 1}, {1024, 8}, {4096, 512}} {
		if err := k1.PreservePages(r.pfn, r.n); err != nil {
			t.Fatalf("PreservePages(%d, %d): %v", r.pfn, r.n, err)
		}
	}
	lockThread(t)
	var prev int
	before := bytesRead(t, &prev)
	n, err := k1.ReadAhead()
	if err != nil {
		t.Fatal(err)
	}
	ahead := bytesRead(t, &prev) - before
	// The root, the tree's root node, four table levels above the leaves
	// (some shared), and at least six leaves.
	if n < 1+1+6 {
		t.Errorf("ReadAhead read %d pages, want the root and every tree page (at least 8)", n)
	}
	if ahead != n*abikho.PageSize {
		t.Errorf("ReadAhead said %d pages but read %d bytes, want %d", n, ahead, n*abikho.PageSize)
	}
	// kho-v2, what a restart between two builds of today writes (a kho-v1
	// map is written at the finalize, inside the pause).
	if err := k1.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	mf2 := reopen(t, mf1)
	before = bytesRead(t, &prev)
	k2, err := Ingest(mf2, k1.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	if ingested := bytesRead(t, &prev) - before; ingested != ahead {
		t.Errorf("Ingest read %d bytes, ReadAhead %d: it must read ahead exactly what Ingest reads", ingested, ahead)
	}
	// The carried state reads ahead the same pages for the restart after.
	if n2, err := k2.ReadAhead(); err != nil || n2 != n {
		t.Errorf("ReadAhead after the ingest = %d, %v; want %d pages, as before", n2, err, n)
	}
}
