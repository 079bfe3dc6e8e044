package kho

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

func TestVmallocReadWrite(t *testing.T) {
	mf := newFile(t, 16<<20)
	if _, err := AllocVmalloc(mf, 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("AllocVmalloc(0) = %v, want EINVAL", err)
	}
	if _, err := AllocVmalloc(mf, 1<<40); !errors.Is(err, unix.ENOMEM) {
		t.Errorf("AllocVmalloc(1 TiB) = %v, want ENOMEM", err)
	}
	const size = 3*abikho.PageSize + 100
	v, err := AllocVmalloc(mf, size)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Free()
	if v.Len() != size {
		t.Errorf("Len = %d, want %d", v.Len(), size)
	}
	buf := make([]byte, size)
	if n, err := v.ReadAt(buf, 0); n != size || err != nil || !isZero(buf) {
		t.Errorf("a new area: ReadAt = %d, %v, zero %v", n, err, isZero(buf))
	}
	msg := []byte("spans a page boundary")
	off := int64(2*abikho.PageSize - 5)
	if n, err := v.WriteAt(msg, off); n != len(msg) || err != nil {
		t.Fatalf("WriteAt = %d, %v", n, err)
	}
	if !bytes.Equal(v.Page(1)[abikho.PageSize-5:], msg[:5]) || !bytes.Equal(v.Page(2)[:len(msg)-5], msg[5:]) {
		t.Error("Page views do not show the write")
	}
	got := make([]byte, len(msg))
	if n, err := v.ReadAt(got, off); n != len(msg) || err != nil || !bytes.Equal(got, msg) {
		t.Errorf("ReadAt = %d, %v, %q", n, err, got)
	}
	if n, err := v.ReadAt(got, size-3); n != 3 || err != io.EOF {
		t.Errorf("ReadAt across the end = %d, %v; want 3, EOF", n, err)
	}
	if n, err := v.ReadAt(got, size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end = %d, %v; want 0, EOF", n, err)
	}
	if n, err := v.WriteAt(msg, size-3); n != 3 || !errors.Is(err, unix.EFBIG) {
		t.Errorf("WriteAt across the end = %d, %v; want 3, EFBIG", n, err)
	}
	if _, err := v.ReadAt(got, -1); !errors.Is(err, unix.EINVAL) {
		t.Errorf("ReadAt(-1) = %v, want EINVAL", err)
	}
	if _, err := v.WriteAt(got, -1); !errors.Is(err, unix.EINVAL) {
		t.Errorf("WriteAt(-1) = %v, want EINVAL", err)
	}
}

func TestVmallocChunkBoundaries(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name   string
			pages  uint64
			chunks int
		}{
			{"one page needs one chunk", 1, 1},
			{"511 pages fill one chunk with no terminator", 511, 1},
			{"512 pages need a second chunk", 512, 2},
			{"1023 pages need three chunks", 1023, 3},
		} {
			t.Run(tc.name, func(t *testing.T) {
				k, mf := newKHO(t, 64<<20)
				v, err := AllocVmalloc(mf, tc.pages*abikho.PageSize)
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < int(tc.pages); i++ {
					fill(v.Page(i), uint64(i))
				}
				desc, err := k.PreserveVmalloc(v)
				if err != nil {
					t.Fatal(err)
				}
				if desc.TotalPages != uint32(tc.pages) || desc.Order != 0 || desc.Flags != abikho.VmallocAlloc {
					t.Errorf("desc = %+v", desc)
				}
				chunks := 0
				for c := desc.First; c != 0; c = abikho.VmallocChunkNext(page(t, mf, c)) {
					chunks++
				}
				if chunks != tc.chunks {
					t.Errorf("%d chunks, want %d", chunks, tc.chunks)
				}
				if err := k.FinalizeFormat(format); err != nil {
					t.Fatal(err)
				}
				mf2 := reopen(t, mf)
				k2, err := Ingest(mf2, k.RootAddr())
				if err != nil {
					t.Fatal(err)
				}
				v2, err := k2.RestoreVmalloc(desc)
				if err != nil {
					t.Fatal(err)
				}
				if v2.Len() != tc.pages*abikho.PageSize {
					t.Errorf("restored Len = %d", v2.Len())
				}
				for i := 0; i < int(tc.pages); i++ {
					if !filled(v2.Page(i), uint64(i)) {
						t.Fatalf("page %d changed", i)
					}
				}
				// The chunk pages were consumed: only the area's pages and the new root remain restorable or allocated.
				if n := k2.ReleaseUnrestored(); n != 0 {
					t.Errorf("ReleaseUnrestored = %d pages, want 0", n)
				}
				v2.Free()
				// The root page, and a carried tree's pages.
				want := uint64(1)
				if k2.Carried() {
					want += treeNodes(k2)
				}
				if st := mf2.Stats(); st.AllocatedPages != want {
					t.Errorf("%d pages allocated after Free, want %d (the root and any carried tree)", st.AllocatedPages, want)
				}
			})
		}
	})
}

