package pgalloc

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func newTestFile(t testing.TB, size uint64) *MemoryFile {
	t.Helper()
	f, err := New(Options{Size: size})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// reopen opens a second MemoryFile over the same memfd, as the next sentry
// does after a restart.
func reopen(t testing.TB, f *MemoryFile) *MemoryFile {
	t.Helper()
	g := openUnadopted(t, f)
	g.ResumeReleases()
	return g
}

// openUnadopted opens f's file as a new sentry does before it adopts
// anything: releases held, closed at the end of the test.
func openUnadopted(t testing.TB, f *MemoryFile) *MemoryFile {
	t.Helper()
	file, err := f.DupFile()
	if err != nil {
		t.Fatalf("DupFile: %v", err)
	}
	g, err := Open(file, Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// pageSet tracks which pages are in use, to detect overlaps.
type pageSet map[uint64]Folio

func (s pageSet) add(t *testing.T, fo Folio) {
	t.Helper()
	for p := fo.PFN; p < fo.PFN+fo.Pages(); p++ {
		if other, ok := s[p]; ok {
			t.Fatalf("%v overlaps %v at pfn %#x", fo, other, p)
		}
		s[p] = fo
	}
}

func TestAllocateAlignedUniqueAndNeverPFN0(t *testing.T) {
	for order := 0; order <= MaxOrder; order++ {
		t.Run(fmt.Sprintf("order %d", order), func(t *testing.T) {
			f := newTestFile(t, 64<<20)
			used := pageSet{}
			n := 0
			for {
				fo, err := f.Allocate(order)
				if err != nil {
					if !errors.Is(err, unix.ENOMEM) {
						t.Fatalf("Allocate(%d) after %d folios: %v, want ENOMEM", order, n, err)
					}
					break
				}
				if fo.PFN == 0 {
					t.Fatalf("Allocate(%d) returned PFN 0", order)
				}
				if fo.Order != order || fo.PFN%fo.Pages() != 0 {
					t.Fatalf("Allocate(%d) = %v: wrong order or not naturally aligned", order, fo)
				}
				used.add(t, fo)
				n++
			}
			// PFN 0 is reserved, so the first aligned block is lost.
			want := int(f.Pages()>>order) - 1
			if n != want {
				t.Errorf("allocated %d order-%d folios from a %d-page file, want %d", n, order, f.Pages(), want)
			}
		})
	}
}

func TestAllocateRejectsBadOrders(t *testing.T) {
	f := newTestFile(t, 16<<20)
	for _, order := range []int{-1, MaxOrder + 1, 64} {
		if _, err := f.Allocate(order); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Allocate(%d) = %v, want EINVAL", order, err)
		}
	}
}

func TestAllocatedFoliosAreZero(t *testing.T) {
	f := newTestFile(t, 32<<20)
	var live []Folio
	for i := 0; ; i++ {
		fo, err := f.Allocate(i % 3)
		if err != nil {
			break
		}
		b := f.Bytes(fo)
		if !allZero(b) {
			t.Fatalf("fresh %v is not zero", fo)
		}
		for j := range b {
			b[j] = 0xA5
		}
		live = append(live, fo)
	}
	for _, fo := range live {
		f.DecRef(fo)
	}
	// Everything is freed but not necessarily released yet: allocating
	// the whole file again must scrub whatever is still pending.
	n := 0
	for {
		fo, err := f.Allocate(0)
		if err != nil {
			break
		}
		if !allZero(f.Bytes(fo)) {
			t.Fatalf("reallocated %v holds the previous owner's data", fo)
		}
		n++
	}
	if want := int(f.Pages()) - 1; n != want {
		t.Errorf("reallocated %d pages, want %d", n, want)
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func TestRefcounts(t *testing.T) {
	f := newTestFile(t, 16<<20)
	fo, err := f.Allocate(2)
	if err != nil {
		t.Fatal(err)
	}
	f.IncRef(fo)
	f.IncRef(fo)
	if _, refs, ok := f.Lookup(fo.PFN); !ok || refs != 3 {
		t.Fatalf("Lookup after two IncRefs = refs %d, ok %v; want 3, true", refs, ok)
	}
	f.DecRef(fo)
	f.DecRef(fo)
	if got, refs, ok := f.Lookup(fo.PFN); !ok || refs != 1 || got != fo {
		t.Fatalf("Lookup = %v, refs %d, ok %v; want %v, 1, true", got, refs, ok, fo)
	}
	if st := f.Stats(); st.Folios[2] != 1 || st.AllocatedPages != 4 {
		t.Fatalf("Stats with one order-2 folio: %+v", st)
	}
	f.DecRef(fo)
	if _, _, ok := f.Lookup(fo.PFN); ok {
		t.Fatalf("%v still allocated after its last reference went", fo)
	}
	if st := f.Stats(); st.AllocatedPages != 0 {
		t.Fatalf("Stats after the last DecRef: %+v", st)
	}
}

func TestRefcountMisuseIsABug(t *testing.T) {
	f := newTestFile(t, 16<<20)
	fo, err := f.Allocate(1)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		fn   func()
	}{
		{"DecRef of a tail page panics", func() { f.DecRef(Folio{PFN: fo.PFN + 1, Order: 0}) }},
		{"DecRef with the wrong order panics", func() { f.DecRef(Folio{PFN: fo.PFN, Order: 0}) }},
		{"IncRef of a free page panics", func() { f.IncRef(Folio{PFN: 100, Order: 0}) }},
		{"IncRef beyond the file panics", func() { f.IncRef(Folio{PFN: f.Pages(), Order: 0}) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Errorf("no panic")
				}
			}()
			tc.fn()
		})
	}
	f.DecRef(fo)
	defer func() {
		if recover() == nil {
			t.Errorf("DecRef of a freed folio did not panic")
		}
	}()
	f.DecRef(fo)
}

func TestSliceChecksBounds(t *testing.T) {
	f := newTestFile(t, 16<<20)
	tests := []struct {
		name    string
		pfn, n  uint64
		wantErr bool
	}{
		{"the last page is in range", f.Pages() - 1, 1, false},
		{"the whole file is in range", 0, f.Pages(), false},
		{"a range past the end fails", f.Pages() - 1, 2, true},
		{"a page past the end fails", f.Pages(), 1, true},
		{"an empty range fails", 1, 0, true},
		{"a range whose end overflows fails", 1, ^uint64(0), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := f.Slice(tc.pfn, tc.n)
			if (err != nil) != tc.wantErr {
				t.Fatalf("Slice(%#x, %d) = %v", tc.pfn, tc.n, err)
			}
			if err == nil && uint64(len(b)) != tc.n*PageSize {
				t.Fatalf("Slice returned %d bytes", len(b))
			}
		})
	}
}

