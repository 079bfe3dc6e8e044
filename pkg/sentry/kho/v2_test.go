package kho

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// walkTree decodes the kho-v2 tree at root in mf the way
// kho_radix_walk_tree does, independently of the package's reader: every
// set leaf bit, decoded from its key, sorted by pfn then order.
func walkTree(tb testing.TB, mf *pgalloc.MemoryFile, root uint64) []pgalloc.Folio {
	tb.Helper()
	var out []pgalloc.Folio
	var walk func(addr uint64, level int, key uint64)
	walk = func(addr uint64, level int, key uint64) {
		p := page(tb, mf, addr)
		if level == 0 {
			for i := 0; i < abikho.RadixLeafBits; i++ {
				if abikho.LeafTest(p, i) {
					pa, order, ok := abikho.RadixDecodeKey(key | uint64(i))
					if !ok {
						tb.Fatalf("leaf at %#x: bit %d has no valid key", addr, i)
					}
					out = append(out, pgalloc.Folio{PFN: pa >> abikho.PageShift, Order: order})
				}
			}
			return
		}
		for i := 0; i < abikho.RadixTableEntries; i++ {
			if e := abikho.RadixNodeEntry(p, i); e != 0 {
				walk(e, level-1, key|uint64(i)<<abikho.RadixTableShift(level))
			}
		}
	}
	walk(root, abikho.RadixTreeMaxDepth-1, 0)
	sortFolios(out)
	return out
}

// treeNodes returns the number of pages of k's outgoing tree.
func treeNodes(k *KHO) uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return uint64(len(k.out.tree.nodes))
}

// treePages returns a copy of every page of k's outgoing tree, by address.
func treePages(tb testing.TB, k *KHO) map[uint64][]byte {
	tb.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	m := make(map[uint64][]byte)
	for _, f := range k.out.tree.nodes {
		m[f.Addr()] = bytes.Clone(k.mf.Bytes(f))
	}
	return m
}

func sortFolios(fs []pgalloc.Folio) {
	slices.SortFunc(fs, func(a, b pgalloc.Folio) int {
		if a.PFN != b.PFN {
			return int(int64(a.PFN - b.PFN))
		}
		return a.Order - b.Order
	})
}

