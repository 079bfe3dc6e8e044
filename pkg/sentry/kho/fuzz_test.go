package kho

import (
	"errors"
	"os"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// fuzzFilePages is the size of the memory file FuzzIngest builds: the root
// at page 1, kho-v1 map chunks at pages 2 and 4, bitmaps at pages 3 and 5,
// and the pages of a kho-v2 tree from page fuzzTreePFN on.
const fuzzFilePages = 256

// fuzzTreePFN is where FuzzIngest places its tree argument, page by page,
// and fuzzTreePages the most pages it places.
const (
	fuzzTreePFN   = 32
	fuzzTreePages = 16
)

// fuzzSeed returns a valid handover laid out as FuzzIngest places it:
// order-0 blocks at pfns 1 (the root), 10 and 11, and an order-3 block at
// pfn 16.
func fuzzSeed() (root, chunk0, bitmap0, chunk1, bitmap1 []byte) {
	n := &fdt.Node{}
	n.SetString(abikho.PropCompatible, abikho.Compatible)
	n.SetU64(abikho.PropPreservedMemoryMap, 2*abikho.PageSize)
	n.AddChild("LUO").SetU64(abikho.PropSubFDT, 10*abikho.PageSize)
	root, _ = fdt.Build(n)
	chunk0 = make([]byte, abikho.PageSize)
	abikho.MemChunkHdr{Next: 4 * abikho.PageSize, Order: 0, NumElms: 1}.Encode(chunk0)
	abikho.MemBitmapPtr{PhysStart: 0, Bitmap: 3 * abikho.PageSize}.Encode(chunk0[abikho.MemChunkBitmapOffset(0):])
	bitmap0 = make([]byte, abikho.PageSize)
	bitmap0[1] = 1<<(10-8) | 1<<(11-8)
	bitmap0[0] = 1 << 1
	chunk1 = make([]byte, abikho.PageSize)
	abikho.MemChunkHdr{Order: 3, NumElms: 1}.Encode(chunk1)
	abikho.MemBitmapPtr{PhysStart: 0, Bitmap: 5 * abikho.PageSize}.Encode(chunk1[abikho.MemChunkBitmapOffset(0):])
	bitmap1 = make([]byte, abikho.PageSize)
	bitmap1[0] = 1 << 2 // pfn 16 >> 3
	return
}

// fuzzSeedV2 returns a valid kho-v2 handover with the blocks of fuzzSeed:
// the root FDT for page 1 and the tree's pages, placed from fuzzTreePFN on:
// the root node, then the levels 4 to 0 on the way to the order-0 blocks,
// then those on the way to the order-3 block.
func fuzzSeedV2() (root, tree []byte) {
	n := &fdt.Node{}
	n.SetString(abikho.PropCompatible, abikho.CompatibleV2)
	n.SetU64(abikho.PropPreservedMemoryMap, fuzzTreePFN*abikho.PageSize)
	n.AddChild("LUO").SetU64(abikho.PropPreservedData, 10*abikho.PageSize)
	root, _ = fdt.Build(n)
	tree = make([]byte, 11*abikho.PageSize)
	pg := func(i int) []byte { return tree[i*abikho.PageSize : (i+1)*abikho.PageSize] }
	// link makes the path of key below the root from pages first..first+4.
	link := func(key uint64, first int) []byte {
		node := pg(0)
		for level, i := abikho.RadixTreeMaxDepth-1, first; level > 0; level, i = level-1, i+1 {
			abikho.SetRadixNodeEntry(node, abikho.RadixTableIndex(key, level), uint64(fuzzTreePFN+i)*abikho.PageSize)
			node = pg(i)
		}
		return node
	}
	leaf0 := link(abikho.RadixEncodeKey(0, 0), 1)
	for _, pfn := range []int{1, 10, 11} {
		abikho.LeafSet(leaf0, pfn)
	}
	abikho.LeafSet(link(abikho.RadixEncodeKey(0, 3), 6), 16>>3)
	return root, tree
}

// fuzzFile returns a memory file of the given number of pages, opened as
// a new sentry opens the one it is handed (nothing adopted), holding pages
// from page 1 on, one page each (cut to a page), and tree from page
// fuzzTreePFN on (cut to fuzzTreePages pages).
func fuzzFile(t *testing.T, filePages uint64, tree []byte, pages ...[]byte) *pgalloc.MemoryFile {
	t.Helper()
	fd, err := unix.MemfdCreate("kho-fuzz", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	file := os.NewFile(uintptr(fd), "kho-fuzz")
	if err := file.Truncate(int64(filePages) * abikho.PageSize); err != nil {
		t.Fatal(err)
	}
	for i, p := range pages {
		if len(p) > abikho.PageSize {
			p = p[:abikho.PageSize]
		}
		if _, err := file.WriteAt(p, int64(i+1)*abikho.PageSize); err != nil {
			t.Fatal(err)
		}
	}
	if len(tree) > fuzzTreePages*abikho.PageSize {
		tree = tree[:fuzzTreePages*abikho.PageSize]
	}
	if _, err := file.WriteAt(tree, fuzzTreePFN*abikho.PageSize); err != nil {
		t.Fatal(err)
	}
	mf, err := pgalloc.Open(file, pgalloc.Options{NoHugepages: true})
	if err != nil {
		t.Fatal(err)
	}
	return mf
}

// FuzzIngest places arbitrary root, kho-v1 chunk and bitmap pages and kho-v2
// tree pages in a memory file and ingests it: Ingest must never panic, must
// adopt nothing when it fails, and every folio it accepts must lie inside
// the file and restore exactly once.
func FuzzIngest(f *testing.F) {
	r, c0, b0, c1, b1 := fuzzSeed()
	f.Add(r, c0, b0, c1, b1, uint64(abikho.PageSize), []byte{})
	f.Add(r, c0, b0, c1, b1, uint64(2*abikho.PageSize), []byte{})
	f.Add(r, c0, b0, []byte{}, []byte{}, uint64(abikho.PageSize), []byte{})
	r2, tree := fuzzSeedV2()
	f.Add(r2, []byte{}, []byte{}, []byte{}, []byte{}, uint64(abikho.PageSize), tree)
	f.Add(r2, c0, b0, c1, b1, uint64(abikho.PageSize), tree[:6*abikho.PageSize])
	f.Fuzz(func(t *testing.T, root, chunk0, bitmap0, chunk1, bitmap1 []byte, rootAddr uint64, tree []byte) {
		mf := fuzzFile(t, fuzzFilePages, tree, root, chunk0, bitmap0, chunk1, bitmap1)
		defer mf.Close()
		k, err := Ingest(mf, rootAddr)
		if err != nil {
			if _, aerr := mf.Allocate(0); !errors.Is(aerr, unix.EINVAL) {
				t.Fatalf("Ingest failed (%v) but the file was adopted", err)
			}
			return
		}
		var blocks []pgalloc.Folio
		k.mu.Lock()
		k.in.mem.forEach(func(pfn uint64, order int) { blocks = append(blocks, pgalloc.Folio{PFN: pfn, Order: order}) })
		k.mu.Unlock()
		for _, b := range blocks {
			if b.PFN == 0 || b.PFN+b.Pages() > fuzzFilePages {
				t.Fatalf("accepted %v outside the %d-page file", b, fuzzFilePages)
			}
			got, err := k.RestoreFolio(b.Addr())
			if err != nil || got != b {
				t.Fatalf("RestoreFolio(%v) = %v, %v", b, got, err)
			}
			if g, refs, ok := mf.Lookup(b.PFN); !ok || g != b || refs != 1 {
				t.Fatalf("restored %v is not an adopted folio: %v %d %v", b, g, refs, ok)
			}
			if _, err := k.RestoreFolio(b.Addr()); err == nil {
				t.Fatalf("%v restored twice", b)
			}
			mf.Bytes(got)[0]++ // touching it must stay inside the mapping
		}
		if _, in := k.Dump(); in == nil {
			t.Fatal("no incoming root after a successful Ingest")
		}
		k.RetrieveSubtree("LUO")
	})
}

// TestFuzzSeedIngests checks that FuzzIngest's seed is a valid handover, so
// that the fuzzer starts from the success path.
func TestFuzzSeedIngests(t *testing.T) {
	mf := newFile(t, fuzzFilePages*abikho.PageSize)
	r, c0, b0, c1, b1 := fuzzSeed()
	for i, p := range [][]byte{r, c0, b0, c1, b1} {
		copy(page(t, mf, uint64(i+1)*abikho.PageSize), p)
	}
	k, err := Ingest(reopen(t, mf), abikho.PageSize)
	if err != nil {
		t.Fatalf("Ingest of the seed: %v", err)
	}
	for _, b := range []pgalloc.Folio{{PFN: 10}, {PFN: 11}, {PFN: 16, Order: 3}} {
		if got, err := k.RestoreFolio(b.Addr()); err != nil || got != b {
			t.Errorf("RestoreFolio(%v) = %v, %v", b, got, err)
		}
	}
	if a, err := k.RetrieveSubtree("LUO"); err != nil || a != 10*abikho.PageSize {
		t.Errorf("RetrieveSubtree = %#x, %v", a, err)
	}
}

// TestFuzzSeedV2Ingests checks that FuzzIngest's kho-v2 seed is a valid
// handover.
func TestFuzzSeedV2Ingests(t *testing.T) {
	mf := newFile(t, fuzzFilePages*abikho.PageSize)
	r, tree := fuzzSeedV2()
	copy(page(t, mf, abikho.PageSize), r)
	b, err := mf.Slice(fuzzTreePFN, uint64(len(tree))/abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	copy(b, tree)
	k, err := Ingest(reopen(t, mf), abikho.PageSize)
	if err != nil {
		t.Fatalf("Ingest of the kho-v2 seed: %v", err)
	}
	if got := k.IncomingFormat(); got != abikho.CompatibleV2 {
		t.Errorf("IncomingFormat = %q, want kho-v2", got)
	}
	for _, b := range []pgalloc.Folio{{PFN: 10}, {PFN: 11}, {PFN: 16, Order: 3}} {
		if got, err := k.RestoreFolio(b.Addr()); err != nil || got != b {
			t.Errorf("RestoreFolio(%v) = %v, %v", b, got, err)
		}
	}
	if a, err := k.RetrieveSubtree("LUO"); err != nil || a != 10*abikho.PageSize {
		t.Errorf("RetrieveSubtree = %#x, %v", a, err)
	}
	if n := k.ReleaseUnrestored(); n != 0 {
		t.Errorf("ReleaseUnrestored = %d pages, want 0 (the root page was reused)", n)
	}
}
