package kho

import (
	"encoding/binary"
	"fmt"
	"slices"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// radixReader walks an incoming kho-v2 tree (kho_mem_retrieve and
// kho_radix_walk_tree) and checks every field as it goes: each node page
// non-zero, page-aligned, inside the file and seen once (no cycle, no node
// shared by two parents, no page both a table and a leaf); each table entry
// covering keys that some block of order 0 to pgalloc.MaxOrder inside the
// file encodes to; each leaf bit a block that ends inside the file and is
// not PFN 0. Pruning entries by key range bounds the walk by the number of
// leaves a file of this size can need, whatever the tree holds.
type radixReader struct {
	mf    *pgalloc.MemoryFile
	pages uint64
	t     *memTracker
	// out, if not nil, gets the tree as an outgoing radixTree over the
	// same pages: its root, every node page and a view of every leaf.
	out *radixTree
	// nodes is every node page visited, by address.
	nodes map[uint64]struct{}
	// pre[i] is the leaf that entry i of the level-1 table being walked
	// names, if readLeaves read it ahead, until node visits it; addrs and
	// read are readLeaves' scratch.
	pre   [abikho.RadixTableEntries]*bitmap
	addrs []uint64
	read  []*bitmap
	page  [abikho.PageSize]byte
	// tables holds each level's table while the levels below it are
	// read: on the heap, not in node's frame, whose 4 KiB a level would
	// grow (copy) the goroutine's stack several times inside the
	// blackout.
	tables [abikho.RadixTreeMaxDepth][abikho.RadixTableEntries]uint64
}

// readRadix loads every block of the tree rooted at the byte address root
// into t, and checks that no page of the tree lies inside a preserved
// block. If out is not nil it is made the same tree, in place (see
// KHO.carried).
func readRadix(mf *pgalloc.MemoryFile, root uint64, t *memTracker, out *radixTree) error {
	// Room for a tree of 4 KiB folios over 8 GiB without growing the map
	// inside the blackout.
	const nodesHint = 80
	r := &radixReader{mf: mf, pages: mf.Pages(), t: t, nodes: make(map[uint64]struct{}, nodesHint)}
	if out != nil {
		*out = newRadixTree(mf)
		out.nodes = make([]pgalloc.Folio, 0, nodesHint)
		out.root = pgalloc.Folio{PFN: root >> abikho.PageShift}
		r.out = out
	}
	if err := r.node(root, abikho.RadixTreeMaxDepth-1, 0, origin{}); err != nil {
		return err
	}
	for addr := range r.nodes {
		pfn := addr >> abikho.PageShift
		for o := 0; o <= pgalloc.MaxOrder; o++ {
			if head := pfn &^ (1<<o - 1); t.test(head, o) {
				return fmt.Errorf("radix tree node at %#x lies inside the preserved order-%d block at pfn %#x: %w", addr, o, head, unix.EINVAL)
			}
		}
	}
	return nil
}

// origin says where a node's address was read: an entry of a table, or
// the root FDT's preserved-memory-map for the zero origin. It is formatted
// only when an error names it.
type origin struct {
	entry, level int
	node         uint64
}

// String implements fmt.Stringer.
func (o origin) String() string {
	if o.node == 0 {
		return abikho.PropPreservedMemoryMap
	}
	return fmt.Sprintf("entry %d of level-%d node %#x", o.entry, o.level, o.node)
}

// keysValid reports whether some key in [lo, lo+n) is the key of a block of
// order 0 to pgalloc.MaxOrder that lies inside the file.
func (r *radixReader) keysValid(lo, n uint64) bool {
	for o := 0; o <= pgalloc.MaxOrder; o++ {
		base := uint64(1) << (abikho.RadixOrder0Log2 - o)
		blocks := r.pages >> o // blocks of order o that end inside the file
		if blocks > 0 && lo < base+blocks && base < lo+n {
			return true
		}
	}
	return false
}

// node reads the node at addr, at level (RadixTreeMaxDepth-1 for the root,
// 0 for a leaf), whose keys start at prefix; from says where addr came
// from, for errors.
func (r *radixReader) node(addr uint64, level int, prefix uint64, from origin) error {
	if _, ok := r.nodes[addr]; ok {
		return fmt.Errorf("radix tree level-%d node at %#x (%s): page already in the tree (a cycle or a shared node): %w", level, addr, from, unix.EINVAL)
	}
	// A leaf is read straight into the bitmap that keeps it, where the
	// machine's byte order allows: no copy and no decoding of its 512
	// words (a few microseconds a leaf, 32 leaves a GiB of 4 KiB folios).
	var b *bitmap
	dst, decode := r.page[:], false
	if level == 0 {
		if from.level == 1 && r.pre[from.entry] != nil {
			b, r.pre[from.entry] = r.pre[from.entry], nil
			dst = nil
		} else if b = newBitmap(); bitmapBytes(b) != nil {
			dst = bitmapBytes(b)
		} else {
			decode = true
		}
	}
	if dst != nil {
		if err := readPage(r.mf, addr, dst); err != nil {
			return fmt.Errorf("radix tree level-%d node (%s): %w", level, from, err)
		}
	}
	r.nodes[addr] = struct{}{}
	if r.out != nil {
		r.out.nodes = append(r.out.nodes, pgalloc.Folio{PFN: addr >> abikho.PageShift})
	}
	if level == 0 {
		if decode {
			for w := range b {
				b[w] = binary.LittleEndian.Uint64(r.page[8*w:])
			}
		}
		return r.leaf(addr, prefix, from, b)
	}
	// Copy the table: r.page is reused by the levels below.
	table := &r.tables[level]
	for i := range table {
		table[i] = abikho.RadixNodeEntry(r.page[:], i)
	}
	shift := abikho.RadixTableShift(level)
	if level == 1 && readLeavesAhead {
		r.readLeaves(table, prefix, shift)
	}
	for i, e := range table {
		if e == 0 {
			continue
		}
		key := prefix | uint64(i)<<shift
		if !r.keysValid(key, 1<<shift) {
			return fmt.Errorf("radix tree level-%d node at %#x, entry %d: keys [%#x, +%#x) hold no block of order 0 to %d inside the %d-page memory file: %w", level, addr, i, key, uint64(1)<<shift, pgalloc.MaxOrder, r.pages, unix.EINVAL)
		}
		if err := r.node(e, level-1, key, origin{entry: i, level: level, node: addr}); err != nil {
			return err
		}
	}
	return nil
}

// leaf loads the leaf b, read from addr, whose first key is key.
func (r *radixReader) leaf(addr, key uint64, from origin, b *bitmap) error {
	// node checked that the leaf's keys hold a valid block, so the order
	// bit is above the leaf's bits and decodes to an order in range.
	pa, order, ok := abikho.RadixDecodeKey(key)
	if !ok || order > pgalloc.MaxOrder {
		return fmt.Errorf("radix tree leaf at %#x (%s): key %#x has no valid order: %w", addr, from, key, unix.EINVAL)
	}
	start := pa >> abikho.PageShift // pfn of bit 0
	idx := (start >> order) / abikho.RadixLeafBits
	if valid := r.pages>>order - start>>order; valid < abikho.RadixLeafBits {
		if bit, ok := firstSetFrom(b, valid); ok {
			return fmt.Errorf("radix tree leaf at %#x (%s): bit %d preserves the order-%d block at pfn %#x, which ends beyond the %d-page memory file: %w", addr, from, bit, order, start+bit<<order, r.pages, unix.EINVAL)
		}
	}
	if start == 0 && b[0]&1 != 0 {
		return fmt.Errorf("radix tree leaf at %#x (%s): bit 0 preserves pfn 0, which is reserved: %w", addr, from, unix.EINVAL)
	}
	r.t.orders[order][idx] = b
	if r.out != nil {
		r.out.leaves[order][idx] = r.mf.Bytes(pgalloc.Folio{PFN: addr >> abikho.PageShift})
		r.out.nleaves[order]++
	}
	return nil
}

// readLeavesAhead is false only in tests that compare the walk with and
// without readLeaves.
var readLeavesAhead = true

// readLeaves reads ahead the leaves that the level-1 table names, one
// pread per run of adjacent pages into adjacent bitmaps, and keeps them in
// r.pre, by entry, for node, which checks each exactly as a leaf it reads
// itself. A 4 GiB map of 4 KiB folios has 33 leaves or more; the writer
// takes them from runs of adjacent pages (radixTree.allocNode), so that
// they cost a few reads inside the blackout instead of one each (1 to 2 µs
// a read here). An entry that node will refuse (no page, outside the file,
// a page already visited, keys of no valid block) and a page next to no
// other is left for node to read or refuse as before; so is every leaf on
// a machine whose byte order keeps a page from being read into a bitmap. A
// failed read reads nothing ahead: node then reads each leaf and reports
// the error.
func (r *radixReader) readLeaves(table *[abikho.RadixTableEntries]uint64, prefix uint64, shift int) {
	clear(r.pre[:])
	if !littleEndian {
		return
	}
	addrs := r.addrs[:0]
	for i, e := range table {
		if e == 0 || e%abikho.PageSize != 0 || e>>abikho.PageShift >= r.pages {
			continue
		}
		if _, ok := r.nodes[e]; ok || !r.keysValid(prefix|uint64(i)<<shift, 1<<shift) {
			continue
		}
		addrs = append(addrs, e)
	}
	slices.Sort(addrs)
	addrs = slices.Compact(addrs)
	r.addrs = addrs
	read := slices.Grow(r.read[:0], len(addrs))[:len(addrs)] // by index in addrs
	clear(read)
	r.read = read
	n := 0
	for i := 0; i < len(addrs); {
		j := i + 1
		for j < len(addrs) && addrs[j] == addrs[j-1]+abikho.PageSize {
			j++
		}
		if j-i > 1 {
			bs := newBitmaps(j - i)
			if err := r.mf.ReadPages(addrs[i]>>abikho.PageShift, bitmapsBytes(bs)); err == nil {
				for k := range bs {
					read[i+k] = &bs[k]
				}
				n += j - i
			}
		}
		i = j
	}
	if n == 0 {
		return
	}
	// Each page goes to the first entry that names it: node refuses any
	// later one as a page already in the tree before it reads.
	for i, e := range table {
		if e == 0 {
			continue
		}
		if k, ok := slices.BinarySearch(addrs, e); ok && read[k] != nil {
			r.pre[i], read[k] = read[k], nil
		}
	}
}