// TestTreeIsCurrentAfterEveryChange applies random preserves and
// unpreserves (folios, page ranges, AllocPreserve, vmalloc areas) and after
// each one decodes the tree from the memory file, through the address the
// root FDT names, and compares it with the set the test expects.
func TestTreeIsCurrentAfterEveryChange(t *testing.T) {
	for seed := uint64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprintf("seed %d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			k, mf := newKHO(t, 256<<20)
			want := map[pgalloc.Folio]bool{}
			for _, f := range marked(k) { // the root FDT page
				want[f] = true
			}
			check := func(op string) {
				t.Helper()
				var exp []pgalloc.Folio
				for f := range want {
					exp = append(exp, f)
				}
				sortFolios(exp)
				got := walkTree(t, mf, memMapAddr(t, k))
				if !slices.Equal(got, exp) {
					t.Fatalf("after %s the tree holds %d blocks, want %d: %v vs %v", op, len(got), len(exp), got, exp)
				}
			}
			type pagesRange struct{ pfn, n uint64 }
			var folios []pgalloc.Folio
			var ranges []pagesRange
			var allocs []pgalloc.Folio
			type area struct {
				v    *Vmalloc
				desc abikho.Vmalloc
			}
			var areas []area
			for step := 0; step < 300; step++ {
				switch op := rng.IntN(8); {
				case op < 2:
					f, err := mf.Allocate(rng.IntN(pgalloc.MaxOrder + 1))
					if err != nil {
						continue
					}
					if err := k.PreserveFolio(f); err != nil {
						t.Fatal(err)
					}
					folios = append(folios, f)
					want[f] = true
					check("PreserveFolio")
				case op == 2 && len(folios) > 0:
					i := rng.IntN(len(folios))
					f := folios[i]
					folios = append(folios[:i], folios[i+1:]...)
					if err := k.UnpreserveFolio(f); err != nil {
						t.Fatal(err)
					}
					delete(want, f)
					mf.DecRef(f)
					check("UnpreserveFolio")
				case op == 3 && len(ranges) < 7:
					// A range in the top half of the file, which the
					// allocator (buddy-style, from the bottom) leaves alone.
					r := pagesRange{pfn: mf.Pages()/2 + uint64(len(ranges))*4096 + uint64(rng.IntN(1000)), n: 1 + uint64(rng.IntN(3000))}
					if err := k.PreservePages(r.pfn, r.n); err != nil {
						t.Fatal(err)
					}
					ranges = append(ranges, r)
					splitBlocks(r.pfn, r.n, func(p uint64, o int) bool { want[pgalloc.Folio{PFN: p, Order: o}] = true; return true })
					check("PreservePages")
				case op == 4 && len(ranges) > 0:
					r := ranges[len(ranges)-1]
					ranges = ranges[:len(ranges)-1]
					if err := k.UnpreservePages(r.pfn, r.n); err != nil {
						t.Fatal(err)
					}
					splitBlocks(r.pfn, r.n, func(p uint64, o int) bool { delete(want, pgalloc.Folio{PFN: p, Order: o}); return true })
					check("UnpreservePages")
				case op == 5:
					f, err := k.AllocPreserve(1 + uint64(rng.IntN(64<<10)))
					if err != nil {
						t.Fatal(err)
					}
					allocs = append(allocs, f)
					want[f] = true
					check("AllocPreserve")
				case op == 6 && len(allocs) > 0:
					f := allocs[0]
					allocs = allocs[1:]
					if err := k.UnpreserveFree(f); err != nil {
						t.Fatal(err)
					}
					delete(want, f)
					check("UnpreserveFree")
				case op == 7 && len(areas) < 3:
					v, err := AllocVmalloc(mf, 1+uint64(rng.IntN(600*abikho.PageSize)))
					if err != nil {
						t.Fatal(err)
					}
					desc, err := k.PreserveVmalloc(v)
					if err != nil {
						t.Fatal(err)
					}
					areas = append(areas, area{v, desc})
					for _, b := range v.Blocks() {
						want[b] = true
					}
					for c := desc.First; c != 0; c = abikho.VmallocChunkNext(page(t, mf, c)) {
						want[pgalloc.Folio{PFN: c >> abikho.PageShift}] = true
					}
					check("PreserveVmalloc")
				case op == 7:
					a := areas[0]
					areas = areas[1:]
					for c := a.desc.First; c != 0; c = abikho.VmallocChunkNext(page(t, mf, c)) {
						delete(want, pgalloc.Folio{PFN: c >> abikho.PageShift})
					}
					if err := k.UnpreserveVmalloc(a.desc); err != nil {
						t.Fatal(err)
					}
					for _, b := range a.v.Blocks() {
						delete(want, b)
					}
					a.v.Free()
					check("UnpreserveVmalloc")
				}
			}
		})
	}
}

