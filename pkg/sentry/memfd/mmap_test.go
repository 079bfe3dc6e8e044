package memfd

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// A memfd written front to back lies in few runs of the memory file, so a
// guest maps 1 GiB in a few dozen mmap calls at most: the allocator hands
// out ascending addresses, and a mapping merges adjacent folios.
func TestAMemfdWrittenInOrderMapsInFewRuns(t *testing.T) {
	for _, tc := range []struct {
		name  string
		chunk int
	}{{"2 MiB folios from 4 MiB writes", 4 << 20}, {"2 MiB folios from 1 MiB writes", 1 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 1 << 30
			mf := newTestMemoryFile(t, 2*size)
			f, err := Create(mf, "runs", 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.DecRef()
			buf := make([]byte, tc.chunk)
			for off := int64(0); off < size; off += int64(len(buf)) {
				if _, err := f.Pwrite(buf, off); err != nil {
					t.Fatal(err)
				}
			}
			m, err := f.Mmap(vfs.MmapOpts{Length: size, Prot: unix.PROT_READ, Flags: unix.MAP_SHARED})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Release()
			runs := m.Runs()
			var total uint64
			for _, r := range runs {
				total += r.Length
			}
			if total != size || len(runs) > 32 {
				t.Fatalf("1 GiB in %d runs covering %d bytes, want all of it in at most 32", len(runs), total)
			}
			t.Logf("1 GiB in %d runs", len(runs))
		})
	}
}

// TestMappingPinsFollowTheMappedPages maps random ranges of a file of 2 MiB
// and 4 KiB folios, unmaps random parts of them and clones them, and checks
// after each step that every folio holds one reference for the page cache
// and one for each mapping that still maps a page of it: a mapping keeps
// runs of folios, and its pins must still be per folio.
func TestMappingPinsFollowTheMappedPages(t *testing.T) {
	for seed := range uint64(8) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) { mappingPinsSeed(t, seed) })
	}
}

func mappingPinsSeed(t *testing.T, seed uint64) {
	const pages = 3 * hugePages
	mf := newTestMemoryFile(t, 64<<20)
	f, err := Create(mf, "pins", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.DecRef()
	// Page 0..511 in 4 KiB folios (written one page at a time), 512..1023
	// one 2 MiB folio, 1024..1535 in 4 KiB folios again.
	for p := int64(0); p < pages; p++ {
		if p == hugePages {
			if _, err := f.Pwrite(make([]byte, hugePages*pageSize), p*pageSize); err != nil {
				t.Fatal(err)
			}
			p += hugePages - 1
			continue
		}
		if _, err := f.Pwrite([]byte{1}, p*pageSize); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.RLock()
	e, _ := f.findLocked(hugePages)
	f.mu.RUnlock()
	if e.pages() != hugePages {
		t.Fatalf("pages 512..1023 are in a folio of %d pages, want one 2 MiB folio", e.pages())
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	type live struct {
		m      *Mapping
		first  uint64
		mapped []bool
	}
	var maps []*live
	check := func(step string) {
		t.Helper()
		f.mu.RLock()
		defer f.mu.RUnlock()
		f.ascendLocked(0, maxIndex, func(e entry) bool {
			want := int32(1)
			for _, l := range maps {
				for p := e.head(); p <= e.last; p++ {
					if p >= l.first && p-l.first < uint64(len(l.mapped)) && l.mapped[p-l.first] {
						want++
						break
					}
				}
			}
			if _, refs, ok := mf.Lookup(e.folio().PFN); !ok || refs != want {
				t.Fatalf("%s: folio at index %#x (%d pages) has %d references, want %d", step, e.head(), e.pages(), refs, want)
			}
			return true
		})
	}
	for step := range 200 {
		switch op := rng.IntN(4); {
		case op == 0 || len(maps) == 0:
			first := rng.Uint64N(pages)
			n := 1 + rng.Uint64N(pages-first)
			m, err := f.Mmap(vfs.MmapOpts{Offset: first * pageSize, Length: n * pageSize, Prot: unix.PROT_READ, Flags: unix.MAP_SHARED})
			if err != nil {
				t.Fatal(err)
			}
			l := &live{m: m.(*Mapping), first: first, mapped: make([]bool, n)}
			for i := range l.mapped {
				l.mapped[i] = true
			}
			maps = append(maps, l)
		case op == 1:
			l := maps[rng.IntN(len(maps))]
			c := &live{m: l.m.Clone().(*Mapping), first: l.first, mapped: append([]bool(nil), l.mapped...)}
			maps = append(maps, c)
		default:
			i := rng.IntN(len(maps))
			l := maps[i]
			s := rng.Uint64N(uint64(len(l.mapped)))
			n := 1 + rng.Uint64N(uint64(len(l.mapped))-s)
			if err := l.m.Unmap(s, n); err != nil {
				t.Fatal(err)
			}
			any := false
			for p := range l.mapped {
				if uint64(p) >= s && uint64(p) < s+n {
					l.mapped[p] = false
				}
				any = any || l.mapped[p]
			}
			if !any {
				maps = append(maps[:i], maps[i+1:]...)
			}
		}
		check(fmt.Sprintf("step %d", step))
	}
	for _, l := range maps {
		l.m.Release()
	}
	maps = nil
	check("after every release")
}
