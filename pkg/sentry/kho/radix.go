package kho

import (
	"fmt"
	"math/bits"
	"sync/atomic"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
)

// radixTree is the outgoing tracker of preserved memory: the kho-v2 radix
// tree (struct kho_radix_tree, kho_radix_add_page/del_page in
// kernel/liveupdate/kexec_handover.c at torvalds/linux 3f2ad900), kept in
// ordinary, allocated, unpreserved pages of the memory file and current at
// every preserve and unpreserve, so that a kho-v2 handover has nothing to
// write: the next sentry reads the tree in place from its root. Like
// Linux, the node pages are not in the preserved set themselves: the next
// sentry reads them before it adopts, and then they are stale.
//
// Besides the pages, the tree keeps in the heap a view of every leaf
// indexed by (order, bitmap index), the same index as a kho-v1 bitmap
// (a leaf covers exactly the blocks of one kho-v1 bitmap page). Set, clear
// and test go straight to the leaf; only a block whose leaf does not exist
// yet walks the tables from the root, allocating the missing nodes. Like
// Linux, nodes are never freed while the tree lives, even when empty.
//
// A radixTree is not safe for concurrent use (KHO.mu guards it).
type radixTree struct {
	mf *pgalloc.MemoryFile
	// root is the level-5 kho_radix_node; the zero Folio until the tree
	// is first needed.
	root pgalloc.Folio
	// nodes is every page of the tree, root first.
	nodes []pgalloc.Folio
	// leaves[o][idx] is the leaf of the order-o blocks whose pfn>>o lies in
	// [idx*RadixLeafBits, (idx+1)*RadixLeafBits): a view of its page in the
	// memory file, nil if the leaf does not exist.
	leaves [pgalloc.MaxOrder + 1][][]byte
	// nleaves[o] counts the leaves of order o.
	nleaves [pgalloc.MaxOrder + 1]int
	// reserve are allocated, unpreserved pages kept for a kho-v1
	// Finalize, so that a memory file with no free page can still be
	// handed over in kho-v1: one page per leaf (its bitmap) and one per
	// MemChunkCapacity leaves of an order (a khoser_mem_chunk), exactly
	// what the first kho-v1 Finalize writes at most (v1ReserveNeed). The
	// pages are taken when a leaf is made, before it is linked, so a
	// preserve that cannot take them fails with ENOMEM and changes
	// nothing. That is one page for 128 MiB of order-0 blocks (a leaf
	// covers 32768 blocks): 0.003% of the preserved memory at most.
	reserve []pgalloc.Folio
	// spare are allocated, zeroed pages, adjacent and in ascending order,
	// that allocNode hands out before it allocates again.
	spare []pgalloc.Folio
}

// treeWrites counts the changes to radix trees in this process: a leaf
// bit set or cleared, a node made or unmade, a tree freed (each counted
// before the change). It never goes back, so equal counts read under
// KHO.mu at two times mean that no tree changed in between
// (KHO.TreeGeneration).
var treeWrites atomic.Uint64

// nodeRunOrder is the order of the runs of pages allocNode allocates: 16
// pages, so that leaves made one after another lie in adjacent pages,
// which the next sentry reads with one pread per run (radixReader.readLeaves).
const nodeRunOrder = 4

// v1ReserveNeed returns how many pages a kho-v1 map of the tree's leaves
// needs at most: a bitmap per leaf and a chunk per MemChunkCapacity leaves
// of each order.
func (t *radixTree) v1ReserveNeed() int {
	n := 0
	for _, l := range t.nleaves {
		n += l + (l+abikho.MemChunkCapacity-1)/abikho.MemChunkCapacity
	}
	return n
}

// takeReserve returns a zeroed page of the reserve, or ok false if it is
// empty.
func (t *radixTree) takeReserve() (pgalloc.Folio, bool) {
	if len(t.reserve) == 0 {
		return pgalloc.Folio{}, false
	}
	f := t.reserve[len(t.reserve)-1]
	t.reserve = t.reserve[:len(t.reserve)-1]
	clear(t.mf.Bytes(f))
	return f, true
}

func newRadixTree(mf *pgalloc.MemoryFile) radixTree {
	t := radixTree{mf: mf}
	for o := range t.leaves {
		t.leaves[o] = make([][]byte, (mf.Pages()>>o)/abikho.RadixLeafBits+1)
	}
	return t
}