// TestFinalizeFormat checks choosing the format at handover: kho-v2 costs
// no allocation and leaves the tree as it is, kho-v1 writes chunks, a
// switch frees the other format's pages, and an unknown format is refused.
func TestFinalizeFormat(t *testing.T) {
	k, mf := newKHO(t, 64<<20)
	f, err := k.AllocPreserve(3 * abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	tree := walkTree(t, mf, treeRoot(k))
	base := mf.Stats().AllocatedPages

	if err := k.FinalizeFormat("kho-v9"); !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), `"kho-v9"`) || !strings.Contains(err.Error(), `"kho-v2" "kho-v1"`) {
		t.Errorf("FinalizeFormat(kho-v9) = %v, want EINVAL naming it and both formats written", err)
	}
	if err := k.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	if got := mf.Stats().AllocatedPages; got != base {
		t.Errorf("a kho-v2 handover allocated %d pages, want none", got-base)
	}
	if got := walkTree(t, mf, memMapAddr(t, k)); !slices.Equal(got, tree) || memMapAddr(t, k) != treeRoot(k) {
		t.Errorf("after a kho-v2 handover the root names a tree with %v, want the live tree %v", got, tree)
	}
	if k.Format() != abikho.CompatibleV2 {
		t.Errorf("Format = %q, want kho-v2", k.Format())
	}
	if err := k.PreserveFolio(pgalloc.Folio{PFN: 1000}); !errors.Is(err, unix.EBUSY) {
		t.Errorf("PreserveFolio after a kho-v2 handover = %v, want EBUSY", err)
	}

	// Switching to kho-v1 writes one chunk and one bitmap per order used
	// (orders 0 and 2), taken from the reserve, and back to kho-v2 gives
	// them back.
	if got := reserveLen(k); got != 4 {
		t.Errorf("kho-v1 reserve of a tree with leaves of two orders: %d pages, want 4", got)
	}
	if err := k.FinalizeFormat(abikho.CompatibleV1); err != nil {
		t.Fatal(err)
	}
	if got := mf.Stats().AllocatedPages - base; got != 0 || k.Format() != abikho.CompatibleV1 || reserveLen(k) != 0 {
		t.Errorf("kho-v1 after kho-v2: %d new pages, format %q, %d reserve pages left; want 0, kho-v1, 0", got, k.Format(), reserveLen(k))
	}
	if s, _ := rootTree(t, k).String("compatible"); s != abikho.CompatibleV1 {
		t.Errorf("root compatible = %q, want kho-v1", s)
	}
	if err := k.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	if got := mf.Stats().AllocatedPages; got != base {
		t.Errorf("kho-v2 after kho-v1 left %d map pages allocated", got-base)
	}
	if err := k.Abort(); err != nil {
		t.Fatal(err)
	}
	if err := k.UnpreserveFree(f); err != nil {
		t.Errorf("UnpreserveFree after Abort: %v", err)
	}
}

// TestPreserveRollsBackTreeNodes fills the file so that the tree cannot
// grow: a preserve that needs new nodes fails with ENOMEM and leaves the
// tree, its spare run and the allocator as they were (kho_radix_add_page's
// err_free_nodes), whether no node or some nodes could be allocated, from
// the file or from the spare run.
func TestPreserveRollsBackTreeNodes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		free  int // pages left free before the preserve
		spare int // pages left in the tree's spare run
		call  func(k *KHO) error
	}{
		{"a folio of a new order with no free page fails cleanly", 0, 0, func(k *KHO) error {
			return k.PreserveFolio(pgalloc.Folio{PFN: 32, Order: 5})
		}},
		{"a folio of a new order with two free pages fails cleanly", 2, 0, func(k *KHO) error {
			return k.PreserveFolio(pgalloc.Folio{PFN: 32, Order: 5})
		}},
		// Two free pages go to the kho-v1 reserve, taken before the nodes.
		{"a folio of a new order with two pages in the spare run fails cleanly", 2, 2, func(k *KHO) error {
			return k.PreserveFolio(pgalloc.Folio{PFN: 32, Order: 5})
		}},
		{"a folio of a new order with a spare page and a free page fails cleanly", 3, 1, func(k *KHO) error {
			return k.PreserveFolio(pgalloc.Folio{PFN: 32, Order: 5})
		}},
		{"a page range whose last block needs new nodes is undone", 3, 0, func(k *KHO) error {
			return k.PreservePages(3, 29) // pfn 3 in the existing order-0 leaf, then 4 of order 2 in a new path
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, mf := newKHO(t, 4<<20)
			var hold []pgalloc.Folio
			for mf.Stats().FreePages > uint64(tc.free) {
				f, err := mf.Allocate(0)
				if err != nil {
					t.Fatal(err)
				}
				hold = append(hold, f)
			}
			k.mu.Lock()
			tree := &k.out.tree
			if len(tree.spare) < tc.spare {
				k.mu.Unlock()
				t.Fatalf("the tree has %d spare pages, want at least %d", len(tree.spare), tc.spare)
			}
			hold = append(hold, tree.spare[tc.spare:]...)
			tree.spare = tree.spare[:tc.spare]
			spare := slices.Clone(tree.spare)
			k.mu.Unlock()
			before := walkTree(t, mf, treeRoot(k))
			nodes := treePages(t, k)
			allocated := mf.Stats().AllocatedPages
			if err := tc.call(k); !errors.Is(err, unix.ENOMEM) {
				t.Fatalf("got %v, want ENOMEM", err)
			}
			if got := walkTree(t, mf, treeRoot(k)); !slices.Equal(got, before) {
				t.Errorf("after the failure the tree holds %v, want %v", got, before)
			}
			if got := mf.Stats().AllocatedPages; got != allocated {
				t.Errorf("after the failure %d pages are allocated, want %d (the new nodes freed)", got, allocated)
			}
			if got := marked(k); !slices.Equal(got, before) {
				t.Errorf("after the failure the tracker holds %v, want %v", got, before)
			}
			if got := treePages(t, k); !maps.EqualFunc(got, nodes, bytes.Equal) {
				t.Errorf("after the failure the tree's pages changed (a dangling entry?)")
			}
			k.mu.Lock()
			gotSpare := slices.Clone(tree.spare)
			k.mu.Unlock()
			if !slices.Equal(gotSpare, spare) {
				t.Errorf("after the failure the spare run is %v, want %v", gotSpare, spare)
			}
			for _, f := range gotSpare {
				if !bytes.Equal(mf.Bytes(f), zeroPage[:]) {
					t.Errorf("after the failure spare page %v is not zero", f)
				}
			}
			// With room again the same call succeeds.
			for _, f := range hold {
				mf.DecRef(f)
			}
			mf.Drain()
			if err := tc.call(k); err != nil {
				t.Errorf("with free memory: %v", err)
			}
		})
	}
}

