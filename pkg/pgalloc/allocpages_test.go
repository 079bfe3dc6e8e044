package pgalloc

import (
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// checkRun fails t unless r is n order-0 folios from pfn, each an allocated
// folio of f holding refs references.
func checkRun(t *testing.T, f *MemoryFile, r Run, pfn, n uint64, refs int32) {
	t.Helper()
	if r.PFN != pfn || uint64(r.Count) != n || r.Order != 0 {
		t.Fatalf("run = %+v, want %d order-0 folios from pfn %#x", r, n, pfn)
	}
	for i := range n {
		fo := r.Folio(i)
		if fo != (Folio{PFN: pfn + i}) {
			t.Fatalf("Folio(%d) of %+v = %v, want the order-0 folio at pfn %#x", i, r, fo, pfn+i)
		}
		got, gotRefs, ok := f.Lookup(pfn + i)
		if !ok || got != fo || gotRefs != refs {
			t.Fatalf("Lookup(%#x) (folio %d of the run) = %v, refs %d, ok %v; want %v, refs %d, true", pfn+i, i, got, gotRefs, ok, fo, refs)
		}
	}
}

// checkStats fails t unless f has exactly allocated pages in order-0 folios
// (and no other folio) and every other page but PFN 0 is free.
func checkStats(t *testing.T, f *MemoryFile, allocated uint64) {
	t.Helper()
	st := f.Stats()
	var want [MaxOrder + 1]uint64
	want[0] = allocated
	if st.Folios != want || st.AllocatedPages != allocated || st.FreePages != f.Pages()-1-allocated || st.ReleasingPages != 0 || st.StalePages != 0 {
		t.Fatalf("Stats = folios %v, %d allocated, %d free, %d releasing, %d stale; want %d order-0 folios, %d allocated, %d free, none releasing or stale",
			st.Folios, st.AllocatedPages, st.FreePages, st.ReleasingPages, st.StalePages, allocated, allocated, f.Pages()-1-allocated)
	}
}

func TestAllocatePagesTakesTheFirstBlockOfTheSmallestOrderAndFreesItsTail(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    uint64
		pfn  uint64 // in a fresh 4096-page file: the first aligned block of order ceil(log2 n)
	}{
		{name: "one page is an order-0 block at pfn 1", n: 1, pfn: 1},
		{name: "two pages are an order-1 block", n: 2, pfn: 2},
		{name: "three pages take an order-2 block and free its last page", n: 3, pfn: 4},
		{name: "five pages take an order-3 block and free its last three pages", n: 5, pfn: 8},
		{name: "300 pages take an order-9 block and free 212 pages", n: 300, pfn: 512},
		{name: "511 pages take an order-9 block and free its last page", n: 511, pfn: 512},
		{name: "512 pages are an order-9 block", n: 512, pfn: 512},
		{name: "513 pages take an order-10 block and free 511 pages", n: 513, pfn: 1024},
		{name: "1024 pages, the most, are an order-10 block", n: 1 << MaxOrder, pfn: 1024},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, 16<<20) // 4096 pages
			r, err := f.AllocatePages(tc.n)
			if err != nil {
				t.Fatalf("AllocatePages(%d): %v", tc.n, err)
			}
			checkRun(t, f, r, tc.pfn, tc.n, 1)
			if got := r.Pages(); got != tc.n {
				t.Errorf("Pages() of %+v = %d, want %d", r, got, tc.n)
			}
			if got := r.End(); got != tc.pfn+tc.n {
				t.Errorf("End() of %+v = %#x, want %#x", r, got, tc.pfn+tc.n)
			}
			// The rest of the block is free, not part of a folio.
			blockEnd := tc.pfn + 1<<bits.Len64(tc.n-1)
			for p := tc.pfn + tc.n; p < blockEnd; p++ {
				if fo, _, ok := f.Lookup(p); ok {
					t.Fatalf("Lookup(%#x), in the freed tail of the block, = %v; want no folio", p, fo)
				}
			}
			checkStats(t, f, tc.n)
			for i := range tc.n {
				if b := f.Bytes(r.Folio(i)); !allZero(b) {
					t.Fatalf("fresh page %d of the run (pfn %#x) is not zero", i, tc.pfn+i)
				}
			}
		})
	}
}

