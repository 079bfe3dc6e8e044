package kho

import (
	"errors"
	"slices"
	"strings"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// adjacentLeaves preserves one order-0 page, at a different bit each, in
// each of the first `leaves` bitmap indexes of a 1 GiB file, in key order
// or in reverse, finalizes in kho-v2 and returns the handover's KHO, the
// preserved pages and the level-1 node and leaves of the tree, the leaves
// in key order.
func adjacentLeaves(t *testing.T, leaves int, reverse bool) (k *KHO, mf *pgalloc.MemoryFile, pfns []uint64, l1 uint64, leafAddrs []uint64) {
	t.Helper()
	k, mf = newKHO(t, 1<<30)
	for i := range leaves {
		pfns = append(pfns, uint64(i)*abikho.RadixLeafBits+100+uint64(i))
	}
	order := slices.Clone(pfns)
	if reverse {
		slices.Reverse(order)
	}
	for _, pfn := range order {
		if err := k.PreserveFolio(pgalloc.Folio{PFN: pfn}); err != nil {
			t.Fatalf("PreserveFolio(%#x): %v", pfn, err)
		}
	}
	if err := k.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	for _, pfn := range pfns {
		path := treePath(t, mf, treeRoot(k), pfn, 0)
		l1 = path[len(path)-2]
		leafAddrs = append(leafAddrs, path[len(path)-1])
	}
	return k, mf, pfns, l1, leafAddrs
}

// TestIngestReadsAdjacentLeavesTogether checks that leaves made one after
// another lie in adjacent pages (radixTree.allocNode), and that Ingest
// reads them with one pread, not one each, and finds in them every
// preserved block, whether the leaves' pages are in the order of their
// keys or not.
func TestIngestReadsAdjacentLeavesTogether(t *testing.T) {
	const leaves = 8
	for _, reverse := range []bool{false, true} {
		name := "made in key order"
		if reverse {
			name = "made in reverse key order"
		}
		t.Run(name, func(t *testing.T) {
			k1, mf1, pfns, _, addrs := adjacentLeaves(t, leaves, reverse)
			// Leaf 0 was made with the tree, for the root FDT page.
			sorted := slices.Sorted(slices.Values(addrs))
			for i := 1; i < len(sorted); i++ {
				if sorted[i] != sorted[i-1]+abikho.PageSize {
					t.Fatalf("the %d leaves lie at %#x, want adjacent pages", leaves, addrs)
				}
			}
			if reverse == slices.IsSorted(addrs) {
				t.Fatalf("the %d leaves lie at %#x: in the order of their keys is %v, want %v", leaves, addrs, !reverse, reverse)
			}
			pages, err := k1.ReadAhead() // the root FDT page and every tree page
			if err != nil {
				t.Fatal(err)
			}
			mf2 := reopen(t, mf1)
			calls := readCalls(t)
			k2, err := Ingest(mf2, k1.RootAddr())
			if err != nil {
				t.Fatal(err)
			}
			if got, want := calls(), pages-leaves+1; got != want {
				t.Errorf("Ingest made %d reads for %d pages, %d of them adjacent leaves; want %d", got, pages, leaves, want)
			}
			for _, pfn := range pfns {
				if f, err := k2.RestoreFolio(pfn << abikho.PageShift); err != nil || f != (pgalloc.Folio{PFN: pfn}) {
					t.Errorf("RestoreFolio(pfn %#x) = %v, %v; want the preserved order-0 folio", pfn, f, err)
				}
				if _, err := k2.RestoreFolio((pfn + 1) << abikho.PageShift); !errors.Is(err, unix.EINVAL) {
					t.Errorf("RestoreFolio(pfn %#x), never preserved: %v, want EINVAL", pfn+1, err)
				}
			}
		})
	}
}

// TestIngestRefusesBadLeavesReadTogether corrupts the level-1 table of a
// tree with adjacent leaves: a leaf read ahead with others is refused
// exactly as one read alone.
func TestIngestRefusesBadLeavesReadTogether(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(t *testing.T, mf *pgalloc.MemoryFile, l1 uint64, leaves []uint64)
		errno   error
		msg     []string
	}{
		{"two entries naming the same leaf", func(t *testing.T, mf *pgalloc.MemoryFile, l1 uint64, leaves []uint64) {
			abikho.SetRadixNodeEntry(page(t, mf, l1), 5, leaves[2])
		}, unix.EINVAL, []string{"level-0 node at", "entry 5 of level-1 node", "already in the tree"}},
		{"an entry naming its own table", func(t *testing.T, mf *pgalloc.MemoryFile, l1 uint64, leaves []uint64) {
			abikho.SetRadixNodeEntry(page(t, mf, l1), 3, l1)
		}, unix.EINVAL, []string{"entry 3 of level-1 node", "already in the tree"}},
		{"an entry beyond the file between adjacent leaves", func(t *testing.T, mf *pgalloc.MemoryFile, l1 uint64, leaves []uint64) {
			abikho.SetRadixNodeEntry(page(t, mf, l1), 4, 1<<40)
		}, unix.ERANGE, []string{"level-0 node (entry 4 of level-1 node", "0x10000000000"}},
		{"a misaligned entry between adjacent leaves", func(t *testing.T, mf *pgalloc.MemoryFile, l1 uint64, leaves []uint64) {
			abikho.SetRadixNodeEntry(page(t, mf, l1), 4, leaves[4]+8)
		}, unix.EINVAL, []string{"level-0 node (entry 4 of level-1 node", "page-aligned"}},
		{"a leaf read with others preserving pfn 0", func(t *testing.T, mf *pgalloc.MemoryFile, l1 uint64, leaves []uint64) {
			page(t, mf, leaves[0])[0] |= 1
		}, unix.EINVAL, []string{"radix tree leaf at", "entry 0 of level-1 node", "bit 0 preserves pfn 0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k1, mf1, _, l1, leaves := adjacentLeaves(t, 8, false)
			tc.corrupt(t, mf1, l1, leaves)
			_, err := Ingest(reopen(t, mf1), k1.RootAddr())
			if !errors.Is(err, tc.errno) {
				t.Fatalf("Ingest = %v, want %v", err, tc.errno)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("Ingest = %q, want it to name %q", err, m)
				}
			}
		})
	}
}
