package kho

import (
	"encoding/binary"
	"math/bits"
)

// The kho-v2 preserved-memory map (torvalds/linux 3f2ad900,
// include/linux/kho/abi/kexec_handover.h, "KHO persistent memory tracker"):
// one radix tree for every order, each node one page, linked by physical
// address. A preserved block (pa, order) is the key
//
//	key = 1<<(RadixOrder0Log2-order) | pa>>(PageShift+order)
//
// whose bits 59:15 select, 9 bits per level, a table entry in the five
// kho_radix_node levels 5 to 1, and whose bits 14:0 select a bit in the
// level-0 kho_radix_leaf. The position of the order bit is the order, so
// all orders share one tree. Table entries hold the physical address of the
// next level's page, 0 for none.

const (
	// RadixOrder0Log2 is the position of the order bit of an order-0
	// block (KHO_ORDER_0_LOG2 = 64 - PAGE_SHIFT = 52).
	RadixOrder0Log2 = 64 - PageShift
	// RadixTableSizeLog2 is log2 of the entries in a kho_radix_node
	// (KHO_TABLE_SIZE_LOG2 = ilog2(PAGE_SIZE / sizeof(phys_addr_t)) = 9).
	RadixTableSizeLog2 = 9
	// RadixBitmapSizeLog2 is log2 of the bits in a kho_radix_leaf
	// (KHO_BITMAP_SIZE_LOG2 = PAGE_SHIFT + ilog2(BITS_PER_BYTE) = 15).
	RadixBitmapSizeLog2 = PageShift + 3
	// RadixTreeMaxDepth is the number of levels, the leaf level included
	// (KHO_TREE_MAX_DEPTH = DIV_ROUND_UP(52 - 15, 9) + 1 = 6).
	RadixTreeMaxDepth = (RadixOrder0Log2-RadixBitmapSizeLog2+RadixTableSizeLog2-1)/RadixTableSizeLog2 + 1
	// RadixTableEntries is the number of u64 entries of a kho_radix_node.
	RadixTableEntries = 1 << RadixTableSizeLog2
	// RadixLeafBits is the number of bits of a kho_radix_leaf.
	RadixLeafBits = 1 << RadixBitmapSizeLog2
	// RadixNodeSize is sizeof(struct kho_radix_node).
	RadixNodeSize = 8 * RadixTableEntries
	// RadixLeafSize is sizeof(struct kho_radix_leaf).
	RadixLeafSize = RadixLeafBits / 8
)

// RadixEncodeKey returns the key of the block of the given order at the
// physical address pa (kho_radix_encode_key).
//
// Preconditions:
//   - 0 <= order <= RadixOrder0Log2.
func RadixEncodeKey(pa uint64, order int) uint64 {
	return 1<<(RadixOrder0Log2-order) | pa>>(PageShift+order)
}

// RadixDecodeKey returns the physical address and order of key
// (kho_radix_decode_key). ok is false for a key whose order bit is above
// RadixOrder0Log2 or absent (key 0), which no block encodes to.
func RadixDecodeKey(key uint64) (pa uint64, order int, ok bool) {
	fls := bits.Len64(key) // fls64: bit positions count from 1
	if fls == 0 || fls > RadixOrder0Log2+1 {
		return 0, 0, false
	}
	order = RadixOrder0Log2 - fls + 1
	// Shifting left by PageShift+order pushes the order bit out.
	return key << (PageShift + order), order, true
}

// RadixTableShift returns the shift of the key bits that index a table at
// level (1 <= level < RadixTreeMaxDepth): (level-1)*9 + 15.
func RadixTableShift(level int) int {
	return (level-1)*RadixTableSizeLog2 + RadixBitmapSizeLog2
}

// RadixTableIndex returns the table entry key selects at level
// (kho_radix_get_table_index).
//
// Preconditions:
//   - 1 <= level < RadixTreeMaxDepth.
func RadixTableIndex(key uint64, level int) int {
	return int(key>>RadixTableShift(level)) % RadixTableEntries
}

// RadixBitmapIndex returns the leaf bit key selects
// (kho_radix_get_bitmap_index).
func RadixBitmapIndex(key uint64) int { return int(key % RadixLeafBits) }

// RadixNodeEntry returns table[i] of the kho_radix_node page b.
//
// Preconditions:
//   - len(b) >= RadixNodeSize and 0 <= i < RadixTableEntries.
func RadixNodeEntry(b []byte, i int) uint64 { return binary.LittleEndian.Uint64(b[8*i:]) }

// SetRadixNodeEntry sets table[i] of the kho_radix_node page b.
//
// Preconditions:
//   - len(b) >= RadixNodeSize and 0 <= i < RadixTableEntries.
func SetRadixNodeEntry(b []byte, i int, pa uint64) { binary.LittleEndian.PutUint64(b[8*i:], pa) }

// A kho_radix_leaf is DECLARE_BITMAP(bitmap, 32768): unsigned longs, bit i
// in word i/64 at position i%64, stored little-endian, which is bit i%8 of
// byte i/8. The same holds for a kho-v1 bitmap page.

// LeafTest reports whether bit i of the leaf b is set.
//
// Preconditions:
//   - len(b) >= RadixLeafSize and 0 <= i < RadixLeafBits.
func LeafTest(b []byte, i int) bool { return b[i>>3]&(1<<(i&7)) != 0 }

// LeafSet sets bit i of the leaf b.
//
// Preconditions:
//   - len(b) >= RadixLeafSize and 0 <= i < RadixLeafBits.
func LeafSet(b []byte, i int) { b[i>>3] |= 1 << (i & 7) }

// LeafClear clears bit i of the leaf b.
//
// Preconditions:
//   - len(b) >= RadixLeafSize and 0 <= i < RadixLeafBits.
func LeafClear(b []byte, i int) { b[i>>3] &^= 1 << (i & 7) }
