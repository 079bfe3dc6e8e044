package kho

import (
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func TestLayoutSizes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want int
	}{
		{"kho_vmalloc is 16 bytes", VmallocSize, 16},
		{"a vmalloc chunk holds 511 addresses after its next pointer", VmallocChunkSlots, 511},
		{"a vmalloc chunk is one page", 8 + 8*VmallocChunkSlots, PageSize},
		{"khoser_mem_chunk_hdr is 16 bytes", MemChunkHdrSize, 16},
		{"khoser_mem_bitmap_ptr is 16 bytes", MemBitmapPtrSize, 16},
		{"a map chunk holds 255 bitmap pointers", MemChunkCapacity, 255},
		{"a map chunk fits in one page", MemChunkBitmapOffset(MemChunkCapacity), PageSize},
		{"a bitmap page holds 32768 bits", PreserveBits, 32768},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Errorf("got %d, want %d", tc.got, tc.want)
			}
		})
	}
}

func TestVmallocEncoding(t *testing.T) {
	v := Vmalloc{First: 0x1122334455667788, TotalPages: 0x99aabbcc, Flags: VmallocAlloc | VmallocHugeVmap, Order: 9}
	b := make([]byte, VmallocSize)
	if err := v.Encode(b); err != nil {
		t.Fatal(err)
	}
	want := []byte{0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xcc, 0xbb, 0xaa, 0x99, 0x03, 0x00, 0x09, 0x00}
	if string(b) != string(want) {
		t.Errorf("Encode = % x, want % x", b, want)
	}
	var got Vmalloc
	if err := got.Decode(b); err != nil || got != v {
		t.Errorf("Decode = %+v, %v; want %+v", got, err, v)
	}
	if err := v.Encode(b[:15]); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Encode into 15 bytes = %v, want EINVAL", err)
	}
	if err := got.Decode(b[:15]); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Decode of 15 bytes = %v, want EINVAL", err)
	}
}

func TestMemChunkEncoding(t *testing.T) {
	page := make([]byte, PageSize)
	h := MemChunkHdr{Next: 0x3000, Order: 9, NumElms: 255}
	if err := h.Encode(page); err != nil {
		t.Fatal(err)
	}
	p := MemBitmapPtr{PhysStart: 1 << 40, Bitmap: 0x4000}
	if err := p.Encode(page[MemChunkBitmapOffset(254):]); err != nil {
		t.Fatal(err)
	}
	want := []byte{0x00, 0x30, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0xff, 0, 0, 0}
	if string(page[:16]) != string(want) {
		t.Errorf("header = % x, want % x", page[:16], want)
	}
	var h2 MemChunkHdr
	var p2 MemBitmapPtr
	if err := h2.Decode(page); err != nil || h2 != h {
		t.Errorf("header Decode = %+v, %v", h2, err)
	}
	if err := p2.Decode(page[PageSize-16:]); err != nil || p2 != p {
		t.Errorf("last bitmap pointer Decode = %+v, %v", p2, err)
	}
	for _, err := range []error{h.Encode(page[:15]), h2.Decode(page[:15]), p.Encode(page[:15]), p2.Decode(page[:15])} {
		if !errors.Is(err, unix.EINVAL) {
			t.Errorf("short buffer: %v, want EINVAL", err)
		}
	}
}

func TestVmallocChunkSlots(t *testing.T) {
	page := make([]byte, PageSize)
	SetVmallocChunkNext(page, 0x9000)
	SetVmallocChunkPhys(page, 0, 0xa000)
	SetVmallocChunkPhys(page, VmallocChunkSlots-1, 0xb000)
	if VmallocChunkNext(page) != 0x9000 || VmallocChunkPhys(page, 0) != 0xa000 || VmallocChunkPhys(page, VmallocChunkSlots-1) != 0xb000 {
		t.Errorf("chunk accessors do not round-trip")
	}
	if page[8] != 0x00 || page[9] != 0xa0 || page[PageSize-7] != 0xb0 {
		t.Errorf("slots are not little-endian at 8+8*i: % x ... % x", page[8:16], page[PageSize-8:])
	}
}