func TestReadPagesReadsTheFileAndChecksBounds(t *testing.T) {
	f := newTestFile(t, 16<<20)
	last, err := f.Slice(f.Pages()-1, 1)
	if err != nil {
		t.Fatal(err)
	}
	fill(last, 7)
	tests := []struct {
		name    string
		pfn     uint64
		bytes   int
		wantErr bool
	}{
		{"the last page reads what the mapping holds", f.Pages() - 1, PageSize, false},
		{"two pages from the start are in range", 0, 2 * PageSize, false},
		{"a range past the end fails", f.Pages() - 1, 2 * PageSize, true},
		{"a page past the end fails", f.Pages(), PageSize, true},
		{"a partial page fails", 1, PageSize / 2, true},
		{"an empty buffer fails", 1, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := make([]byte, tc.bytes)
			err := f.ReadPages(tc.pfn, p)
			if (err != nil) != tc.wantErr {
				t.Fatalf("ReadPages(%#x, %d bytes) = %v", tc.pfn, tc.bytes, err)
			}
			if err == nil && tc.pfn == f.Pages()-1 && !bytes.Equal(p, last) {
				t.Fatal("ReadPages of the last page differs from the mapping")
			}
		})
	}
}

// randomPreserved allocates random folios in f, fills each with a pattern
// derived from its PFN and returns them.
func randomPreserved(t *testing.T, f *MemoryFile, rng *rand.Rand, n int) []Block {
	var all []Folio
	for i := 0; i < n; i++ {
		fo, err := f.Allocate(rng.IntN(MaxOrder + 1))
		if err != nil {
			break
		}
		all = append(all, fo)
	}
	// Keep a random half, free the rest: the preserved set has holes.
	var keep []Block
	for _, fo := range all {
		if rng.IntN(2) == 0 {
			f.DecRef(fo)
			continue
		}
		fill(f.Bytes(fo), fo.PFN)
		keep = append(keep, fo)
	}
	rng.Shuffle(len(keep), func(i, j int) { keep[i], keep[j] = keep[j], keep[i] })
	return keep
}