func TestPreserveVmallocRollsBack(t *testing.T) {
	k, mf := newKHO(t, 700*abikho.PageSize)
	// An area of every free page but two needs two chunk pages. With one of
	// the two taken, the second chunk fails after 511 blocks were preserved.
	free := mf.Stats().FreePages
	v, err := AllocVmalloc(mf, (free-2)*abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	last, err := mf.Allocate(0)
	if err != nil {
		t.Fatal(err)
	}
	before := marked(k)
	if _, err := k.PreserveVmalloc(v); !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("PreserveVmalloc in a full file = %v, want ENOMEM", err)
	}
	if got := marked(k); len(got) != len(before) {
		t.Errorf("a failed PreserveVmalloc left %d blocks preserved, want %d", len(got), len(before))
	}
	mf.DecRef(last)
	desc, err := k.PreserveVmalloc(v)
	if err != nil {
		t.Fatalf("PreserveVmalloc with two free pages: %v", err)
	}
	if err := k.UnpreserveVmalloc(desc); err != nil {
		t.Fatal(err)
	}
	if got := marked(k); len(got) != len(before) {
		t.Errorf("after UnpreserveVmalloc %d blocks are preserved, want %d", len(got), len(before))
	}
	if err := k.UnpreserveVmalloc(desc); err == nil {
		t.Error("a second UnpreserveVmalloc succeeded")
	}
	v.Free()
}

func TestRestoreVmallocValidation(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name    string
			corrupt func(d *abikho.Vmalloc, chunk []byte, slots []uint64)
			msg     string
		}{
			{"more pages than total_pages fail", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.TotalPages-- }, "more pages than total_pages"},
			{"fewer pages than total_pages fail", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.TotalPages++ }, "total_pages is 601"},
			{"unknown flags fail", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.Flags |= 0x8 }, "unknown flags"},
			{"an order above the maximum fails", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.Order = 11 }, "order 11"},
			{"another order fails", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.Order = 1; d.TotalPages = 1200 }, "order 1"},
			{"a zero first chunk fails", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.First = 0 }, "first is 0"},
			{"a first chunk that is not preserved fails", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.First = 32 << 20 }, "vmalloc chunk at 0x2000000: not a preserved"},
			{"a misaligned first chunk fails", func(d *abikho.Vmalloc, _ []byte, _ []uint64) { d.First += 8 }, "page-aligned"},
			{"a cycle in the chunk list fails", func(d *abikho.Vmalloc, chunk []byte, _ []uint64) {
				abikho.SetVmallocChunkNext(chunk, d.First)
			}, "loops back"},
			{"a block listed twice fails", func(_ *abikho.Vmalloc, chunk []byte, slots []uint64) {
				abikho.SetVmallocChunkPhys(chunk, 1, slots[0])
			}, "already restored"},
			{"a misaligned block fails", func(_ *abikho.Vmalloc, chunk []byte, slots []uint64) {
				abikho.SetVmallocChunkPhys(chunk, 1, slots[1]+1)
			}, "slot 1"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				k, mf := newKHO(t, 64<<20)
				v, err := AllocVmalloc(mf, 600*abikho.PageSize)
				if err != nil {
					t.Fatal(err)
				}
				desc, err := k.PreserveVmalloc(v)
				if err != nil {
					t.Fatal(err)
				}
				if err := k.FinalizeFormat(format); err != nil {
					t.Fatal(err)
				}
				chunk := page(t, mf, desc.First)
				orig := bytes.Clone(chunk)
				slots := []uint64{abikho.VmallocChunkPhys(chunk, 0), abikho.VmallocChunkPhys(chunk, 1)}
				bad := desc
				tc.corrupt(&bad, chunk, slots)
				k2, err := Ingest(reopen(t, mf), k.RootAddr())
				if err != nil {
					t.Fatal(err)
				}
				_, err = k2.RestoreVmalloc(bad)
				if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), tc.msg) {
					t.Fatalf("RestoreVmalloc = %v, want EINVAL mentioning %q", err, tc.msg)
				}
				// Nothing was consumed: the real descriptor still restores.
				copy(chunk, orig)
				if _, err := k2.RestoreVmalloc(desc); err != nil {
					t.Errorf("RestoreVmalloc after a failed one: %v", err)
				}
			})
		}
	})
}

// TestVmallocReadPagesMatchesThePagesAcrossScatteredBlocks reads every
// range of pages of areas whose blocks are partly contiguous in the memory
// file and partly not, out of order, with ReadPages, and compares each
// with the pages seen through the mapping.
func TestVmallocReadPagesMatchesThePagesAcrossScatteredBlocks(t *testing.T) {
	mf := newFile(t, 16<<20)
	for _, order := range []int{0, 1} {
		// Blocks 0 1 2 4 3 5 6 8 9: runs of 3, 1, 1, 2 and 2 blocks.
		run, err := mf.AllocatePages(10 << order)
		if err != nil {
			t.Fatal(err)
		}
		v := &Vmalloc{mf: mf, order: order}
		for _, b := range []uint64{0, 1, 2, 4, 3, 5, 6, 8, 9} {
			v.blocks = append(v.blocks, pgalloc.Folio{PFN: run.PFN + b<<order, Order: order})
		}
		pages := len(v.blocks) << order
		v.size = uint64(pages) * abikho.PageSize
		for i := range pages {
			p := v.Page(i)
			for j := range p {
				p[j] = byte(i*7 + j*13 + order)
			}
		}
		for i := range pages {
			for n := 1; i+n <= pages; n++ {
				got := make([]byte, n*abikho.PageSize)
				if err := v.ReadPages(i, got); err != nil {
					t.Fatalf("order %d: ReadPages(%d, %d pages): %v", order, i, n, err)
				}
				for k := range n {
					if !bytes.Equal(got[k*abikho.PageSize:(k+1)*abikho.PageSize], v.Page(i+k)) {
						t.Fatalf("order %d: ReadPages(%d, %d pages): page %d differs from Page(%d)", order, i, n, k, i+k)
					}
				}
			}
		}
	}
}
