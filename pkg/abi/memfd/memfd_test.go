package memfd

import (
	"encoding/binary"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
)

// The layouts of include/linux/kho/abi/memfd.h as shared/spec/linux-luo.md
// §1.1 gives them.
func TestConstantsMatchTheSpec(t *testing.T) {
	if SerSize != 40 || FolioSerSize != 16 || FolioDirty != 1 || FolioUptodate != 2 || Compatible != "memfd-v1" || PFNBits != 52 {
		t.Fatalf("memfd-v1 constants: ser %d, folio %d, dirty %d, uptodate %d, %q, pfn bits %d", SerSize, FolioSerSize, FolioDirty, FolioUptodate, Compatible, PFNBits)
	}
}

func TestFolioSerBitfield(t *testing.T) {
	f := FolioSer{PFN: MaxPFN, Flags: FolioDirty | FolioUptodate, Index: 42}
	b := make([]byte, FolioSerSize)
	f.Encode(b)
	w := binary.LittleEndian.Uint64(b)
	if w&(1<<52-1) != MaxPFN || w>>52 != 3 || binary.LittleEndian.Uint64(b[8:]) != 42 {
		t.Fatalf("memfd_luo_folio_ser word 0 = %#x, index %d", w, binary.LittleEndian.Uint64(b[8:]))
	}
	if got := DecodeFolioSer(b); got != f {
		t.Fatalf("round trip = %+v, want %+v", got, f)
	}
	// Flags above bit 63 are cut, never spilling into the PFN.
	f = FolioSer{PFN: 5, Flags: 0xfff}
	f.Encode(b)
	if got := DecodeFolioSer(b); got.PFN != 5 || got.Flags != 0xfff {
		t.Fatalf("all 12 flag bits: %+v", got)
	}
}

func TestSerLayout(t *testing.T) {
	s := Ser{Pos: 1, Size: 2, NrFolios: 3, Folios: abikho.Vmalloc{First: 0x4000, TotalPages: 5, Flags: abikho.VmallocAlloc, Order: 0}}
	b := make([]byte, SerSize)
	if err := s.Encode(b); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint64(b[16:]) != 3 || binary.LittleEndian.Uint64(b[24:]) != 0x4000 || binary.LittleEndian.Uint32(b[32:]) != 5 {
		t.Fatalf("memfd_luo_ser encodes as % x", b)
	}
	var back Ser
	if err := back.Decode(b); err != nil || back != s {
		t.Fatalf("round trip = %+v, %v", back, err)
	}
	if err := back.Decode(b[:39]); err == nil {
		t.Fatal("decoding 39 bytes succeeded")
	}
}