func fill(b []byte, seed uint64) {
	for i := 0; i < len(b); i += 8 {
		v := seed*0x9E3779B97F4A7C15 + uint64(i)
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	if seed == 0 {
		b[0] = 1
	}
}

func TestAdoptMakesExactlyThePreservedSetAllocated(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	f := newTestFile(t, 64<<20)
	keep := randomPreserved(t, f, rng, 40)
	g := reopen(t, f)
	if err := g.Adopt(keep); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	preserved := pageSet{}
	for _, b := range keep {
		preserved.add(t, b)
		got, refs, ok := g.Lookup(b.PFN)
		if !ok || got != b || refs != 1 {
			t.Fatalf("Lookup(%#x) after Adopt = %v refs %d ok %v, want %v with one reference", b.PFN, got, refs, ok, b)
		}
		want := make([]byte, b.Size())
		fill(want, b.PFN)
		if !bytes.Equal(g.Bytes(b), want) {
			t.Fatalf("%v lost its contents across Adopt", b)
		}
	}
	// Every page that was not preserved, and only those, is allocatable.
	got := pageSet{}
	for {
		fo, err := g.Allocate(0)
		if err != nil {
			if !errors.Is(err, unix.ENOMEM) {
				t.Fatal(err)
			}
			break
		}
		if _, ok := preserved[fo.PFN]; ok {
			t.Fatalf("Allocate handed out preserved page %#x", fo.PFN)
		}
		got.add(t, fo)
	}
	if want := int(g.Pages()) - 1 - len(preserved); len(got) != want {
		t.Fatalf("allocated %d pages after Adopt, want %d", len(got), want)
	}
}

func TestAdoptRejectsBadBlocksAndChangesNothing(t *testing.T) {
	f := newTestFile(t, 16<<20) // 4096 pages
	tests := []struct {
		name   string
		blocks []Block
		want   error
	}{
		{"overlapping blocks are rejected", []Block{{PFN: 8, Order: 3}, {PFN: 12, Order: 0}}, unix.EINVAL},
		{"the same block twice is rejected", []Block{{PFN: 8, Order: 0}, {PFN: 8, Order: 0}}, unix.EINVAL},
		{"a misaligned block is rejected", []Block{{PFN: 6, Order: 2}}, unix.EINVAL},
		{"a block past the end is rejected", []Block{{PFN: 4096, Order: 0}}, unix.ERANGE},
		{"a block that crosses the end is rejected", []Block{{PFN: 4095, Order: 0}, {PFN: 4096 - 1024 + 1024, Order: 10}}, unix.ERANGE},
		{"a block covering PFN 0 is rejected", []Block{{PFN: 0, Order: 4}}, unix.EINVAL},
		{"an order above the maximum is rejected", []Block{{PFN: 2048, Order: MaxOrder + 1}}, unix.EINVAL},
		{"a negative order is rejected", []Block{{PFN: 2, Order: -1}}, unix.EINVAL},
	}
	g := reopen(t, f)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := g.Adopt(tc.blocks)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Adopt(%v) = %v, want %v", tc.blocks, err, tc.want)
			}
			if _, err := g.Allocate(0); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("Allocate after a rejected Adopt = %v, want EINVAL (not adopted)", err)
			}
		})
	}
	if err := g.Adopt([]Block{{PFN: 8, Order: 3}}); err != nil {
		t.Fatalf("Adopt of a good set after rejections: %v", err)
	}
	if err := g.Adopt(nil); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("second Adopt = %v, want EBUSY", err)
	}
}

