package pgalloc

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func TestAdoptRunsFillsSectionsLazily(t *testing.T) {
	f := newTestFile(t, 3<<30) // three sections, sparse
	g := reopen(t, f)
	// A contiguous run of order-0 blocks across the first section boundary,
	// and a run of order-9 blocks in the third section.
	runs := []Run{
		{PFN: sectionPages - 4, Count: 8, Order: 0},
		{PFN: 2*sectionPages + 512, Count: 3, Order: 9},
	}
	if err := g.AdoptRuns(runs); err != nil {
		t.Fatal(err)
	}
	// Allocating first creates a section that holds adopted blocks: its
	// adopted heads must be there too.
	fo, err := g.Allocate(0)
	if err != nil {
		t.Fatal(err)
	}
	if fo.PFN >= sectionPages {
		t.Fatalf("allocated %v, expected it in the first section", fo)
	}
	for _, tc := range []struct {
		name string
		pfn  uint64
		want Folio
		ok   bool
	}{
		{"the first adopted page is a folio", sectionPages - 4, Folio{PFN: sectionPages - 4}, true},
		{"the last adopted page before the boundary is a folio", sectionPages - 1, Folio{PFN: sectionPages - 1}, true},
		{"the first adopted page after the boundary is a folio", sectionPages, Folio{PFN: sectionPages}, true},
		{"the last adopted page of the run is a folio", sectionPages + 3, Folio{PFN: sectionPages + 3}, true},
		{"the page after the run is not", sectionPages + 4, Folio{}, false},
		{"an order-9 head is a folio of order 9", 2*sectionPages + 1024, Folio{PFN: 2*sectionPages + 1024, Order: 9}, true},
		{"a page inside an order-9 block is not a head", 2*sectionPages + 1025, Folio{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, refs, ok := g.Lookup(tc.pfn)
			if ok != tc.ok || ok && (got != tc.want || refs != 1) {
				t.Errorf("Lookup(%#x) = %v, %d, %v; want %v with one reference, %v", tc.pfn, got, refs, ok, tc.want, tc.ok)
			}
		})
	}
	st := g.Stats()
	if st.Folios[0] != 8+1 || st.Folios[9] != 3 {
		t.Errorf("folio counts %v, want 9 of order 0 and 3 of order 9", st.Folios)
	}
	g.DecRef(Folio{PFN: 2*sectionPages + 512, Order: 9})
	if _, _, ok := g.Lookup(2*sectionPages + 512); ok {
		t.Error("an adopted folio is still allocated after its last DecRef")
	}
}

func TestAdoptRunsRejectsBadRuns(t *testing.T) {
	f := newTestFile(t, 16<<20) // 4096 pages
	g := reopen(t, f)
	for _, tc := range []struct {
		name string
		runs []Run
		want error
	}{
		{"a run of no blocks is rejected", []Run{{PFN: 8, Count: 0}}, unix.EINVAL},
		{"unsorted runs are rejected", []Run{{PFN: 16, Count: 1}, {PFN: 8, Count: 1}}, unix.EINVAL},
		{"overlapping runs are rejected", []Run{{PFN: 8, Count: 4, Order: 1}, {PFN: 12, Count: 1}}, unix.EINVAL},
		{"a misaligned run is rejected", []Run{{PFN: 6, Count: 1, Order: 2}}, unix.EINVAL},
		{"a run that crosses the end is rejected", []Run{{PFN: 4000, Count: 100}}, unix.ERANGE},
		{"a run at PFN 0 is rejected", []Run{{PFN: 0, Count: 1}}, unix.EINVAL},
		{"an order above the maximum is rejected", []Run{{PFN: 2048, Count: 1, Order: MaxOrder + 1}}, unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := g.AdoptRuns(tc.runs); !errors.Is(err, tc.want) {
				t.Fatalf("AdoptRuns(%v) = %v, want %v", tc.runs, err, tc.want)
			}
			if _, err := g.Allocate(0); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("Allocate after a rejected AdoptRuns = %v, want EINVAL (not adopted)", err)
			}
		})
	}
}

// A section of adopted 2 MiB blocks keeps only each chunk's head entry:
// filling it, and looking up and referencing its folios, allocates none of
// the chunks' other entries (2 MiB per GiB of fresh memory before). A
// block smaller than 2 MiB allocates its chunk's, and only its chunk's.
func TestPageMetadataOfLargeBlocksIsHeadsOnly(t *testing.T) {
	f := newTestFile(t, 1<<30)
	g := reopen(t, f)
	const n = sectionPages>>chunkShift - 2
	if err := g.AdoptRuns([]Run{{PFN: 1 << chunkShift, Count: n, Order: chunkShift}}); err != nil {
		t.Fatal(err)
	}
	g.FillMetadata()
	for pfn := uint64(1 << chunkShift); pfn < (n+1)<<chunkShift; pfn += 1 << chunkShift {
		fo, refs, ok := g.Lookup(pfn)
		if !ok || fo != (Folio{PFN: pfn, Order: chunkShift}) || refs != 1 {
			t.Fatalf("Lookup(%#x) = %v, %d, %t", pfn, fo, refs, ok)
		}
		g.IncRef(fo)
		g.DecRef(fo)
	}
	if _, _, ok := g.Lookup(1<<chunkShift + 1); ok {
		t.Fatalf("a tail page of a 2 MiB folio looks like a folio")
	}
	rest := func() (n int) {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, r := range g.sections[0].rest {
			if r != nil {
				n++
			}
		}
		return n
	}
	if got := rest(); got != 0 {
		t.Fatalf("%d chunks have all their entries allocated, want 0", got)
	}
	// The free chunks at either end: order-0 folios go there.
	fo, err := g.Allocate(0)
	if err != nil {
		t.Fatal(err)
	}
	if fo.PFN%(1<<chunkShift) == 0 {
		// The chunk's first page takes no array; the next one does.
		if fo, err = g.Allocate(0); err != nil {
			t.Fatal(err)
		}
	}
	if got := rest(); got != 1 {
		t.Fatalf("after allocating %v: %d chunks have all their entries allocated, want 1", fo, got)
	}
	if _, refs, ok := g.Lookup(fo.PFN); !ok || refs != 1 {
		t.Fatalf("Lookup(%#x) of a new order-0 folio: %d, %t", fo.PFN, refs, ok)
	}
}