// TestRadixLayout asserts every kho-v2 constant, struct size and key bit
// position against torvalds/linux 3f2ad900,
// include/linux/kho/abi/kexec_handover.h ("KHO persistent memory tracker"
// and enum kho_radix_consts), and the property names of its DOC comment.
func TestRadixLayout(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"KHO_FDT_COMPATIBLE is kho-v2", CompatibleV2, "kho-v2"},
		{"the v6.19 KHO_FDT_COMPATIBLE is kho-v1", CompatibleV1, "kho-v1"},
		{"KHO_FDT_MEMORY_MAP_PROP_NAME is preserved-memory-map", PropPreservedMemoryMap, "preserved-memory-map"},
		{"KHO_FDT_SUB_TREE_PROP_NAME is preserved-data", PropPreservedData, "preserved-data"},
		{"the v6.19 PROP_SUB_FDT is fdt", PropSubFDT, "fdt"},
		{"KHO_ORDER_0_LOG2 is 64 - PAGE_SHIFT = 52", RadixOrder0Log2, 52},
		{"KHO_TABLE_SIZE_LOG2 is 9", RadixTableSizeLog2, 9},
		{"KHO_BITMAP_SIZE_LOG2 is 15", RadixBitmapSizeLog2, 15},
		{"KHO_TREE_MAX_DEPTH is 6", RadixTreeMaxDepth, 6},
		{"struct kho_radix_node is 512 u64, one page", RadixNodeSize, PageSize},
		{"a kho_radix_node has 512 entries", RadixTableEntries, 512},
		{"struct kho_radix_leaf is one page", RadixLeafSize, PageSize},
		{"a kho_radix_leaf has 32768 bits, as a kho-v1 bitmap", RadixLeafBits, PreserveBits},
		{"level 1 indexes key bits 23:15", RadixTableShift(1), 15},
		{"level 5 indexes key bits 59:51", RadixTableShift(5), 51},
		{"an order-0 key has its order bit at 52", RadixEncodeKey(0, 0), uint64(1) << 52},
		{"an order-1 key has its order bit at 51", RadixEncodeKey(0, 1), uint64(1) << 51},
		{"the order-0 key of pa 0x5000 is 1<<52 | 5", RadixEncodeKey(0x5000, 0), uint64(1)<<52 | 5},
		{"the order-9 key of pa 2 MiB is 1<<43 | 1", RadixEncodeKey(2<<20, 9), uint64(1)<<43 | 1},
		{"an order-0 key goes to level-5 entry 2", RadixTableIndex(RadixEncodeKey(0x5000, 0), 5), 2},
		{"an order-10 key goes to level-5 entry 0", RadixTableIndex(RadixEncodeKey(0x400000, 10), 5), 0},
		{"an order-10 key goes to level-4 entry 1", RadixTableIndex(RadixEncodeKey(0x400000, 10), 4), 1},
		{"pfn 32769 at order 0 is leaf bit 1", RadixBitmapIndex(RadixEncodeKey(32769<<PageShift, 0)), 1},
		{"pfn 32769 at order 0 is level-1 entry 1", RadixTableIndex(RadixEncodeKey(32769<<PageShift, 0), 1), 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Errorf("got %v, want %v", tc.got, tc.want)
			}
		})
	}
}

func TestRadixKeyRoundTrip(t *testing.T) {
	for order := 0; order <= MaxPageOrder; order++ {
		for _, pfn := range []uint64{0, 1 << order, 5 << order, 1<<40 - 1<<order} {
			pa := pfn << PageShift
			gotPA, gotOrder, ok := RadixDecodeKey(RadixEncodeKey(pa, order))
			if !ok || gotPA != pa || gotOrder != order {
				t.Errorf("decode(encode(%#x, %d)) = %#x, %d, %v", pa, order, gotPA, gotOrder, ok)
			}
		}
	}
	for _, key := range []uint64{0, 1 << 53, 1 << 63} {
		if _, _, ok := RadixDecodeKey(key); ok {
			t.Errorf("RadixDecodeKey(%#x) accepted a key no block encodes to", key)
		}
	}
}

func TestRadixNodeAndLeafEncoding(t *testing.T) {
	node := make([]byte, RadixNodeSize)
	SetRadixNodeEntry(node, 511, 0x1122334455667000)
	if RadixNodeEntry(node, 511) != 0x1122334455667000 || node[PageSize-8] != 0x00 || node[PageSize-7] != 0x70 || node[PageSize-1] != 0x11 {
		t.Errorf("table[511] is not a little-endian u64 at byte 4088: % x", node[PageSize-8:])
	}
	leaf := make([]byte, RadixLeafSize)
	LeafSet(leaf, 65) // word 1, bit 1: byte 8, bit 1 as unsigned longs stored little-endian
	if leaf[8] != 0x02 || !LeafTest(leaf, 65) || LeafTest(leaf, 64) {
		t.Errorf("bit 65 is not bit 1 of byte 8: % x", leaf[:16])
	}
	if binary.LittleEndian.Uint64(leaf[8:]) != 2 {
		t.Errorf("bit 65 is not bit 1 of the second unsigned long")
	}
	LeafClear(leaf, 65)
	if leaf[8] != 0 {
		t.Errorf("LeafClear left % x", leaf[:16])
	}
}