// TestNewMakesTheTreeAtTheFirstPreserve checks that a cold boot allocates
// only the root FDT page, and that the first preserve makes the tree with
// the root page and the folio in it.
func TestNewMakesTheTreeAtTheFirstPreserve(t *testing.T) {
	mf := newFile(t, 64<<20)
	k, err := New(mf)
	if err != nil {
		t.Fatal(err)
	}
	if got := mf.Stats().AllocatedPages; got != 1 || memMapAddr(t, k) != 0 {
		t.Errorf("after New: %d pages allocated, preserved-memory-map %#x; want 1 (the root FDT) and 0", got, memMapAddr(t, k))
	}
	f, err := k.AllocPreserve(1)
	if err != nil {
		t.Fatal(err)
	}
	want := []pgalloc.Folio{{PFN: k.RootAddr() >> abikho.PageShift}, f}
	sortFolios(want)
	if got := walkTree(t, mf, memMapAddr(t, k)); !slices.Equal(got, want) {
		t.Errorf("after the first preserve the tree holds %v, want %v", got, want)
	}
	if got := mf.Stats().AllocatedPages; got != 1+1+1<<nodeRunOrder+2 {
		t.Errorf("after the first preserve %d pages are allocated, want the root FDT, the folio, a run of %d pages for the %d tree nodes and 2 kho-v1 reserve pages", got, 1<<nodeRunOrder, abikho.RadixTreeMaxDepth)
	}
	k.mu.Lock()
	spare := len(k.out.tree.spare)
	k.mu.Unlock()
	if got := spare; got != 1<<nodeRunOrder-abikho.RadixTreeMaxDepth {
		t.Errorf("after the first preserve the tree keeps %d spare pages, want %d", got, 1<<nodeRunOrder-abikho.RadixTreeMaxDepth)
	}
	if got := k.TreePages(); got != 1<<nodeRunOrder+2 {
		t.Errorf("TreePages after the first preserve = %d, want the run of %d and 2 kho-v1 reserve pages", got, 1<<nodeRunOrder)
	}
}