// locateLeaf returns the leaf index and bit of the block (pfn, order): the
// low RadixBitmapSizeLog2 bits of its key and the rest of pfn>>order.
func locateLeaf(pfn uint64, order int) (idx uint64, bit int) {
	hi := pfn >> order
	return hi / abikho.RadixLeafBits, int(hi % abikho.RadixLeafBits)
}

// allocNode returns a new zeroed page for a node of the tree: the next
// page of a run of 2^nodeRunOrder adjacent pages, split into order-0 folios
// when it is allocated, or, if no such run is free, a page of its own.
func (t *radixTree) allocNode() (pgalloc.Folio, error) {
	if len(t.spare) == 0 {
		if run, err := t.mf.Allocate(nodeRunOrder); err == nil {
			if err := t.mf.Split(run); err != nil {
				t.mf.DecRef(run)
			} else {
				t.spare = make([]pgalloc.Folio, run.Pages())
				for i := range t.spare {
					t.spare[i] = pgalloc.Folio{PFN: run.PFN + uint64(i)}
				}
			}
		}
	}
	if len(t.spare) > 0 {
		f := t.spare[0]
		t.spare = t.spare[1:]
		return f, nil
	}
	return t.allocPage()
}

// allocPage returns a new zeroed page of its own, for a node or the
// reserve.
func (t *radixTree) allocPage() (pgalloc.Folio, error) {
	f, err := t.mf.Allocate(0)
	if err != nil {
		return pgalloc.Folio{}, fmt.Errorf("kho: allocating a page of the kho-v2 radix tree: %w", err)
	}
	return f, nil
}

// unmakeNodes gives back the pages of the nodes made, in order, by a walk
// that failed, which began with t.spare equal to spare: those it took from
// spare are zeroed and spare again, exactly as before the walk; any other
// is freed, with what is left of a run allocated during the walk. The
// allocator and the spare run end as they were before the walk.
func (t *radixTree) unmakeNodes(made, spare []pgalloc.Folio) {
	n := min(len(made), len(spare))
	for _, m := range made[:n] {
		clear(t.mf.Bytes(m))
	}
	for _, m := range made[n:] {
		t.mf.DecRef(m)
	}
	if len(made) > len(spare) {
		for _, f := range t.spare {
			t.mf.DecRef(f)
		}
	}
	t.spare = spare
}

// init allocates the root node if the tree has none.
func (t *radixTree) init() error {
	if t.root != (pgalloc.Folio{}) {
		return nil
	}
	f, err := t.allocNode()
	if err != nil {
		return err
	}
	t.root = f
	t.nodes = append(t.nodes, f)
	return nil
}

// leafFor returns the leaf of (pfn, order), creating it and the nodes above
// it if create is set (the first half of kho_radix_add_page). On an
// allocation failure it frees the nodes it made and unlinks them, like
// Linux's err_free_nodes.
//
// Preconditions:
//   - (pfn, order) lies inside the file; the root exists if create is set.
func (t *radixTree) leafFor(pfn uint64, order int, create bool) ([]byte, int, error) {
	idx, bit := locateLeaf(pfn, order)
	if l := t.leaves[order][idx]; l != nil || !create {
		return l, bit, nil
	}
	// The kho-v1 reserve grows first: a bitmap page, and a chunk page
	// when the order's leaves fill a new chunk.
	reserved := len(t.reserve)
	t.nleaves[order]++
	for len(t.reserve) < t.v1ReserveNeed() {
		f, err := t.allocPage()
		if err != nil {
			t.nleaves[order]--
			t.dropReserve(reserved)
			return nil, 0, fmt.Errorf("kho: reserving pages for a kho-v1 map: %w", err)
		}
		t.reserve = append(t.reserve, f)
	}
	key := abikho.RadixEncodeKey(pfn<<abikho.PageShift, order)
	node := t.mf.Bytes(t.root)
	spare := t.spare
	var made []pgalloc.Folio
	var anchor []byte
	anchorIdx := 0
	for level := abikho.RadixTreeMaxDepth - 1; level > 0; level-- {
		i := abikho.RadixTableIndex(key, level)
		if e := abikho.RadixNodeEntry(node, i); e != 0 {
			node = t.mf.Bytes(pgalloc.Folio{PFN: e >> abikho.PageShift})
			continue
		}
		f, err := t.allocNode()
		if err != nil {
			if anchor != nil {
				abikho.SetRadixNodeEntry(anchor, anchorIdx, 0)
			}
			t.unmakeNodes(made, spare)
			t.nleaves[order]--
			t.dropReserve(reserved)
			return nil, 0, err
		}
		abikho.SetRadixNodeEntry(node, i, f.Addr())
		if anchor == nil {
			anchor, anchorIdx = node, i
		}
		made = append(made, f)
		node = t.mf.Bytes(f)
	}
	t.nodes = append(t.nodes, made...)
	t.leaves[order][idx] = node
	return node, bit, nil
}

