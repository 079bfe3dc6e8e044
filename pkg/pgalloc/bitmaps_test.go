package pgalloc

import (
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// toBitmaps returns blocks as per-order bitmaps for a file of pages pages.
func toBitmaps(pages uint64, blocks []Block) Bitmaps {
	var s Bitmaps
	for o := range s {
		s[o] = make([]*Bitmap, (pages>>o)/BitmapBits+1)
	}
	for _, b := range blocks {
		bi := b.PFN >> b.Order
		m := &s[b.Order][bi/BitmapBits]
		if *m == nil {
			*m = new(Bitmap)
		}
		(*m)[bi%BitmapBits/64] |= 1 << (bi % 64)
	}
	return s
}

// randomLayout returns disjoint blocks of the given orders, in address
// order, walking a file of pages pages: runs of blocks, single blocks and
// gaps, with whole 64-bit words of order 0 among them.
func randomLayout(rng *rand.Rand, pages uint64, orders []int) []Block {
	var out []Block
	for pfn := uint64(1 << MaxOrder); pfn < pages-1<<MaxOrder; {
		o := orders[rng.IntN(len(orders))]
		pfn = (pfn + 1<<o - 1) &^ (1<<o - 1)
		if rng.IntN(3) == 0 {
			pfn += uint64(1+rng.IntN(3)) << o
			continue
		}
		n := 1
		switch {
		case o == 0 && rng.IntN(20) == 0:
			n = 200
		case rng.IntN(5) == 0:
			n = 1 + rng.IntN(70)
		}
		for i := 0; i < n && pfn+1<<o <= pages; i++ {
			out = append(out, Block{PFN: pfn, Order: o})
			pfn += 1 << o
		}
	}
	return out
}

func TestAdoptBitmapsMatchesAdoptOfTheSameBlocks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		orders []int
	}{
		{"order-0 blocks alone", []int{0}},
		{"order-0 and order-9 blocks", []int{0, 9}},
		{"blocks of every order", []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
		{"small orders whose blocks share a word of pages", []int{1, 2, 3, 4, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(5, uint64(len(tc.orders))))
			f := newTestFile(t, 1<<30+64<<20) // crosses a section boundary
			blocks := randomLayout(rng, f.Pages(), tc.orders)
			byBlocks, byBitmaps := reopen(t, f), reopen(t, f)
			if err := byBlocks.Adopt(blocks); err != nil {
				t.Fatal(err)
			}
			set := toBitmaps(f.Pages(), blocks)
			if err := byBitmaps.AdoptBitmaps(set); err != nil {
				t.Fatal(err)
			}
			if a, b := byBlocks.Stats(), byBitmaps.Stats(); a.Folios != b.Folios {
				t.Fatalf("AdoptBitmaps: folios %v; Adopt: folios %v", b.Folios, a.Folios)
			}
			// The stale ranges derived from the bitmaps are those derived
			// from the runs.
			byBlocks.mu.Lock()
			wantGaps := byBlocks.set.gaps(f.Pages())
			byBlocks.mu.Unlock()
			if got := set.gaps(f.Pages()); !slices.Equal(got, wantGaps) {
				t.Fatalf("bitmap gaps differ from run gaps: %d ranges against %d", len(got), len(wantGaps))
			}
			// Every page answers Lookup the same way (sections are filled
			// from the bitmaps on the first Lookup that needs them).
			for pfn := uint64(0); pfn < f.Pages(); pfn++ {
				a, ra, oka := byBlocks.Lookup(pfn)
				b, rb, okb := byBitmaps.Lookup(pfn)
				if a != b || ra != rb || oka != okb {
					t.Fatalf("Lookup(%#x): AdoptBitmaps gives %v %d %v, Adopt %v %d %v", pfn, b, rb, okb, a, ra, oka)
				}
			}
		})
	}
}