func TestAdoptLeavesNoStaleData(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	f := newTestFile(t, 32<<20)
	keep := randomPreserved(t, f, rng, 30)
	// The previous sentry wrote everywhere, including pages it never
	// allocated and pages it freed.
	all, err := f.Slice(1, f.Pages()-1)
	if err != nil {
		t.Fatal(err)
	}
	isKept := pageSet{}
	for _, b := range keep {
		isKept.add(t, b)
	}
	for p := uint64(1); p < f.Pages(); p++ {
		if _, ok := isKept[p]; !ok {
			fill(all[(p-1)*PageSize:p*PageSize], 0xdead0000+p)
		}
	}
	g := reopen(t, f)
	if err := g.Adopt(keep); err != nil {
		t.Fatal(err)
	}
	var got []Folio
	for order := MaxOrder; order >= 0; order-- {
		for {
			fo, err := g.Allocate(order)
			if err != nil {
				break
			}
			got = append(got, fo)
		}
	}
	n := uint64(0)
	for _, fo := range got {
		if !allZero(g.Bytes(fo)) {
			t.Fatalf("%v allocated after Adopt holds stale data", fo)
		}
		n += fo.Pages()
	}
	if want := g.Pages() - 1 - uint64(len(isKept)); n != want {
		t.Fatalf("allocated %d pages, want %d", n, want)
	}
	for _, b := range keep {
		want := make([]byte, b.Size())
		fill(want, b.PFN)
		if !bytes.Equal(g.Bytes(b), want) {
			t.Fatalf("preserved %v lost its pattern", b)
		}
	}
}

func TestDrainReleasesStaleAndFreedMemory(t *testing.T) {
	f := newTestFile(t, 32<<20)
	var fs []Folio
	for i := 0; i < 8; i++ {
		fo, err := f.Allocate(HugeOrder)
		if err != nil {
			t.Fatal(err)
		}
		fill(f.Bytes(fo), fo.PFN)
		fs = append(fs, fo)
	}
	if st := f.Stats(); st.CommittedBytes < 8<<21 {
		t.Fatalf("8 written 2 MiB folios commit only %d bytes", st.CommittedBytes)
	}
	g := reopen(t, f)
	if err := g.Adopt(fs[:2]); err != nil {
		t.Fatal(err)
	}
	g.Drain()
	st := g.Stats()
	if st.StalePages != 0 || st.ReleasingPages != 0 || st.FreePages != g.Pages()-1-2*512 {
		t.Fatalf("Stats after Drain: %+v", st)
	}
	if st.CommittedBytes != 2<<21 {
		t.Fatalf("after Drain the file commits %d bytes, want exactly the 2 preserved folios (%d)", st.CommittedBytes, 2<<21)
	}
	g.DecRef(fs[0])
	g.Drain()
	if st := g.Stats(); st.CommittedBytes != 1<<21 {
		t.Fatalf("after freeing one folio and Drain the file commits %d bytes, want %d", st.CommittedBytes, 1<<21)
	}
}

// model is the reference allocator: a page bitmap and the placement policy
// spelled out naively (the lowest-addressed maximal free run among those
// whose largest aligned block has the smallest sufficient order; the lowest
// aligned block in it).
type model struct {
	used []bool
}

func (m *model) alloc(order int) (uint64, bool) {
	n := uint64(1) << order
	bestOrder, bestStart, bestEnd := MaxOrder+1, uint64(0), uint64(0)
	for s := uint64(1); s < uint64(len(m.used)); {
		if m.used[s] {
			s++
			continue
		}
		e := s
		for e < uint64(len(m.used)) && !m.used[e] {
			e++
		}
		if c := capacityOrder(s, e); c >= order && c < bestOrder {
			bestOrder, bestStart, bestEnd = c, s, e
		}
		s = e
	}
	if bestOrder > MaxOrder {
		return 0, false
	}
	_ = bestEnd
	b := (bestStart + n - 1) &^ (n - 1)
	for p := b; p < b+n; p++ {
		m.used[p] = true
	}
	return b, true
}

func (m *model) free(fo Folio) {
	for p := fo.PFN; p < fo.PFN+fo.Pages(); p++ {
		m.used[p] = false
	}
}

