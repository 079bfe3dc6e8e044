package kho

import "encoding/binary"

// The preserved-memory map (kho_mem_serialize, v6.16–v7.0): per order, sparse
// bitmaps of PreserveBits bits, one 4 KiB page each; bit i of the bitmap
// that starts at PhysStart means that the 2^order-page block at
// PhysStart + i<<(order+PageShift) is preserved. At finalize the bitmaps are
// listed in a chain of MemChunk pages.

const (
	// PreserveBits is the number of bits in one bitmap page
	// (PRESERVE_BITS = PAGE_SIZE * 8).
	PreserveBits = PageSize * 8
	// MemChunkHdrSize is sizeof(struct khoser_mem_chunk_hdr).
	MemChunkHdrSize = 16
	// MemBitmapPtrSize is sizeof(struct khoser_mem_bitmap_ptr).
	MemBitmapPtrSize = 16
	// MemChunkCapacity is the number of bitmap pointers in one chunk page
	// (KHOSER_BITMAP_SIZE = (PAGE_SIZE - 16) / 16 = 255).
	MemChunkCapacity = (PageSize - MemChunkHdrSize) / MemBitmapPtrSize
)

// MemChunkHdr is struct khoser_mem_chunk_hdr, the first 16 bytes of a map
// chunk page.
type MemChunkHdr struct {
	// Next is the physical address of the next chunk, 0 at the end.
	Next uint64
	// Order is the order of every block the chunk's bitmaps describe.
	Order uint32
	// NumElms is the number of bitmap pointers used in this chunk.
	NumElms uint32
}

// Encode writes h into the first MemChunkHdrSize bytes of b.
func (h MemChunkHdr) Encode(b []byte) error {
	if len(b) < MemChunkHdrSize {
		return short("khoser_mem_chunk_hdr", len(b), MemChunkHdrSize)
	}
	binary.LittleEndian.PutUint64(b[0:], h.Next)
	binary.LittleEndian.PutUint32(b[8:], h.Order)
	binary.LittleEndian.PutUint32(b[12:], h.NumElms)
	return nil
}

// Decode reads h from the first MemChunkHdrSize bytes of b.
func (h *MemChunkHdr) Decode(b []byte) error {
	if len(b) < MemChunkHdrSize {
		return short("khoser_mem_chunk_hdr", len(b), MemChunkHdrSize)
	}
	h.Next = binary.LittleEndian.Uint64(b[0:])
	h.Order = binary.LittleEndian.Uint32(b[8:])
	h.NumElms = binary.LittleEndian.Uint32(b[12:])
	return nil
}

// MemBitmapPtr is struct khoser_mem_bitmap_ptr: where one bitmap starts in
// the file's address space and where the bitmap page itself is.
type MemBitmapPtr struct {
	// PhysStart is the address described by bit 0 of the bitmap:
	// (bitmap index * PreserveBits) << (order + PageShift).
	PhysStart uint64
	// Bitmap is the physical address of the PageSize-byte bitmap.
	Bitmap uint64
}

// Encode writes p into the first MemBitmapPtrSize bytes of b.
func (p MemBitmapPtr) Encode(b []byte) error {
	if len(b) < MemBitmapPtrSize {
		return short("khoser_mem_bitmap_ptr", len(b), MemBitmapPtrSize)
	}
	binary.LittleEndian.PutUint64(b[0:], p.PhysStart)
	binary.LittleEndian.PutUint64(b[8:], p.Bitmap)
	return nil
}

// Decode reads p from the first MemBitmapPtrSize bytes of b.
func (p *MemBitmapPtr) Decode(b []byte) error {
	if len(b) < MemBitmapPtrSize {
		return short("khoser_mem_bitmap_ptr", len(b), MemBitmapPtrSize)
	}
	p.PhysStart = binary.LittleEndian.Uint64(b[0:])
	p.Bitmap = binary.LittleEndian.Uint64(b[8:])
	return nil
}

// MemChunkBitmapOffset returns the byte offset of bitmap pointer i in a
// chunk page.
//
// Preconditions:
//   - 0 <= i < MemChunkCapacity.
func MemChunkBitmapOffset(i int) int { return MemChunkHdrSize + i*MemBitmapPtrSize }