func TestAdoptBitmapsRejectsBadBitsAndChangesNothing(t *testing.T) {
	f := newTestFile(t, 16<<20) // 4096 pages
	g := reopen(t, f)
	for _, tc := range []struct {
		name   string
		blocks []Block
		want   error
		msg    string
	}{
		{"a preserved PFN 0 is rejected", []Block{{PFN: 0, Order: 0}}, unix.EINVAL, "PFN 0"},
		{"a block of order 4 at PFN 0 is rejected", []Block{{PFN: 0, Order: 4}}, unix.EINVAL, "PFN 0"},
		{"a block past the end is rejected", []Block{{PFN: 4096, Order: 0}}, unix.ERANGE, "pfn 0x1000, order 0"},
		{"a block that crosses the end is rejected", []Block{{PFN: 3072, Order: 10}, {PFN: 4096, Order: 10}}, unix.ERANGE, "pfn 0x1000, order 10"},
		{"a small block inside a large one is rejected", []Block{{PFN: 8, Order: 3}, {PFN: 12, Order: 0}}, unix.EINVAL, "folio(pfn 0xc, order 0): overlaps preserved block folio(pfn 0x8, order 3)"},
		{"two blocks of neighbouring orders that overlap are rejected", []Block{{PFN: 1024, Order: 10}, {PFN: 2046, Order: 1}}, unix.EINVAL, "overlaps"},
		{"an overlap in the last block of a word is rejected", []Block{{PFN: 63 * 2, Order: 1}, {PFN: 127, Order: 0}}, unix.EINVAL, "overlaps"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := g.AdoptBitmaps(toBitmaps(8192, tc.blocks))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("AdoptBitmaps(%v) = %v, want %v naming %q", tc.blocks, err, tc.want, tc.msg)
			}
			if _, err := g.Allocate(0); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("Allocate after a rejected AdoptBitmaps = %v, want EINVAL (not adopted)", err)
			}
		})
	}
	if err := g.AdoptBitmaps(toBitmaps(g.Pages(), []Block{{PFN: 8, Order: 3}, {PFN: 16, Order: 0}})); err != nil {
		t.Fatalf("AdoptBitmaps of a good set after rejections: %v", err)
	}
	if got, _, ok := g.Lookup(8); !ok || got != (Folio{PFN: 8, Order: 3}) {
		t.Fatalf("Lookup(8) = %v, %v after AdoptBitmaps", got, ok)
	}
}

// The bitmaps that lie wholly inside the file are only counted, not
// checked bit by bit: PFN 0 is still refused there, and a block past the
// end is still found in the last, partial bitmap.
func TestAdoptBitmapsChecksWholeBitmapsToo(t *testing.T) {
	f := newTestFile(t, 2*BitmapBits*PageSize+4<<20) // two whole order-0 bitmaps and part of a third
	for _, tc := range []struct {
		name   string
		blocks []Block
		want   error
		msg    string
	}{
		{"PFN 0 in a whole bitmap", []Block{{PFN: 0, Order: 0}, {PFN: 5, Order: 0}}, unix.EINVAL, "PFN 0"},
		{"a block past the end in the partial bitmap", []Block{{PFN: 7, Order: 0}, {PFN: f.Pages(), Order: 0}}, unix.ERANGE, fmt.Sprintf("pfn %#x, order 0", f.Pages())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := reopen(t, f)
			err := g.AdoptBitmaps(toBitmaps(f.Pages()+BitmapBits, tc.blocks))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("AdoptBitmaps(%v) = %v, want %v naming %q", tc.blocks, err, tc.want, tc.msg)
			}
		})
	}
	g := reopen(t, f)
	blocks := []Block{{PFN: 1}, {PFN: BitmapBits - 1}, {PFN: BitmapBits}, {PFN: 2*BitmapBits + 3}}
	if err := g.AdoptBitmaps(toBitmaps(f.Pages(), blocks)); err != nil {
		t.Fatal(err)
	}
	if got := g.Stats().Folios; got[0] != uint64(len(blocks)) {
		t.Fatalf("adopted %v order-0 folios, want %d", got, len(blocks))
	}
}