func TestRandomAllocFreeMatchesReferenceModel(t *testing.T) {
	for seed := uint64(0); seed < 4; seed++ {
		t.Run(fmt.Sprintf("seed %d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 99))
			f := newTestFile(t, 8<<20) // 2048 pages
			m := &model{used: make([]bool, f.Pages())}
			m.used[0] = true
			var live []Folio
			for step := 0; step < 3000; step++ {
				if len(live) > 0 && rng.IntN(5) < 2 {
					i := rng.IntN(len(live))
					fo := live[i]
					live[i] = live[len(live)-1]
					live = live[:len(live)-1]
					f.DecRef(fo)
					m.free(fo)
					// The model frees at once; the allocator once
					// the releaser has run.
					f.Drain()
					continue
				}
				order := rng.IntN(MaxOrder + 1)
				if rng.IntN(4) > 0 {
					order = rng.IntN(3)
				}
				want, wantOK := m.alloc(order)
				fo, err := f.Allocate(order)
				if (err == nil) != wantOK || (wantOK && fo.PFN != want) {
					t.Fatalf("step %d: Allocate(%d) = %v, %v; model says pfn %#x, ok %v", step, order, fo, err, want, wantOK)
				}
				if err == nil {
					live = append(live, fo)
				}
			}
			var pages uint64
			for _, fo := range live {
				pages += fo.Pages()
			}
			if st := f.Stats(); st.AllocatedPages != pages || st.FreePages != f.Pages()-1-pages {
				t.Fatalf("Stats = %+v, want %d allocated and %d free pages", st, pages, f.Pages()-1-pages)
			}
		})
	}
}

func TestConcurrentAllocFree(t *testing.T) {
	f := newTestFile(t, 64<<20)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			var live []Folio
			for i := 0; i < 2000; i++ {
				if len(live) > 0 && rng.IntN(2) == 0 {
					fo := live[len(live)-1]
					live = live[:len(live)-1]
					b := f.Bytes(fo)
					if b[0] != byte(w+1) || b[len(b)-1] != byte(w+1) {
						errs <- fmt.Errorf("worker %d: %v was overwritten", w, fo)
						return
					}
					f.DecRef(fo)
					continue
				}
				fo, err := f.Allocate(rng.IntN(4))
				if err != nil {
					errs <- err
					return
				}
				b := f.Bytes(fo)
				if b[0] != 0 || b[len(b)-1] != 0 {
					errs <- fmt.Errorf("worker %d: fresh %v not zero", w, fo)
					return
				}
				b[0], b[len(b)-1] = byte(w+1), byte(w+1)
				live = append(live, fo)
			}
			for _, fo := range live {
				f.DecRef(fo)
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	f.Drain()
	if st := f.Stats(); st.AllocatedPages != 0 || st.FreePages != f.Pages()-1 {
		t.Fatalf("after all workers freed everything: %+v", st)
	}
}

func TestOpenRejectsBadFiles(t *testing.T) {
	fd, err := unix.MemfdCreate("bad", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	file := fdFile(fd)
	defer file.Close()
	if err := unix.Ftruncate(fd, PageSize+1); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(file, Options{}); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Open of a file whose size is not page-aligned = %v, want EINVAL", err)
	}
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(file, Options{}); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Open of an empty file = %v, want EINVAL", err)
	}
}

func TestAnOpenedFileScrubsNothingUntilReleasesResume(t *testing.T) {
	f := newTestFile(t, 16<<20)
	live, err := f.Allocate(3)
	if err != nil {
		t.Fatal(err)
	}
	fill(f.Bytes(live), 7)
	file, err := f.DupFile()
	if err != nil {
		t.Fatal(err)
	}
	g, err := Open(file, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	// The next sentry preserved nothing of this: it is stale there, but
	// the previous sentry still uses it until the handover is accepted.
	if err := g.Adopt(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Allocate(0); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Allocate on a held file = %v, want ENOMEM", err)
	}
	want := make([]byte, live.Size())
	fill(want, 7)
	if !bytes.Equal(f.Bytes(live), want) {
		t.Fatal("an allocation in the held file scrubbed memory the previous sentry still uses")
	}
	g.ResumeReleases()
	if _, err := g.Allocate(0); err != nil {
		t.Fatalf("Allocate after ResumeReleases: %v", err)
	}
}