func TestAllocateAfterAllocatePagesGetsTheFirstTailPage(t *testing.T) {
	for _, tc := range []struct {
		name string
		size uint64
		// before are the orders allocated with Allocate first.
		before []int
	}{
		// [1, 8) is taken a page at a time, so the order-3 block is
		// [8, 16) and its tail [13, 16) merges with the free rest of the
		// file.
		{name: "a tail that merges with the free rest of the file is taken first", size: 16 << 20, before: []int{0, 0, 0, 0, 0, 0, 0}},
		// Free is [1, 16): the block is [8, 16) and its tail [13, 16)
		// stands alone, an extent whose largest block has order 1,
		// smaller than [1, 8)'s order 2.
		{name: "a tail that stands alone is taken before a larger extent", size: 16 * PageSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, tc.size)
			var allocated uint64
			for _, o := range tc.before {
				fo, err := f.Allocate(o)
				if err != nil {
					t.Fatalf("Allocate(%d): %v", o, err)
				}
				allocated += fo.Pages()
			}
			r, err := f.AllocatePages(5)
			if err != nil {
				t.Fatalf("AllocatePages(5): %v", err)
			}
			checkRun(t, f, r, 8, 5, 1)
			checkStats(t, f, allocated+5)
			fo, err := f.Allocate(0)
			if err != nil {
				t.Fatalf("Allocate(0) after AllocatePages(5): %v", err)
			}
			if want := (Folio{PFN: 13}); fo != want {
				t.Fatalf("Allocate(0) after AllocatePages(5) = %v, want %v, the first page of the freed tail", fo, want)
			}
			checkStats(t, f, allocated+6)
		})
	}
}

func TestAllocatePagesRejectsCountsOutsideOneToTheLargestBlock(t *testing.T) {
	f := newTestFile(t, 16<<20)
	for _, tc := range []struct {
		name string
		n    uint64
	}{
		{name: "no page is rejected", n: 0},
		{name: "one page more than an order-10 block is rejected", n: 1<<MaxOrder + 1},
		{name: "2048 pages are rejected", n: 2048},
		{name: "the largest count is rejected", n: ^uint64(0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := f.AllocatePages(tc.n)
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("AllocatePages(%d) = %+v, %v; want EINVAL", tc.n, r, err)
			}
			if r != (Run{}) {
				t.Errorf("AllocatePages(%d) failed but returned the run %+v, want the zero Run", tc.n, r)
			}
			checkStats(t, f, 0)
		})
	}
}

func TestAllocatePagesFromAFileNotAdoptedFailsWithEINVAL(t *testing.T) {
	g := openUnadopted(t, newTestFile(t, 16<<20))
	if r, err := g.AllocatePages(4); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("AllocatePages(4) before Adopt = %+v, %v; want EINVAL", r, err)
	}
}

func TestAllocatePagesOnAFullFileFailsWithENOMEMAndChangesNothing(t *testing.T) {
	f := newTestFile(t, 16*PageSize) // free: [1, 16)
	steps := []struct {
		n       uint64
		pfn     uint64 // when it succeeds
		wantErr error
	}{
		{n: 8, pfn: 8},
		// Seven pages are free, [1, 8), but no aligned block of 8.
		{n: 5, wantErr: unix.ENOMEM},
		{n: 4, pfn: 4},
		// [1, 4) holds no aligned block of 4.
		{n: 3, wantErr: unix.ENOMEM},
		{n: 2, pfn: 2},
		{n: 1, pfn: 1},
		// Nothing is free.
		{n: 1, wantErr: unix.ENOMEM},
	}
	var allocated uint64
	for i, s := range steps {
		before := f.Stats()
		r, err := f.AllocatePages(s.n)
		if !errors.Is(err, s.wantErr) {
			t.Fatalf("step %d: AllocatePages(%d) with %d pages allocated = %+v, %v; want error %v", i, s.n, allocated, r, err, s.wantErr)
		}
		if err != nil {
			if r != (Run{}) {
				t.Errorf("step %d: AllocatePages(%d) failed but returned the run %+v", i, s.n, r)
			}
			if after := f.Stats(); after.Folios != before.Folios || after.FreePages != before.FreePages || after.AllocatedPages != before.AllocatedPages {
				t.Fatalf("step %d: a failed AllocatePages(%d) changed the allocator: folios %v, %d free, %d allocated; want %v, %d, %d",
					i, s.n, after.Folios, after.FreePages, after.AllocatedPages, before.Folios, before.FreePages, before.AllocatedPages)
			}
			continue
		}
		checkRun(t, f, r, s.pfn, s.n, 1)
		allocated += s.n
		checkStats(t, f, allocated)
	}
	if fo, err := f.Allocate(0); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Allocate(0) on the full file = %v, %v; want ENOMEM", fo, err)
	}
}