func TestAdoptBuildsNoStaleListUntilReleasesResume(t *testing.T) {
	for _, tc := range []struct {
		name  string
		adopt func(g *MemoryFile, blocks []Block) error
	}{
		{"runs", func(g *MemoryFile, blocks []Block) error { return g.Adopt(blocks) }},
		{"bitmaps", func(g *MemoryFile, blocks []Block) error { return g.AdoptBitmaps(toBitmaps(g.Pages(), blocks)) }},
	} {
		t.Run("adopted from "+tc.name+", the stale list waits for the releaser", func(t *testing.T) {
			f := newTestFile(t, 64<<20)
			file, err := f.DupFile()
			if err != nil {
				t.Fatal(err)
			}
			g, err := Open(file, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			var blocks []Block
			for pfn := uint64(2); pfn < g.Pages(); pfn += 2 {
				blocks = append(blocks, Block{PFN: pfn})
			}
			if err := tc.adopt(g, blocks); err != nil {
				t.Fatal(err)
			}
			g.mu.Lock()
			n, unbuilt := len(g.stale), g.staleUnbuilt
			g.mu.Unlock()
			if n != 0 || !unbuilt {
				t.Fatalf("after adopting %d blocks: %d stale ranges listed, unbuilt %v; want none listed yet", len(blocks), n, unbuilt)
			}
			g.ResumeReleases()
			g.Drain()
			if st := g.Stats(); st.StalePages != 0 || st.FreePages != uint64(len(blocks))+1 {
				t.Fatalf("after Drain: %d stale pages, %d free; want 0 and %d", st.StalePages, st.FreePages, len(blocks)+1)
			}
		})
	}
}

func TestAnAdoptedSectionIsFilledAChunkAtATimeOrAllAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		adopt func(g *MemoryFile, blocks []Block) error
	}{
		{"runs", func(g *MemoryFile, blocks []Block) error { return g.Adopt(blocks) }},
		{"bitmaps", func(g *MemoryFile, blocks []Block) error { return g.AdoptBitmaps(toBitmaps(g.Pages(), blocks)) }},
	} {
		t.Run("adopted from "+tc.name, func(t *testing.T) {
			f := newTestFile(t, 64<<20)
			g := reopen(t, f)
			// An order-10 block spans chunks 2 and 3; an order-9 block
			// fills chunk 6; order-0 blocks in chunk 9.
			blocks := []Block{{PFN: 1024, Order: 10}, {PFN: 3072, Order: 9}, {PFN: 4608}, {PFN: 4610}}
			if err := tc.adopt(g, blocks); err != nil {
				t.Fatal(err)
			}
			unfilled := func() int {
				g.mu.Lock()
				defer g.mu.Unlock()
				n := 0
				for _, w := range g.sections[0].unfilled {
					n += bits.OnesCount64(w)
				}
				return n
			}
			if fo, refs, ok := g.Lookup(3072); !ok || fo != (Folio{PFN: 3072, Order: 9}) || refs != 1 {
				t.Fatalf("Lookup(3072) = %v, %d, %v", fo, refs, ok)
			}
			if n := unfilled(); n != sectionPages>>chunkShift-1 {
				t.Fatalf("after one Lookup %d chunks are unfilled, want all but one", n)
			}
			for _, c := range []struct {
				pfn  uint64
				want Folio
				ok   bool
			}{
				{1024, Folio{PFN: 1024, Order: 10}, true},
				{1536, Folio{}, false}, // the first page of chunk 3, a tail
				{4608, Folio{PFN: 4608}, true},
				{4609, Folio{}, false},
				{4610, Folio{PFN: 4610}, true},
			} {
				if fo, _, ok := g.Lookup(c.pfn); ok != c.ok || fo != c.want {
					t.Errorf("Lookup(%d) = %v, %v; want %v, %v", c.pfn, fo, ok, c.want, c.ok)
				}
			}
			if n := unfilled(); n != sectionPages>>chunkShift-4 {
				t.Fatalf("after Lookups in 4 chunks %d are unfilled, want all but 4", n)
			}
			// FillMetadata builds every chunk of the file's pages, and
			// the answers stay the same.
			g.FillMetadata()
			if n, inFile := unfilled(), int(g.Pages()>>chunkShift); n != sectionPages>>chunkShift-inFile {
				t.Fatalf("after FillMetadata %d chunks are unfilled, want only the %d beyond the file's %d", n, sectionPages>>chunkShift-inFile, inFile)
			}
			if fo, refs, ok := g.Lookup(4610); !ok || fo != (Folio{PFN: 4610}) || refs != 1 {
				t.Fatalf("Lookup(4610) after FillMetadata = %v, %d, %v", fo, refs, ok)
			}
		})
	}
}
