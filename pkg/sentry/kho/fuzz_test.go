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
// at page 1, map chunks at pages 2 and 4, bitmaps at pages 3 and 5.
const fuzzFilePages = 256

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

// FuzzIngest places arbitrary root, chunk and bitmap pages in a memory file
// and ingests it: Ingest must never panic, must adopt nothing when it fails,
// and every folio it accepts must lie inside the file and restore exactly
// once.
func FuzzIngest(f *testing.F) {
	r, c0, b0, c1, b1 := fuzzSeed()
	f.Add(r, c0, b0, c1, b1, uint64(abikho.PageSize))
	f.Add(r, c0, b0, c1, b1, uint64(2*abikho.PageSize))
	f.Add(r, c0, b0, []byte{}, []byte{}, uint64(abikho.PageSize))
	f.Fuzz(func(t *testing.T, root, chunk0, bitmap0, chunk1, bitmap1 []byte, rootAddr uint64) {
		fd, err := unix.MemfdCreate("kho-fuzz", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		file := os.NewFile(uintptr(fd), "kho-fuzz")
		if err := file.Truncate(fuzzFilePages * abikho.PageSize); err != nil {
			t.Fatal(err)
		}
		for i, p := range [][]byte{root, chunk0, bitmap0, chunk1, bitmap1} {
			if len(p) > abikho.PageSize {
				p = p[:abikho.PageSize]
			}
			if _, err := file.WriteAt(p, int64(i+1)*abikho.PageSize); err != nil {
				t.Fatal(err)
			}
		}
		mf, err := pgalloc.Open(file, pgalloc.Options{NoHugepages: true})
		if err != nil {
			t.Fatal(err)
		}
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
