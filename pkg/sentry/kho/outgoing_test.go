package kho

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// marked returns the blocks k's outgoing tracker holds, in tracker order.
func marked(k *KHO) []pgalloc.Folio {
	k.mu.Lock()
	defer k.mu.Unlock()
	var fs []pgalloc.Folio
	k.out.tree.forEach(func(pfn uint64, order int) { fs = append(fs, pgalloc.Folio{PFN: pfn, Order: order}) })
	return fs
}

// newKHO returns a cold-booted KHO over a new file of size bytes, with its
// radix tree already made (New makes it at the first preserve), so that the
// root FDT page is preserved and the tests see only what they preserve
// change.
func newKHO(t *testing.T, size uint64) (*KHO, *pgalloc.MemoryFile) {
	t.Helper()
	mf := newFile(t, size)
	k, err := New(mf)
	if err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	_, err = k.treeLocked()
	k.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	return k, mf
}

func TestPreservePagesSplitsIntoAlignedBlocks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		pfn, n uint64
		want   []pgalloc.Folio // besides the root page
	}{
		{"an aligned power of two is one block", 8, 8, []pgalloc.Folio{fo(8, 3)}},
		{"an unaligned range splits at alignment boundaries", 3, 13, []pgalloc.Folio{fo(3, 0), fo(4, 2), fo(8, 3)}},
		{"a tail shorter than the alignment splits by size", 16, 7, []pgalloc.Folio{fo(22, 0), fo(20, 1), fo(16, 2)}},
		{"blocks stop at the maximum order", 1024, 2048, []pgalloc.Folio{fo(1024, 10), fo(2048, 10)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, _ := newKHO(t, 64<<20)
			before := marked(k)
			if err := k.PreservePages(tc.pfn, tc.n); err != nil {
				t.Fatal(err)
			}
			// The root page is preserved too; leave it out.
			got := slicesDelete(marked(k), before)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("blocks = %v, want %v", got, tc.want)
			}
			if err := k.UnpreservePages(tc.pfn, tc.n+1); !errors.Is(err, unix.ENOENT) {
				t.Errorf("UnpreservePages of another range = %v, want ENOENT", err)
			}
			if err := k.UnpreservePages(tc.pfn, tc.n); err != nil {
				t.Errorf("UnpreservePages of the same range: %v", err)
			}
			if got := marked(k); fmt.Sprint(got) != fmt.Sprint(before) {
				t.Errorf("after UnpreservePages: %v, want %v", got, before)
			}
		})
	}
}

func fo(pfn uint64, order int) pgalloc.Folio { return pgalloc.Folio{PFN: pfn, Order: order} }

// slicesDelete returns all without the elements of some.
func slicesDelete(all, some []pgalloc.Folio) []pgalloc.Folio {
	var out []pgalloc.Folio
outer:
	for _, a := range all {
		for _, s := range some {
			if a == s {
				continue outer
			}
		}
		out = append(out, a)
	}
	return out
}

