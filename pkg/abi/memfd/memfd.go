// Package memfd holds the byte layouts of memfd preservation
// (include/linux/kho/abi/memfd.h, v6.19, "memfd-v1"): the record that
// describes a preserved memfd and the array of its folios.
package memfd

import (
	"encoding/binary"
	"fmt"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"golang.org/x/sys/unix"
)

const (
	// Compatible is MEMFD_LUO_FH_COMPATIBLE. Any change to the layouts
	// below must change it.
	Compatible = "memfd-v1"

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
	// SerSize is sizeof(struct memfd_luo_ser).
	SerSize = 40
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