// TestIngestMakesTheTreeAtTheFirstPreserve checks that Ingest of a kho-v1
// map allocates no tree (it must not allocate) and that the first preserve
// makes one that holds the reused root page too.
func TestIngestMakesTheTreeAtTheFirstPreserve(t *testing.T) {
	k1, mf1 := newKHO(t, 64<<20)
	f, err := k1.AllocPreserve(1)
	if err != nil {
		t.Fatal(err)
	}
	if err := k1.FinalizeFormat(abikho.CompatibleV1); err != nil {
		t.Fatal(err)
	}
	mf2 := reopen(t, mf1)
	k2, err := Ingest(mf2, k1.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	if k2.Carried() {
		t.Error("a kho-v1 handover was carried")
	}
	if m := memMapAddr(t, k2); m != 0 || k2.Format() != abikho.CompatibleV2 {
		t.Errorf("after Ingest the outgoing root is %s with preserved-memory-map %#x, want kho-v2 and 0 (no tree yet)", k2.Format(), m)
	}
	if st := mf2.Stats(); st.AllocatedPages != 2 {
		t.Errorf("after Ingest %d pages are allocated, want 2 (the adopted root and folio)", st.AllocatedPages)
	}
	mf2.ResumeReleases()
	g, err := k2.RestoreFolio(f.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if err := k2.PreserveFolio(g); err != nil {
		t.Fatal(err)
	}
	root := memMapAddr(t, k2)
	want := []pgalloc.Folio{{PFN: k2.RootAddr() >> abikho.PageShift}, g}
	sortFolios(want)
	if got := walkTree(t, mf2, root); root == 0 || !slices.Equal(got, want) {
		t.Errorf("after the first preserve the tree at %#x holds %v, want %v", root, got, want)
	}
}

// TestIngestCarriesAKhoV2Handover checks that Ingest of a kho-v2 handover
// takes it over as the outgoing state without writing a byte: the same
// root page, the same tree, every incoming block still preserved, so that
// a crash right after the ingest loses nothing. A restored block stays
// preserved until its owner frees it; a released one, until it is
// released; and the tree goes on being the outgoing one for new preserves.
func TestIngestCarriesAKhoV2Handover(t *testing.T) {
	k1, mf1 := newKHO(t, 64<<20)
	a, err := k1.AllocPreserve(1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := k1.AllocPreserve(3 * abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	fill(mf1.Bytes(a), 1)
	if err := k1.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	root := k1.RootAddr()
	rootPage := append([]byte(nil), page(t, mf1, root)...)
	tree := walkTree(t, mf1, memMapAddr(t, k1))

	mf2 := reopen(t, mf1)
	k2, err := Ingest(mf2, root)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Carried() || k2.RootAddr() != root {
		t.Fatalf("Carried %v, root %#x, want a carried handover at the incoming root %#x", k2.Carried(), k2.RootAddr(), root)
	}
	if !bytes.Equal(page(t, mf2, root), rootPage) {
		t.Error("Ingest rewrote the root page")
	}
	if got := walkTree(t, mf2, memMapAddr(t, k2)); !slices.Equal(got, tree) {
		t.Errorf("after Ingest the outgoing tree holds %v, want the incoming %v", got, tree)
	}
	// The tree's pages are allocated: the root FDT, a, b and the nodes.
	if st := mf2.Stats(); st.AllocatedPages != 1+1+b.Pages()+treeNodes(k2) {
		t.Errorf("after Ingest %d pages are allocated, want the root FDT, the two blocks and %d tree nodes", st.AllocatedPages, treeNodes(k2))
	}
	mf2.ResumeReleases()

	// Restored, a is still preserved; freed by its owner, it is not.
	ra, err := k2.RestoreFolio(a.Addr())
	if err != nil || ra != a {
		t.Fatalf("RestoreFolio = %v, %v", ra, err)
	}
	if got := walkTree(t, mf2, memMapAddr(t, k2)); !slices.Equal(got, tree) {
		t.Errorf("after a restore the tree holds %v, want %v", got, tree)
	}
	k2.ReleaseRestored(ra)
	if got := walkTree(t, mf2, memMapAddr(t, k2)); slices.Contains(got, a) || !slices.Contains(got, b) {
		t.Errorf("after a is released the tree holds %v, want b and not a", got)
	}
	// A new preserve lands in the same tree.
	c, err := k2.AllocPreserve(1)
	if err != nil {
		t.Fatal(err)
	}
	if got := walkTree(t, mf2, memMapAddr(t, k2)); !slices.Contains(got, c) || !slices.Contains(got, b) {
		t.Errorf("after a new preserve the tree holds %v, want b and c", got)
	}
	// Releasing what nobody restored unpreserves it.
	if n := k2.ReleaseUnrestored(); n != b.Pages() {
		t.Errorf("ReleaseUnrestored = %d pages, want %d", n, b.Pages())
	}
	want := []pgalloc.Folio{{PFN: root >> abikho.PageShift}, c}
	sortFolios(want)
	if got := walkTree(t, mf2, memMapAddr(t, k2)); !slices.Equal(got, want) {
		t.Errorf("at the end the tree holds %v, want %v", got, want)
	}
	// And the next sentry reads exactly that.
	if err := k2.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	mf3 := reopen(t, mf2)
	k3, err := Ingest(mf3, k2.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k3.RestoreFolio(c.Addr()); err != nil {
		t.Errorf("the next sentry cannot restore the new block: %v", err)
	}
	if _, err := k3.RestoreFolio(b.Addr()); err == nil {
		t.Error("the next sentry restored a released block")
	}
}

// TestIngestCarriesOnlyWhatItWouldWrite checks that a kho-v2 root naming a
// subtree other than LUO's is not carried: its owner would free the blob a
// carried root still named.
func TestIngestCarriesOnlyWhatItWouldWrite(t *testing.T) {
	k1, mf1 := newKHO(t, 64<<20)
	blob, err := k1.AllocPreserve(1)
	if err != nil {
		t.Fatal(err)
	}
	if err := k1.AddSubtree("other", blob.Addr()); err != nil {
		t.Fatal(err)
	}
	if err := k1.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	k2, err := Ingest(reopen(t, mf1), k1.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	if k2.Carried() {
		t.Error("a root with a subtree other than LUO's was carried")
	}
}

// TestRestartsAcrossFormats hands one folio through kho-v1, kho-v2 and
// kho-v1 again, as an upgrade and a downgrade would.
func TestRestartsAcrossFormats(t *testing.T) {
	mf := newFile(t, 64<<20)
	k, err := New(mf)
	if err != nil {
		t.Fatal(err)
	}
	f, err := k.AllocPreserve(2 * abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	fill(mf.Bytes(f), 5)
	for i, format := range []string{abikho.CompatibleV1, abikho.CompatibleV2, abikho.CompatibleV1, abikho.CompatibleV2} {
		if err := k.AddSubtree("data", f.Addr()); err != nil {
			t.Fatal(err)
		}
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatalf("restart %d: FinalizeFormat(%s): %v", i, format, err)
		}
		next := reopen(t, mf)
		k2, err := Ingest(next, k.RootAddr())
		if err != nil {
			t.Fatalf("restart %d: Ingest of %s: %v", i, format, err)
		}
		next.ResumeReleases()
		if a, err := k2.RetrieveSubtree("data"); err != nil || a != f.Addr() {
			t.Fatalf("restart %d (%s): RetrieveSubtree = %#x, %v", i, format, a, err)
		}
		g, err := k2.RestoreFolio(f.Addr())
		if err != nil || g != f || !filled(next.Bytes(g), 5) {
			t.Fatalf("restart %d (%s): RestoreFolio = %v, %v", i, format, g, err)
		}
		if err := k2.PreserveFolio(g); err != nil {
			t.Fatal(err)
		}
		k, mf = k2, next
	}
}

// TestIngestValidationV2 corrupts a kho-v2 handover field by field: every
// corruption is refused with an error that names the field, and nothing is
// adopted.
func TestIngestValidationV2(t *testing.T) {
	const L5, L4, L3, L2, L1, leaf = 0, 1, 2, 3, 4, 5 // indexes into a path
	setEntry := func(t *testing.T, h *handover, node uint64, i int, v uint64) {
		abikho.SetRadixNodeEntry(page(t, h.mf, node), i, v)
	}
	// entryOf returns the index in path[lv] that leads to path[lv+1].
	entryOf := func(t *testing.T, h *handover, path []uint64, lv int) int {
		for i := 0; i < abikho.RadixTableEntries; i++ {
			if abikho.RadixNodeEntry(page(t, h.mf, path[lv]), i) == path[lv+1] {
				return i
			}
		}
		t.Fatalf("no entry of %#x leads to %#x", path[lv], path[lv+1])
		return 0
	}
	for _, tc := range []struct {
		name    string
		corrupt func(t *testing.T, h *handover) (root uint64)
		errno   error
		msg     []string
	}{
		{
			name:    "a valid handover is accepted",
			corrupt: func(t *testing.T, h *handover) uint64 { return h.root },
		},
		{
			name: "a zero preserved-memory-map is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU64("preserved-memory-map", 0) })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"preserved-memory-map is 0", "no radix tree"},
		},
		{
			name: "a preserved-memory-map that is not 8 bytes is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU32("preserved-memory-map", uint32(h.treeRoot)) })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"preserved-memory-map", "4 bytes"},
		},
		{
			name: "a misaligned tree root is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU64("preserved-memory-map", h.treeRoot+8) })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"level-5 node", "page-aligned"},
		},
		{
			name: "a tree root outside the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU64("preserved-memory-map", h.fileSize) })
				return h.root
			},
			errno: unix.ERANGE, msg: []string{"level-5 node", "0x4000000"},
		},
		{
			name: "a node outside the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setEntry(t, h, h.smallPath[L3], entryOf(t, h, h.smallPath, L3), 1<<40)
				return h.root
			},
			errno: unix.ERANGE, msg: []string{"level-2 node", "0x10000000000"},
		},
		{
			name: "a misaligned node is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setEntry(t, h, h.smallPath[L1], entryOf(t, h, h.smallPath, L1), h.smallPath[leaf]+1)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"level-0 node", "page-aligned"},
		},
		{
			name: "a node that points back at the root is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setEntry(t, h, h.smallPath[L2], entryOf(t, h, h.smallPath, L2), h.treeRoot)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"already in the tree"},
		},
		{
			name: "a node shared by two parents is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				// The order-0 leaf is also the order-3 path's leaf.
				setEntry(t, h, h.bigPath[L1], entryOf(t, h, h.bigPath, L1), h.smallPath[leaf])
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"already in the tree"},
		},
		{
			name: "a table entry for orders above the maximum is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				// Level-4 entry 0 under level-5 entry 0 holds keys below
				// 1<<42, the keys of orders above 10.
				setEntry(t, h, h.bigPath[L4], 0, h.smallPath[leaf])
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"level-4 node", "entry 0", "no block of order 0 to 10"},
		},
		{
			name: "a table entry for blocks beyond the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				// Level-1 entry 1 on the order-0 path holds pfns from 32768,
				// past the 16384-page file.
				setEntry(t, h, h.smallPath[L1], 1, h.bigPath[leaf])
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"level-1 node", "entry 1", "inside the 16384-page memory file"},
		},
		{
			name: "a level-5 entry with no order bit is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setEntry(t, h, h.treeRoot, 7, h.smallPath[leaf])
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"level-5 node", "entry 7"},
		},
		{
			name: "a preserved block beyond the end of the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				abikho.LeafSet(page(t, h.mf, h.smallPath[leaf]), int(h.fileSize/abikho.PageSize+3))
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"bit 16387", "beyond"},
		},
		{
			name: "a preserved pfn 0 is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				abikho.LeafSet(page(t, h.mf, h.smallPath[leaf]), 0)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"pfn 0"},
		},
		{
			name: "overlapping preserved blocks are rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				abikho.LeafSet(page(t, h.mf, h.smallPath[leaf]), int(h.big.PFN+1))
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"overlaps"},
		},
		{
			name: "a tree node inside a preserved block is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				copy(page(t, h.mf, h.big.Addr()+abikho.PageSize), page(t, h.mf, h.smallPath[leaf]))
				setEntry(t, h, h.smallPath[L1], entryOf(t, h, h.smallPath, L1), h.big.Addr()+abikho.PageSize)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"lies inside the preserved order-3 block"},
		},
		{
			name: "a root page that is not preserved is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				abikho.LeafClear(page(t, h.mf, h.smallPath[leaf]), int(h.root/abikho.PageSize))
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"root page is not preserved"},
		},
		{
			name: "a subtree with fdt instead of preserved-data is not retrievable",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.AddChild("old").SetU64("fdt", h.small.Addr()) })
				return h.root
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHandover(t, abikho.CompatibleV2)
			root := tc.corrupt(t, h)
			mf2 := reopen(t, h.mf)
			k2, err := Ingest(mf2, root)
			if tc.errno == nil {
				if err != nil {
					t.Fatalf("Ingest: %v", err)
				}
				if _, err := k2.RetrieveSubtree("old"); err == nil {
					t.Errorf("RetrieveSubtree found a kho-v1 fdt property in a kho-v2 root")
				}
				for _, f := range []pgalloc.Folio{h.small, h.big} {
					if g, err := k2.RestoreFolio(f.Addr()); err != nil || g != f {
						t.Errorf("RestoreFolio(%v) = %v, %v", f, g, err)
					}
				}
				return
			}
			if !errors.Is(err, tc.errno) {
				t.Fatalf("Ingest = %v, want %v", err, tc.errno)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			if _, err := mf2.Allocate(0); !errors.Is(err, unix.EINVAL) {
				t.Errorf("Allocate after a failed Ingest = %v, want EINVAL (not adopted)", err)
			}
		})
	}
}