func TestAllocatePagesReusesFreedPagesWithoutDrainAndZeroed(t *testing.T) {
	f := newTestFile(t, 16*PageSize)
	r, err := f.AllocatePages(8)
	if err != nil {
		t.Fatal(err)
	}
	for i := range uint64(r.Count) {
		fill(f.Bytes(r.Folio(i)), r.PFN+i)
	}
	f.DecRefRun(r)
	// The file's only block of 8 pages is waste (or being released): the
	// allocation must release it itself rather than fail.
	r2, err := f.AllocatePages(8)
	if err != nil {
		t.Fatalf("AllocatePages(8) right after DecRefRun freed the only block of 8: %v", err)
	}
	checkRun(t, f, r2, r.PFN, 8, 1)
	for i := range uint64(r2.Count) {
		if !allZero(f.Bytes(r2.Folio(i))) {
			t.Fatalf("page %d of the reallocated run (pfn %#x) holds the previous owner's data", i, r2.PFN+i)
		}
	}
}

func TestAllocatePagesOnAnAdoptedFileScrubsStalePagesAndLeavesAdoptedFoliosAlone(t *testing.T) {
	f := newTestFile(t, 16<<20)
	// The previous sentry wrote every page.
	all, err := f.Slice(1, f.Pages()-1)
	if err != nil {
		t.Fatal(err)
	}
	for p := uint64(1); p < f.Pages(); p++ {
		fill(all[(p-1)*PageSize:p*PageSize], p)
	}
	g := reopen(t, f)
	adopted := Run{PFN: 9, Count: 3}
	if err := g.AdoptRuns([]Run{adopted}); err != nil {
		t.Fatal(err)
	}
	r, err := g.AllocatePages(20)
	if err != nil {
		t.Fatalf("AllocatePages(20) on an adopted file: %v", err)
	}
	if r.PFN < adopted.End() && adopted.PFN < r.End() {
		t.Fatalf("AllocatePages(20) = %+v, which overlaps the adopted run %+v", r, adopted)
	}
	checkRun(t, g, r, r.PFN, 20, 1)
	for i := range uint64(r.Count) {
		if !allZero(g.Bytes(r.Folio(i))) {
			t.Fatalf("page %d of the run (pfn %#x) holds stale data", i, r.PFN+i)
		}
	}
	checkRun(t, g, adopted, 9, 3, 1)
	for i := range uint64(adopted.Count) {
		want := make([]byte, PageSize)
		fill(want, adopted.PFN+i)
		if !slices.Equal(g.Bytes(adopted.Folio(i)), want) {
			t.Fatalf("adopted page %#x lost its contents", adopted.PFN+i)
		}
	}
	if st := g.Stats(); st.Folios[0] != 23 || st.AllocatedPages != 23 {
		t.Fatalf("Stats = folios %v, %d allocated; want 23 order-0 folios", st.Folios, st.AllocatedPages)
	}
}

// consecutiveFolios allocates count folios of the given order with
// Allocate and returns them as a run, failing t unless they follow each
// other in the file (as the placement policy gives them in a fresh file).
func consecutiveFolios(t *testing.T, f *MemoryFile, order int, count uint32) Run {
	t.Helper()
	var r Run
	for i := range count {
		fo, err := f.Allocate(order)
		if err != nil {
			t.Fatalf("Allocate(%d): %v", order, err)
		}
		if i == 0 {
			r = Run{PFN: fo.PFN, Order: uint8(order)}
		} else if want := r.Folio(uint64(i)); fo != want {
			t.Fatalf("folio %d of order %d = %v, want %v, right after the one before", i, order, fo, want)
		}
		r.Count++
	}
	return r
}

// runRefs fails t unless every folio of r is allocated in f with refs
// references.
func runRefs(t *testing.T, f *MemoryFile, r Run, refs int32) {
	t.Helper()
	for i := range uint64(r.Count) {
		want := r.Folio(i)
		got, gotRefs, ok := f.Lookup(want.PFN)
		if !ok || got != want || gotRefs != refs {
			t.Fatalf("Lookup(%#x) (folio %d of %+v) = %v, refs %d, ok %v; want %v, refs %d, true", want.PFN, i, r, got, gotRefs, ok, want, refs)
		}
	}
}

// runFreed fails t unless no page of r is the head of an allocated folio.
func runFreed(t *testing.T, f *MemoryFile, r Run) {
	t.Helper()
	for p := r.PFN; p < r.End(); p++ {
		if fo, refs, ok := f.Lookup(p); ok {
			t.Fatalf("Lookup(%#x), in the freed run %+v, = %v with %d references; want no folio", p, r, fo, refs)
		}
	}
}

