package memfd

import (
	"fmt"
	"testing"

	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// checkCache checks the page cache's invariants: runs in index order that
// do not overlap, each of at least one folio with its index and PFN aligned
// to its order, each folio allocated in the memory file with that order,
// no two neighbours that could be one run, and nrPages the pages they hold.
func checkCache(f *File) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var err error
	var prev run
	var pages uint64
	f.cache.Ascend(func(r run) bool {
		o := uint64(1)<<r.order() - 1
		switch {
		case r.n == 0:
			err = fmt.Errorf("run %+v holds no folio", r)
		case r.head()&o != 0 || r.pfn()&o != 0:
			err = fmt.Errorf("run %+v: index %#x or pfn %#x not aligned to order %d", r, r.head(), r.pfn(), r.order())
		case prev.n > 0 && prev.last >= r.head():
			err = fmt.Errorf("run %+v overlaps the run before it, %+v", r, prev)
		case prev.n > 0 && prev.joins(r):
			err = fmt.Errorf("run %+v could join the run before it, %+v", r, prev)
		}
		for i := uint64(0); err == nil && i < r.n; i++ {
			fo := r.folio(i).folio()
			if got, refs, ok := f.mf.Lookup(fo.PFN); !ok || got != fo || refs < 1 {
				err = fmt.Errorf("folio %d of run %+v: %v is %v (%d refs, allocated %t) in the memory file", i, r, fo, got, refs, ok)
			}
		}
		pages += r.pages()
		prev = r
		return err == nil
	})
	if err == nil && pages != f.nrPages {
		err = fmt.Errorf("the runs hold %d pages, nrPages is %d", pages, f.nrPages)
	}
	return err
}

// TestRunsJoinAndSplit checks that folios inserted next to each other in
// the memory file make one run, and that a cut, a flag change and a split
// leave the runs they should.
func TestRunsJoinAndSplit(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f, err := Create(mf, "runs", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.DecRef()
	runs := func() int {
		f.mu.RLock()
		defer f.mu.RUnlock()
		return f.cache.Len()
	}
	// 64 pages written one at a time, as order-0 folios allocated one
	// after the other: one run.
	for i := range int64(64) {
		if _, err := f.Pwrite([]byte{byte(i)}, i*pageSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := checkCache(f); err != nil {
		t.Fatal(err)
	}
	if n := runs(); n != 1 {
		t.Fatalf("64 pages written in order make %d runs, want 1", n)
	}
	// A hole punched in the middle: two runs; filled again by a
	// fallocate (dirty, not uptodate): a third run in between.
	if err := f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 10*pageSize, 2*pageSize); err != nil {
		t.Fatal(err)
	}
	if err := checkCache(f); err != nil {
		t.Fatal(err)
	}
	if n := runs(); n != 2 {
		t.Fatalf("after a punch: %d runs, want 2", n)
	}
	if err := f.Fallocate(0, 10*pageSize, 2*pageSize); err != nil {
		t.Fatal(err)
	}
	if err := checkCache(f); err != nil {
		t.Fatal(err)
	}
	if n := runs(); n < 3 {
		t.Fatalf("after a fallocate into the hole: %d runs, want at least 3", n)
	}
	// Mapping the range makes its folios uptodate: the flags agree again,
	// and a folio that joins its neighbours joins them.
	m, err := f.Mmap(vfs.MmapOpts{Length: 64 * pageSize, Prot: unix.PROT_READ, Flags: unix.MAP_SHARED})
	if err != nil {
		t.Fatal(err)
	}
	m.Release()
	if err := checkCache(f); err != nil {
		t.Fatal(err)
	}
	for i := range uint64(64) {
		f.mu.RLock()
		e, ok := f.findLocked(i)
		f.mu.RUnlock()
		if !ok || e.head() != i || e.pages() != 1 || !e.uptodate() || !e.dirty() {
			t.Fatalf("page %d: folio %+v (found %t), want an order-0 folio, uptodate and dirty", i, e, ok)
		}
	}
}
