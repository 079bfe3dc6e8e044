package kho

import "encoding/binary"

const (
	// VmallocSize is sizeof(struct kho_vmalloc).
	VmallocSize = 16
	// VmallocAlloc is KHO_VMALLOC_ALLOC: the area came from vmalloc.
	VmallocAlloc = 0x0001
	// VmallocHugeVmap is KHO_VMALLOC_HUGE_VMAP: the area is mapped with
	// huge pages (order > 0).
	VmallocHugeVmap = 0x0002
	// VmallocFlagsMask is every flag this version knows.
	VmallocFlagsMask = VmallocAlloc | VmallocHugeVmap
	// VmallocChunkSlots is the number of physical addresses in one chunk
	// page after its next pointer (KHO_VMALLOC_SIZE = 511).
	VmallocChunkSlots = (PageSize - 8) / 8
)

// Vmalloc is struct kho_vmalloc, the 16-byte descriptor of a preserved
// vmalloc-style area: a chain of chunk pages, each a next pointer followed by
// VmallocChunkSlots physical addresses of 2^Order-page blocks, zero-terminated.
type Vmalloc struct {
	// First is the physical address of the first chunk page.
	First uint64
	// TotalPages is the number of base pages in the area.
	TotalPages uint32
	// Flags is a set of Vmalloc* flags.
	Flags uint16
	// Order is the order of every block of the area.
	Order uint16
}

// Encode writes v into the first VmallocSize bytes of b.
func (v Vmalloc) Encode(b []byte) error {
	if len(b) < VmallocSize {
		return short("kho_vmalloc", len(b), VmallocSize)
	}
	binary.LittleEndian.PutUint64(b[0:], v.First)
	binary.LittleEndian.PutUint32(b[8:], v.TotalPages)
	binary.LittleEndian.PutUint16(b[12:], v.Flags)
	binary.LittleEndian.PutUint16(b[14:], v.Order)
	return nil
}

// Decode reads v from the first VmallocSize bytes of b.
func (v *Vmalloc) Decode(b []byte) error {
	if len(b) < VmallocSize {
		return short("kho_vmalloc", len(b), VmallocSize)
	}
	v.First = binary.LittleEndian.Uint64(b[0:])
	v.TotalPages = binary.LittleEndian.Uint32(b[8:])
	v.Flags = binary.LittleEndian.Uint16(b[12:])
	v.Order = binary.LittleEndian.Uint16(b[14:])
	return nil
}

// VmallocChunkNext returns the next pointer of the chunk page b
// (kho_vmalloc_hdr.next).
//
// Preconditions:
//   - len(b) >= PageSize.
func VmallocChunkNext(b []byte) uint64 { return binary.LittleEndian.Uint64(b[0:]) }

// SetVmallocChunkNext sets the next pointer of the chunk page b.
//
// Preconditions:
//   - len(b) >= PageSize.
func SetVmallocChunkNext(b []byte, next uint64) { binary.LittleEndian.PutUint64(b[0:], next) }

// VmallocChunkPhys returns slot i of the chunk page b (kho_vmalloc_chunk.phys[i]).
//
// Preconditions:
//   - len(b) >= PageSize and 0 <= i < VmallocChunkSlots.
func VmallocChunkPhys(b []byte, i int) uint64 { return binary.LittleEndian.Uint64(b[8+8*i:]) }

// SetVmallocChunkPhys sets slot i of the chunk page b.
//
// Preconditions:
//   - len(b) >= PageSize and 0 <= i < VmallocChunkSlots.
func SetVmallocChunkPhys(b []byte, i int, phys uint64) {
	binary.LittleEndian.PutUint64(b[8+8*i:], phys)
}