func TestIncRefRunAndDecRefRunChangeEveryFolioOfTheRunByOne(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(t *testing.T, f *MemoryFile) Run
	}{
		{name: "a run of 37 order-0 folios from AllocatePages", make: func(t *testing.T, f *MemoryFile) Run {
			r, err := f.AllocatePages(37)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}},
		{name: "a run of one order-0 folio", make: func(t *testing.T, f *MemoryFile) Run { return consecutiveFolios(t, f, 0, 1) }},
		{name: "a run of five order-2 folios", make: func(t *testing.T, f *MemoryFile) Run { return consecutiveFolios(t, f, 2, 5) }},
		{name: "a run of three order-9 folios", make: func(t *testing.T, f *MemoryFile) Run { return consecutiveFolios(t, f, HugeOrder, 3) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, 16<<20)
			r := tc.make(t, f)
			st := f.Stats()
			if want := uint64(r.Count); st.Folios[r.Order] != want || st.AllocatedPages != r.Pages() {
				t.Fatalf("Stats after allocating %+v: folios %v, %d allocated; want %d of order %d, %d pages", r, st.Folios, st.AllocatedPages, want, r.Order, r.Pages())
			}
			runRefs(t, f, r, 1)
			f.IncRefRun(r)
			runRefs(t, f, r, 2)
			f.IncRefRun(r)
			runRefs(t, f, r, 3)
			f.DecRefRun(r)
			runRefs(t, f, r, 2)
			f.DecRefRun(r)
			runRefs(t, f, r, 1)
			if st := f.Stats(); st.AllocatedPages != r.Pages() || st.ReleasingPages != 0 {
				t.Fatalf("Stats after dropping the extra references: %d allocated, %d releasing; want %d allocated, none releasing", st.AllocatedPages, st.ReleasingPages, r.Pages())
			}
			f.DecRefRun(r)
			runFreed(t, f, r)
			if st := f.Stats(); st.Folios != ([MaxOrder + 1]uint64{}) || st.AllocatedPages != 0 || st.FreePages+st.ReleasingPages != f.Pages()-1 {
				t.Fatalf("Stats after the last DecRefRun: folios %v, %d allocated, %d free, %d releasing; want none allocated, %d free or releasing",
					st.Folios, st.AllocatedPages, st.FreePages, st.ReleasingPages, f.Pages()-1)
			}
			f.Drain()
			checkStats(t, f, 0)
		})
	}
}

func TestDecRefRunFreesOnlyTheFoliosWhoseLastReferenceItDrops(t *testing.T) {
	f := newTestFile(t, 16<<20)
	r := consecutiveFolios(t, f, 1, 6)
	kept := r.Folio(2)
	f.IncRef(kept)
	f.DecRefRun(r)
	for i := range uint64(r.Count) {
		fo := r.Folio(i)
		got, refs, ok := f.Lookup(fo.PFN)
		if fo == kept {
			if !ok || got != kept || refs != 1 {
				t.Fatalf("Lookup(%#x) of the folio with an extra reference = %v, refs %d, ok %v; want %v, refs 1, true", fo.PFN, got, refs, ok, kept)
			}
			continue
		}
		if ok {
			t.Fatalf("Lookup(%#x) of folio %d, whose last reference went = %v, refs %d; want no folio", fo.PFN, i, got, refs)
		}
	}
	f.Drain()
	if st := f.Stats(); st.Folios[1] != 1 || st.AllocatedPages != 2 || st.FreePages != f.Pages()-1-2 {
		t.Fatalf("Stats after DecRefRun kept one order-1 folio: folios %v, %d allocated, %d free; want 1 of order 1, 2 allocated, %d free",
			st.Folios, st.AllocatedPages, st.FreePages, f.Pages()-3)
	}
}

// wasteRanges returns a copy of f's list of freed ranges not yet released.
func wasteRanges(f *MemoryFile) []pfnRange {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.waste)
}