// set marks (pfn, order) preserved (kho_radix_add_page). It fails only
// when a node page cannot be allocated, and then changes nothing.
//
// Preconditions:
//   - (pfn, order) lies inside the file.
func (t *radixTree) set(pfn uint64, order int) error {
	treeWrites.Add(1)
	if err := t.init(); err != nil {
		return err
	}
	l, bit, err := t.leafFor(pfn, order, true)
	if err != nil {
		return err
	}
	abikho.LeafSet(l, bit)
	return nil
}

// clear unmarks (pfn, order) (kho_radix_del_page) and reports whether it was
// marked.
func (t *radixTree) clear(pfn uint64, order int) bool {
	l, bit := t.leaf(pfn, order)
	if l == nil || !abikho.LeafTest(l, bit) {
		return false
	}
	treeWrites.Add(1)
	abikho.LeafClear(l, bit)
	return true
}

// test reports whether (pfn, order) is marked.
func (t *radixTree) test(pfn uint64, order int) bool {
	l, bit := t.leaf(pfn, order)
	return l != nil && abikho.LeafTest(l, bit)
}

// leaf returns the existing leaf of (pfn, order) and the block's bit, or a
// nil leaf.
func (t *radixTree) leaf(pfn uint64, order int) ([]byte, int) {
	idx, bit := locateLeaf(pfn, order)
	if order < 0 || order >= len(t.leaves) || idx >= uint64(len(t.leaves[order])) {
		return nil, 0
	}
	return t.leaves[order][idx], bit
}

// forEach calls fn for every marked block, order by order and in address
// order within an order (kho_radix_walk_tree visits the same set).
func (t *radixTree) forEach(fn func(pfn uint64, order int)) {
	for o, ls := range t.leaves {
		for idx, l := range ls {
			if l == nil {
				continue
			}
			base := uint64(idx) * abikho.RadixLeafBits
			for i, c := range l {
				for c != 0 {
					b := uint64(bits.TrailingZeros8(c))
					c &= c - 1
					fn((base+uint64(i)*8+b)<<o, o)
				}
			}
		}
	}
}

// dropReserve frees the reserve pages beyond the first n.
func (t *radixTree) dropReserve(n int) {
	for _, f := range t.reserve[n:] {
		t.mf.DecRef(f)
	}
	t.reserve = t.reserve[:n]
}

// free drops every node page and the reserve. The tree must not be used
// afterwards.
func (t *radixTree) free() {
	treeWrites.Add(1)
	for _, f := range t.nodes {
		t.mf.DecRef(f)
	}
	for _, f := range t.spare {
		t.mf.DecRef(f)
	}
	t.dropReserve(0)
	*t = radixTree{}
}

// TreePages returns how many pages of the memory file the outgoing kho-v2
// radix tree holds: its nodes, the kho-v1 reserve and the rest of its
// current run of node pages. Like Linux's, the tree never gives back a
// node while it lives, so a preserve that made a leaf and then failed
// further on leaves these pages allocated; nothing else.
func (k *KHO) TreePages() uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	t := &k.out.tree
	return uint64(len(t.nodes) + len(t.reserve) + len(t.spare))
}

// zeroPage is a page of zeros, to compare with.
var zeroPage [abikho.PageSize]byte

// Settle gives a carried outgoing tree (see Ingest) the kho-v1 reserve a
// tree made in this sentry takes as it grows (radixTree.reserve), so that
// a restart to a kho-v1 sentry still needs no free page. Ingest cannot
// allocate; a new sentry calls Settle once it has committed. It is best
// effort: without the reserve, a kho-v1 Finalize allocates its pages.
func (k *KHO) Settle() {
	k.mu.Lock()
	defer k.mu.Unlock()
	t := &k.out.tree
	if !k.carried || t.root == (pgalloc.Folio{}) {
		return
	}
	for len(t.reserve) < t.v1ReserveNeed() {
		f, err := t.allocPage()
		if err != nil {
			return
		}
		t.reserve = append(t.reserve, f)
	}
}