// TestTreeBytesFollowTheHeaderDiagram checks the bytes the tree writes
// against numbers worked out by hand from the key diagram of
// include/linux/kho/abi/kexec_handover.h (torvalds/linux 3f2ad900), not
// from this package's helpers: key bits 59:51 index level 5, 50:42 level 4,
// 41:33 level 3, 32:24 level 2, 23:15 level 1, 14:0 the leaf bit; table
// entries are little-endian u64 addresses at 8*index; leaf bit i is bit
// i%8 of byte i/8.
func TestTreeBytesFollowTheHeaderDiagram(t *testing.T) {
	k, mf := newKHO(t, 512<<20)
	for _, tc := range []struct {
		name    string
		f       pgalloc.Folio
		entries [5]int // levels 5 to 1
		byteOff int
		bit     byte
	}{
		// key = 1<<52 | 0x12345: level 5 gets bits 59:51 = 0b10, level
		// 1 gets bits 23:15 = 0x12345>>15 = 2, the leaf bit is 0x2345.
		{"order 0 at pfn 0x12345", pgalloc.Folio{PFN: 0x12345}, [5]int{2, 0, 0, 0, 2}, 0x2345 / 8, 1 << (0x2345 % 8)},
		// key = 1<<43 | 3: level 4 gets bits 50:42 = 0b10, the leaf bit 3.
		{"order 9 at pfn 0x600", pgalloc.Folio{PFN: 0x600, Order: 9}, [5]int{0, 2, 0, 0, 0}, 0, 1 << 3},
		// key = 1<<42 | 0x5000>>10 = 1<<42 | 0x14: level 4 entry 1.
		{"order 10 at pfn 0x5000", pgalloc.Folio{PFN: 0x5000, Order: 10}, [5]int{0, 1, 0, 0, 0}, 0x14 / 8, 1 << (0x14 % 8)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := k.PreserveFolio(tc.f); err != nil {
				t.Fatal(err)
			}
			addr := memMapAddr(t, k)
			for i, e := range tc.entries {
				next := binary.LittleEndian.Uint64(page(t, mf, addr)[8*e:])
				if next == 0 || next%abikho.PageSize != 0 {
					t.Fatalf("level-%d node at %#x: entry %d = %#x, want a page address", 5-i, addr, e, next)
				}
				addr = next
			}
			leaf := page(t, mf, addr)
			if leaf[tc.byteOff]&tc.bit == 0 {
				t.Errorf("leaf at %#x: byte %#x = %#02x, want bit %#02x set", addr, tc.byteOff, leaf[tc.byteOff], tc.bit)
			}
			if err := k.UnpreserveFolio(tc.f); err != nil {
				t.Fatal(err)
			}
			if leaf[tc.byteOff]&tc.bit != 0 {
				t.Errorf("leaf at %#x: bit still set after UnpreserveFolio", addr)
			}
		})
	}
}

// reserveLen returns the number of pages in k's kho-v1 reserve.
func reserveLen(k *KHO) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.out.tree.reserve)
}