func TestOutgoingErrors(t *testing.T) {
	k, mf := newKHO(t, 64<<20)
	pages := mf.Pages()
	big, err := mf.Allocate(3)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.PreserveFolio(big); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		call  func() error
		errno error
	}{
		{"preserving pfn 0 fails", func() error { return k.PreserveFolio(pgalloc.Folio{PFN: 0}) }, unix.EINVAL},
		{"preserving a misaligned folio fails", func() error { return k.PreserveFolio(pgalloc.Folio{PFN: 3, Order: 1}) }, unix.EINVAL},
		{"preserving past the file fails", func() error { return k.PreserveFolio(pgalloc.Folio{PFN: pages - 4, Order: 3}) }, unix.EINVAL},
		{"preserving an order above the maximum fails", func() error { return k.PreserveFolio(pgalloc.Folio{PFN: 1 << 11, Order: 11}) }, unix.EINVAL},
		{"preserving a negative order fails", func() error { return k.PreserveFolio(pgalloc.Folio{PFN: 1, Order: -1}) }, unix.EINVAL},
		{"preserving an empty page range fails", func() error { return k.PreservePages(5, 0) }, unix.EINVAL},
		{"preserving pages past the file fails", func() error { return k.PreservePages(pages-1, 2) }, unix.EINVAL},
		{"unpreserving a part of a folio fails", func() error { return k.UnpreserveFolio(pgalloc.Folio{PFN: big.PFN, Order: 0}) }, unix.ENOENT},
		{"unpreserving with another order fails", func() error { return k.UnpreserveFolio(pgalloc.Folio{PFN: big.PFN, Order: 2}) }, unix.ENOENT},
		{"allocating 0 bytes fails", func() error { _, err := k.AllocPreserve(0); return err }, unix.EINVAL},
		{"allocating above the maximum order fails", func() error { _, err := k.AllocPreserve(4<<20 + 1); return err }, unix.E2BIG},
		{"allocating the maximum order succeeds", func() error { _, err := k.AllocPreserve(4 << 20); return err }, nil},
		{"unpreserve-free of the zero folio is a no-op", func() error { return k.UnpreserveFree(pgalloc.Folio{}) }, nil},
		{"unpreserve-free of an unpreserved folio fails", func() error {
			f, _ := mf.Allocate(0)
			return k.UnpreserveFree(f)
		}, unix.ENOENT},
		{"unpreserve-free of an unallocated folio fails", func() error { return k.UnpreserveFree(pgalloc.Folio{PFN: pages - 1}) }, unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); tc.errno == nil && err != nil || tc.errno != nil && !errors.Is(err, tc.errno) {
				t.Errorf("got %v, want %v", err, tc.errno)
			}
		})
	}
	if err := k.UnpreserveFolio(big); err != nil {
		t.Errorf("exact UnpreserveFolio: %v", err)
	}
}

func TestAllocPreserveIsZeroedAndPowerOfTwo(t *testing.T) {
	k, mf := newKHO(t, 64<<20)
	for _, tc := range []struct {
		name  string
		size  uint64
		order int
	}{
		{"one byte is one page", 1, 0},
		{"one page is one page", abikho.PageSize, 0},
		{"a page and a byte is two pages", abikho.PageSize + 1, 1},
		{"five pages round up to eight", 5 * abikho.PageSize, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Leave dirty freed memory behind so that zeroing is tested.
			d, _ := mf.Allocate(tc.order)
			fill(mf.Bytes(d), 7)
			mf.DecRef(d)
			f, err := k.AllocPreserve(tc.size)
			if err != nil || f.Order != tc.order {
				t.Fatalf("AllocPreserve(%d) = %v, %v; want order %d", tc.size, f, err, tc.order)
			}
			if !isZero(mf.Bytes(f)) {
				t.Errorf("AllocPreserve(%d) is not zeroed", tc.size)
			}
			if err := k.UnpreserveFree(f); err != nil {
				t.Fatal(err)
			}
			if _, _, ok := mf.Lookup(f.PFN); ok {
				t.Errorf("UnpreserveFree did not free %v", f)
			}
		})
	}
}