func TestDecRefRunMakesOneWasteRangeOfTheFoliosItFrees(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(t *testing.T, f *MemoryFile) Run
	}{
		{name: "300 order-0 folios are one range", make: func(t *testing.T, f *MemoryFile) Run {
			r, err := f.AllocatePages(300)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}},
		{name: "four order-2 folios are one range", make: func(t *testing.T, f *MemoryFile) Run { return consecutiveFolios(t, f, 2, 4) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, 16<<20)
			r := tc.make(t, f)
			// The releaser must leave the waste list alone.
			f.HoldReleases()
			f.DecRefRun(r)
			want := []pfnRange{{start: r.PFN, end: r.End()}}
			if got := wasteRanges(f); !slices.Equal(got, want) {
				t.Fatalf("waste after DecRefRun(%+v) = %v, want %v", r, got, want)
			}
			if st := f.Stats(); st.ReleasingPages != r.Pages() {
				t.Fatalf("%d pages releasing after DecRefRun(%+v), want %d", st.ReleasingPages, r, r.Pages())
			}
			f.ResumeReleases()
			f.Drain()
			checkStats(t, f, 0)
		})
	}
}

func TestFoliosFreedOutOfAddressOrderAreSeparateWasteRanges(t *testing.T) {
	f := newTestFile(t, 16<<20)
	r := consecutiveFolios(t, f, 0, 3)
	f.HoldReleases()
	// Folio 1, then folio 0 (which ends where folio 1 starts, but comes
	// after it in the list), then folio 2 (which extends folio 0's range
	// only if it followed it in the file).
	f.DecRef(r.Folio(1))
	f.DecRef(r.Folio(0))
	f.DecRef(r.Folio(2))
	want := []pfnRange{{start: r.PFN + 1, end: r.PFN + 2}, {start: r.PFN, end: r.PFN + 1}, {start: r.PFN + 2, end: r.PFN + 3}}
	if got := wasteRanges(f); !slices.Equal(got, want) {
		t.Fatalf("waste after freeing folios 1, 0 and 2 of %+v = %v, want %v", r, got, want)
	}
	f.ResumeReleases()
	f.Drain()
	checkStats(t, f, 0)
}

// allocPages is AllocatePages in the reference model: the block of the
// smallest order that holds n pages, less its tail.
func (m *model) allocPages(n uint64) (uint64, bool) {
	order := bits.Len64(n - 1)
	b, ok := m.alloc(order)
	if !ok {
		return 0, false
	}
	for p := b + n; p < b+1<<order; p++ {
		m.used[p] = false
	}
	return b, true
}

func TestRandomAllocatePagesAndDecRefRunMatchTheReferenceModel(t *testing.T) {
	for seed := uint64(0); seed < 4; seed++ {
		t.Run(fmt.Sprintf("seed %d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1234))
			f := newTestFile(t, 8<<20) // 2048 pages
			m := &model{used: make([]bool, f.Pages())}
			m.used[0] = true
			var live []Run
			for step := 0; step < 2000; step++ {
				if len(live) > 0 && rng.IntN(5) < 2 {
					i := rng.IntN(len(live))
					r := live[i]
					live[i] = live[len(live)-1]
					live = live[:len(live)-1]
					f.DecRefRun(r)
					for j := range uint64(r.Count) {
						m.free(r.Folio(j))
					}
					f.Drain()
					continue
				}
				if rng.IntN(3) == 0 {
					order := rng.IntN(3)
					want, wantOK := m.alloc(order)
					fo, err := f.Allocate(order)
					if (err == nil) != wantOK || wantOK && fo.PFN != want {
						t.Fatalf("step %d: Allocate(%d) = %v, %v; model says pfn %#x, ok %v", step, order, fo, err, want, wantOK)
					}
					if err == nil {
						live = append(live, Run{PFN: fo.PFN, Count: 1, Order: uint8(order)})
					}
					continue
				}
				n := uint64(1 + rng.IntN(40))
				if rng.IntN(8) == 0 {
					n = uint64(1 + rng.IntN(1<<MaxOrder))
				}
				want, wantOK := m.allocPages(n)
				r, err := f.AllocatePages(n)
				if (err == nil) != wantOK || wantOK && (r.PFN != want || uint64(r.Count) != n || r.Order != 0) {
					t.Fatalf("step %d: AllocatePages(%d) = %+v, %v; model says pfn %#x, ok %v", step, n, r, err, want, wantOK)
				}
				if err == nil {
					live = append(live, r)
				} else if !errors.Is(err, unix.ENOMEM) {
					t.Fatalf("step %d: AllocatePages(%d) = %v, want ENOMEM", step, n, err)
				}
			}
			var pages uint64
			for _, r := range live {
				pages += r.Pages()
			}
			if st := f.Stats(); st.AllocatedPages != pages || st.FreePages != f.Pages()-1-pages {
				t.Fatalf("Stats = %d allocated, %d free; want %d allocated and %d free pages", st.AllocatedPages, st.FreePages, pages, f.Pages()-1-pages)
			}
		})
	}
}
