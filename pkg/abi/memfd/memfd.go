// Package memfd holds the byte layouts of memfd preservation
// (include/linux/kho/abi/memfd.h): the record that describes a preserved
// memfd and the array of its folios, in both formats Linux has had:
//
//   - "memfd-v1" (torvalds/linux 32cb2729, v6.19): a 40-byte memfd_luo_ser
//     {pos, size, nr_folios, folios}; seals are not carried.
//   - "memfd-v2" (linux-mm 873e8b59c82f, "mm: memfd_luo: preserve file
//     seals", 2026): a 48-byte memfd_luo_ser {pos, size, seals, flags,
//     nr_folios, folios}.
//
// Both share memfd_luo_folio_ser and the kho_vmalloc descriptor.
package memfd

import (
	"encoding/binary"
	"fmt"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"golang.org/x/sys/unix"
)

const (
	// Compatible is MEMFD_LUO_FH_COMPATIBLE of the v1 layout (Ser). Any
	// change to a layout must change its string.
	Compatible = "memfd-v1"
	// CompatibleV2 is MEMFD_LUO_FH_COMPATIBLE of the v2 layout (SerV2).
	CompatibleV2 = "memfd-v2"

	// AllSeals is MEMFD_LUO_ALL_SEALS, the seals "memfd-v2" can carry:
	// F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE,
	// F_SEAL_FUTURE_WRITE and F_SEAL_EXEC. A file with any other seal is
	// refused with EOPNOTSUPP.
	AllSeals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW |
		unix.F_SEAL_WRITE | unix.F_SEAL_FUTURE_WRITE | unix.F_SEAL_EXEC

	// FolioDirty is MEMFD_LUO_FOLIO_DIRTY: the folio holds user data.
	FolioDirty = 1 << 0
	// FolioUptodate is MEMFD_LUO_FOLIO_UPTODATE: the folio is initialised.
	FolioUptodate = 1 << 1
	// FolioFlagsMask is every flag "memfd-v1" defines.
	FolioFlagsMask = FolioDirty | FolioUptodate

	// PFNBits is the width of the pfn bitfield.
	PFNBits = 52
	// MaxPFN is the largest PFN the record can hold.
	MaxPFN = 1<<PFNBits - 1

	// FolioSerSize is sizeof(struct memfd_luo_folio_ser).
	FolioSerSize = 16
	// SerSize is sizeof(struct memfd_luo_ser) in "memfd-v1".
	SerSize = 40
	// SerV2Size is sizeof(struct memfd_luo_ser) in "memfd-v2".
	SerV2Size = 48
)

// FolioSer is struct memfd_luo_folio_ser: word 0 holds the PFN in bits
// 0–51 and the flags in bits 52–63 (a little-endian bitfield), word 1 the
// folio's page index in the file. PFN 0 means "no folio".
type FolioSer struct {
	PFN   uint64
	Flags uint16
	Index uint64
}

// Encode writes f into the first FolioSerSize bytes of b.
//
// Preconditions:
//   - f.PFN <= MaxPFN and f.Flags < 1<<12.
func (f FolioSer) Encode(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], f.PFN&MaxPFN|uint64(f.Flags)<<PFNBits)
	binary.LittleEndian.PutUint64(b[8:], f.Index)
}

// DecodeFolioSer reads a FolioSer from b, which must hold FolioSerSize
// bytes.
func DecodeFolioSer(b []byte) FolioSer {
	w := binary.LittleEndian.Uint64(b[0:])
	return FolioSer{PFN: w & MaxPFN, Flags: uint16(w >> PFNBits), Index: binary.LittleEndian.Uint64(b[8:])}
}

// Ser is struct memfd_luo_ser: the file's position and size, and the
// folio array (nr_folios FolioSer records in a preserved vmalloc-style area).
type Ser struct {
	Pos      uint64
	Size     uint64
	NrFolios uint64
	Folios   abikho.Vmalloc
}

// Encode writes s into the first SerSize bytes of b.
func (s *Ser) Encode(b []byte) error {
	if len(b) < SerSize {
		return fmt.Errorf("memfd_luo_ser: %d bytes, want %d: %w", len(b), SerSize, unix.EINVAL)
	}
	binary.LittleEndian.PutUint64(b[0:], s.Pos)
	binary.LittleEndian.PutUint64(b[8:], s.Size)
	binary.LittleEndian.PutUint64(b[16:], s.NrFolios)
	return s.Folios.Encode(b[24:])
}

// Decode reads s from b.
func (s *Ser) Decode(b []byte) error {
	if len(b) < SerSize {
		return fmt.Errorf("memfd_luo_ser: %d bytes, want %d: %w", len(b), SerSize, unix.EINVAL)
	}
	s.Pos = binary.LittleEndian.Uint64(b[0:])
	s.Size = binary.LittleEndian.Uint64(b[8:])
	s.NrFolios = binary.LittleEndian.Uint64(b[16:])
	return s.Folios.Decode(b[24:])
}

// SerV2 is struct memfd_luo_ser of "memfd-v2": Ser with the file's seals
// (uapi F_SEAL_* bits, stored as they are) and a flags word whose bits are
// all unused and must be zero.
type SerV2 struct {
	Pos      uint64
	Size     uint64
	Seals    uint32
	Flags    uint32
	NrFolios uint64
	Folios   abikho.Vmalloc
}

// Encode writes s into the first SerV2Size bytes of b.
func (s *SerV2) Encode(b []byte) error {
	if len(b) < SerV2Size {
		return fmt.Errorf("memfd_luo_ser (memfd-v2): %d bytes, want %d: %w", len(b), SerV2Size, unix.EINVAL)
	}
	binary.LittleEndian.PutUint64(b[0:], s.Pos)
	binary.LittleEndian.PutUint64(b[8:], s.Size)
	binary.LittleEndian.PutUint32(b[16:], s.Seals)
	binary.LittleEndian.PutUint32(b[20:], s.Flags)
	binary.LittleEndian.PutUint64(b[24:], s.NrFolios)
	return s.Folios.Encode(b[32:])
}

// Decode reads s from b.
func (s *SerV2) Decode(b []byte) error {
	if len(b) < SerV2Size {
		return fmt.Errorf("memfd_luo_ser (memfd-v2): %d bytes, want %d: %w", len(b), SerV2Size, unix.EINVAL)
	}
	s.Pos = binary.LittleEndian.Uint64(b[0:])
	s.Size = binary.LittleEndian.Uint64(b[8:])
	s.Seals = binary.LittleEndian.Uint32(b[16:])
	s.Flags = binary.LittleEndian.Uint32(b[20:])
	s.NrFolios = binary.LittleEndian.Uint64(b[24:])
	return s.Folios.Decode(b[32:])
}