func TestFinalizeAbort(t *testing.T) {
	k, mf := newKHO(t, 256<<20)
	// Enough bitmaps for two chunks of order 0: 300 bitmaps of 128 MiB
	// each would need a 37 GiB file, so use order 0 bitmaps across orders
	// instead: one block in each of 11 orders plus a spread at order 0.
	for o := 0; o <= pgalloc.MaxOrder; o++ {
		if err := k.PreserveFolio(pgalloc.Folio{PFN: 1 << 14, Order: o}); err != nil {
			t.Fatal(err)
		}
	}
	base := mf.Stats().AllocatedPages
	if err := k.Finalize(); err != nil {
		t.Fatal(err)
	}
	// 11 orders: 11 chunks and 11 bitmaps, all from the kho-v1 reserve
	// that the preserves took.
	if got := mf.Stats().AllocatedPages - base; got != 0 {
		t.Errorf("Finalize allocated %d pages, want 0 (its 11 chunks and 11 bitmaps come from the reserve)", got)
	}
	first := memMapAddr(t, k)
	if first == 0 {
		t.Fatal("preserved-memory-map is 0 after Finalize")
	}
	if err := k.PreserveFolio(pgalloc.Folio{PFN: 2, Order: 0}); !errors.Is(err, unix.EBUSY) {
		t.Errorf("PreserveFolio after Finalize = %v, want EBUSY", err)
	}
	if _, err := k.AllocPreserve(1); !errors.Is(err, unix.EBUSY) {
		t.Errorf("AllocPreserve after Finalize = %v, want EBUSY", err)
	}
	// A repeat writes a new list (the reserve is in use: 22 new pages)
	// and gives the previous one back to the reserve.
	if err := k.Finalize(); err != nil {
		t.Fatal(err)
	}
	if got := mf.Stats().AllocatedPages - base; got != 22 {
		t.Errorf("after a second Finalize %d more pages are allocated, want 22", got)
	}
	if err := k.Abort(); err != nil {
		t.Fatal(err)
	}
	if got := mf.Stats().AllocatedPages; got != base {
		t.Errorf("after Abort %d pages are allocated, want %d", got, base)
	}
	if m, root := memMapAddr(t, k), treeRoot(k); m != root || root == 0 || k.Format() != abikho.CompatibleV2 {
		t.Errorf("after Abort the root is %s with preserved-memory-map %#x, want kho-v2 naming the radix tree at %#x", k.Format(), m, root)
	}
	if err := k.PreserveFolio(pgalloc.Folio{PFN: 2, Order: 0}); err != nil {
		t.Errorf("PreserveFolio after Abort: %v", err)
	}
	if err := k.Abort(); err != nil {
		t.Errorf("a second Abort: %v", err)
	}
}

func TestFinalizeChainsFullChunks(t *testing.T) {
	// 300 order-0 bitmaps need two chunks; each bitmap spans 128 MiB, so
	// the file is 38 GiB (sparse: only the map pages are touched).
	k, mf := newKHO(t, 300<<27+1<<20)
	for i := uint64(0); i < 300; i++ {
		if err := k.PreserveFolio(pgalloc.Folio{PFN: i<<15 + 2}); err != nil {
			t.Fatal(err)
		}
	}
	if err := k.Finalize(); err != nil {
		t.Fatal(err)
	}
	var hdr abikho.MemChunkHdr
	hdr.Decode(page(t, mf, memMapAddr(t, k)))
	if hdr.NumElms != abikho.MemChunkCapacity || hdr.Next == 0 || hdr.Order != 0 {
		t.Fatalf("first chunk = %+v, want a full order-0 chunk with a next", hdr)
	}
	var hdr2 abikho.MemChunkHdr
	hdr2.Decode(page(t, mf, hdr.Next))
	if hdr2.NumElms != 300-abikho.MemChunkCapacity || hdr2.Next != 0 {
		t.Fatalf("second chunk = %+v, want 45 bitmaps and no next", hdr2)
	}
	k2, err := Ingest(reopen(t, mf), k.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(0); i < 300; i++ {
		if _, err := k2.RestoreFolio((i<<15 + 2) << abikho.PageShift); err != nil {
			t.Fatalf("block %d: %v", i, err)
		}
	}
}

func TestSubtrees(t *testing.T) {
	k, _ := newKHO(t, 64<<20)
	for _, tc := range []struct {
		name  string
		call  func() error
		errno error
	}{
		{"adding a subtree succeeds", func() error { return k.AddSubtree("LUO", 0x5000) }, nil},
		{"adding a duplicate name fails", func() error { return k.AddSubtree("LUO", 0x6000) }, unix.EEXIST},
		{"adding an empty name fails", func() error { return k.AddSubtree("", 0x6000) }, unix.EINVAL},
		{"adding a name with a slash fails", func() error { return k.AddSubtree("a/b", 0x6000) }, unix.EINVAL},
		{"adding address 0 fails", func() error { return k.AddSubtree("zero", 0) }, unix.EINVAL},
		{"adding an address past the file fails", func() error { return k.AddSubtree("far", 64<<20) }, unix.EINVAL},
		{"removing an unknown blob fails", func() error { return k.RemoveSubtree(0x7000) }, unix.ENOENT},
		{"removing a blob succeeds", func() error { return k.RemoveSubtree(0x5000) }, nil},
		{"the name can be added again after removal", func() error { return k.AddSubtree("LUO", 0x6000) }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); tc.errno == nil && err != nil || tc.errno != nil && !errors.Is(err, tc.errno) {
				t.Errorf("got %v, want %v", err, tc.errno)
			}
		})
	}
	if v, err := rootTree(t, k).Child("LUO").U64("preserved-data"); err != nil || v != 0x6000 {
		t.Errorf("root LUO/preserved-data = %#x, %v; want 0x6000", v, err)
	}
	// Fill the root page: the subtree that does not fit fails with ENOMEM
	// and the root stays valid with all the others.
	var added int
	for i := 0; ; i++ {
		err := k.AddSubtree(fmt.Sprintf("subsystem-with-a-long-name-%03d", i), 0x8000)
		if errors.Is(err, unix.ENOMEM) {
			break
		}
		if err != nil || i > 1000 {
			t.Fatalf("AddSubtree %d: %v", i, err)
		}
		added++
	}
	if got := len(rootTree(t, k).Children); got != added+1 {
		t.Errorf("root has %d subtrees after ENOMEM, want %d", got, added+1)
	}
}

