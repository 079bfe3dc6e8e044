package kho

import (
	"slices"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
)

// leavesFilePages is the size of the memory file FuzzIngestLeavesReadTogether
// builds: four order-0 leaves' worth of pages and a few more, so that one
// level-1 table can name several valid leaves.
const leavesFilePages = 4*abikho.RadixLeafBits + 64

// leavesSeed returns a valid kho-v2 handover whose level-1 table names four
// order-0 leaves in adjacent pages: the root FDT for page 1 and the tree's
// pages, placed from fuzzTreePFN on (the root node, levels 4 to 1, then
// the leaves, the last two in reverse key order).
func leavesSeed() (root, tree []byte) {
	n := &fdt.Node{}
	n.SetString(abikho.PropCompatible, abikho.CompatibleV2)
	n.SetU64(abikho.PropPreservedMemoryMap, fuzzTreePFN*abikho.PageSize)
	root, _ = fdt.Build(n)
	tree = make([]byte, 9*abikho.PageSize)
	pg := func(i int) []byte { return tree[i*abikho.PageSize : (i+1)*abikho.PageSize] }
	key := abikho.RadixEncodeKey(0, 0)
	node := pg(0)
	for level, i := abikho.RadixTreeMaxDepth-1, 1; level > 1; level, i = level-1, i+1 {
		abikho.SetRadixNodeEntry(node, abikho.RadixTableIndex(key, level), uint64(fuzzTreePFN+i)*abikho.PageSize)
		node = pg(i)
	}
	for idx, page := range []int{5, 6, 8, 7} {
		abikho.SetRadixNodeEntry(node, idx, uint64(fuzzTreePFN+page)*abikho.PageSize)
		abikho.LeafSet(pg(page), 100+idx)
	}
	abikho.LeafSet(pg(5), 1) // the root FDT page
	return root, tree
}

// ingestLeaves builds the memory file of FuzzIngestLeavesReadTogether and
// ingests it, with or without reading leaves ahead, returning the blocks
// adopted or the error.
func ingestLeaves(t *testing.T, root, tree []byte, ahead bool) ([]pgalloc.Folio, error) {
	t.Helper()
	mf := fuzzFile(t, leavesFilePages, tree, root)
	defer mf.Close()
	readLeavesAhead = ahead
	defer func() { readLeavesAhead = true }()
	k, err := Ingest(mf, abikho.PageSize)
	if err != nil {
		return nil, err
	}
	var blocks []pgalloc.Folio
	k.mu.Lock()
	k.in.mem.forEach(func(pfn uint64, order int) { blocks = append(blocks, pgalloc.Folio{PFN: pfn, Order: order}) })
	k.mu.Unlock()
	return blocks, nil
}

// FuzzIngestLeavesReadTogether ingests arbitrary kho-v2 trees in a file
// where one level-1 table can name several leaves, with the leaves read
// ahead a run of adjacent pages at a time and read one by one: both must
// accept the same blocks or refuse with the same error.
func FuzzIngestLeavesReadTogether(f *testing.F) {
	root, tree := leavesSeed()
	f.Add(root, tree)
	f.Fuzz(func(t *testing.T, root, tree []byte) {
		ahead, errAhead := ingestLeaves(t, root, tree, true)
		alone, errAlone := ingestLeaves(t, root, tree, false)
		if (errAhead == nil) != (errAlone == nil) || errAhead != nil && errAhead.Error() != errAlone.Error() {
			t.Fatalf("read ahead: %v; one by one: %v", errAhead, errAlone)
		}
		if !slices.Equal(ahead, alone) {
			t.Fatalf("read ahead, adopted %v; one by one, %v", ahead, alone)
		}
	})
}

// TestLeavesSeedReadsTogether checks that FuzzIngestLeavesReadTogether's
// seed is a valid handover whose leaves are read ahead, so that the fuzzer
// starts from that path.
func TestLeavesSeedReadsTogether(t *testing.T) {
	root, tree := leavesSeed()
	calls := readCalls(t)
	blocks, err := ingestLeaves(t, root, tree, true)
	if err != nil {
		t.Fatalf("Ingest of the seed: %v", err)
	}
	// The root page, levels 5 to 1, then the four leaves in one read (the
	// file is written with pwrite, which syscr does not count).
	if got := calls(); got != 1+5+1 {
		t.Errorf("Ingest of the seed made %d reads, want 7 (the four leaves in one)", got)
	}
	// The root page is preserved too, and taken back by Ingest.
	want := []pgalloc.Folio{{PFN: 100}, {PFN: abikho.RadixLeafBits + 101}, {PFN: 2*abikho.RadixLeafBits + 102}, {PFN: 3*abikho.RadixLeafBits + 103}}
	if !slices.Equal(blocks, want) {
		t.Errorf("the seed adopted %v, want %v", blocks, want)
	}
}
