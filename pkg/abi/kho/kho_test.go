package kho

import (
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