func TestDtcDecodesRoot(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dtc, err := exec.LookPath("dtc")
		if err != nil {
			t.Skip("dtc not installed (apt-get install device-tree-compiler); .ci/run installs it")
		}
		k, mf := newKHO(t, 64<<20)
		luo, _ := k.AllocPreserve(1)
		mem, _ := k.AllocPreserve(1)
		if err := k.AddSubtree("LUO", luo.Addr()); err != nil {
			t.Fatal(err)
		}
		if err := k.AddSubtree("memblock", mem.Addr()); err != nil {
			t.Fatal(err)
		}
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		out, _ := k.Dump()
		// dtc reads the page as it sits in the file, trailing zeros and all.
		cmd := exec.Command(dtc, "-I", "dtb", "-O", "dts")
		cmd.Stdin = bytes.NewReader(page(t, mf, k.RootAddr()))
		dts, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("dtc: %v\n%s", err, dts)
		}
		cell := func(v uint64) string { // a little-endian u64 as dtc prints it
			b := make([]byte, 8)
			for i := range b {
				b[i] = byte(v >> (8 * i))
			}
			be := func(x []byte) uint32 { return uint32(x[0])<<24 | uint32(x[1])<<16 | uint32(x[2])<<8 | uint32(x[3]) }
			return fmt.Sprintf("<%#x %#x>", be(b[:4]), be(b[4:]))
		}
		for _, want := range []string{
			`compatible = "` + format + `";`,
			"preserved-memory-map = " + fixZero(cell(memMapAddr(t, k))) + ";",
			"LUO {",
			subtreeProp(format) + " = " + fixZero(cell(luo.Addr())) + ";",
			"memblock {",
			subtreeProp(format) + " = " + fixZero(cell(mem.Addr())) + ";",
		} {
			if !strings.Contains(string(dts), want) {
				t.Errorf("dtc output lacks %q:\n%s", want, dts)
			}
		}
		if n, err := fdt.Parse(out, len(out)); err != nil || len(n.Children) != 2 {
			t.Errorf("Dump's outgoing root: %v, %v", n, err)
		}
	})
}

// fixZero spells a zero cell the way dtc does (0x00).
func fixZero(s string) string {
	s = strings.ReplaceAll(s, " 0x0>", " 0x00>")
	return strings.ReplaceAll(s, "<0x0 ", "<0x00 ")
}
