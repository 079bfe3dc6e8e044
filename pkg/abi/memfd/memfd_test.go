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

// struct memfd_luo_ser of "memfd-v2" (linux-mm 873e8b59c82f): every field at
// its offset, 48 bytes in all, little-endian and packed.
func TestSerV2Layout(t *testing.T) {
	if SerV2Size != 48 || CompatibleV2 != "memfd-v2" {
		t.Fatalf("memfd-v2: ser %d bytes, compatible %q", SerV2Size, CompatibleV2)
	}
	if AllSeals != 0x3f {
		t.Fatalf("MEMFD_LUO_ALL_SEALS = %#x, want 0x3f", AllSeals)
	}
	s := SerV2{
		Pos:      0x1111111111111111,
		Size:     0x2222222222222222,
		Seals:    0x33333333,
		Flags:    0x44444444,
		NrFolios: 0x5555555555555555,
		Folios:   abikho.Vmalloc{First: 0x6666666666666666, TotalPages: 0x77777777, Flags: 0x8888, Order: 0x9999},
	}
	b := make([]byte, SerV2Size+8)
	for i := range b {
		b[i] = 0xee
	}
	if err := s.Encode(b); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		name         string
		offset, size int
		want         uint64
	}{
		{"pos", 0, 8, s.Pos},
		{"size", 8, 8, s.Size},
		{"seals", 16, 4, uint64(s.Seals)},
		{"flags", 20, 4, uint64(s.Flags)},
		{"nr_folios", 24, 8, s.NrFolios},
		{"folios.first", 32, 8, s.Folios.First},
		{"folios.total_pages", 40, 4, uint64(s.Folios.TotalPages)},
		{"folios.flags", 44, 2, uint64(s.Folios.Flags)},
		{"folios.order", 46, 2, uint64(s.Folios.Order)},
	} {
		var got uint64
		switch f.size {
		case 8:
			got = binary.LittleEndian.Uint64(b[f.offset:])
		case 4:
			got = uint64(binary.LittleEndian.Uint32(b[f.offset:]))
		case 2:
			got = uint64(binary.LittleEndian.Uint16(b[f.offset:]))
		}
		if got != f.want {
			t.Errorf("%s at offset %d = %#x, want %#x", f.name, f.offset, got, f.want)
		}
	}
	if b[48] != 0xee {
		t.Errorf("encoding wrote past byte 48: % x", b[48:])
	}
	var back SerV2
	if err := back.Decode(b); err != nil || back != s {
		t.Fatalf("round trip = %+v, %v", back, err)
	}
	if err := back.Decode(b[:47]); err == nil {
		t.Fatal("decoding 47 bytes succeeded")
	}
	if err := s.Encode(b[:47]); err == nil {
		t.Fatal("encoding into 47 bytes succeeded")
	}
}

// memfd-v1's record is a prefix-incompatible layout: the same bytes read as
// v2 put nr_folios where the seals go. This is why the compatible strings
// differ and why each record is read by its own format only.
func TestSerV1Offsets(t *testing.T) {
	s := Ser{Pos: 1, Size: 2, NrFolios: 3, Folios: abikho.Vmalloc{First: 4, TotalPages: 5, Flags: 6, Order: 7}}
	b := make([]byte, SerSize)
	if err := s.Encode(b); err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		name   string
		offset int
		want   uint64
	}{
		{"pos", 0, 1}, {"size", 8, 2}, {"nr_folios", 16, 3}, {"folios.first", 24, 4},
	} {
		if got := binary.LittleEndian.Uint64(b[f.offset:]); got != f.want {
			t.Errorf("%s at offset %d = %d, want %d", f.name, f.offset, got, f.want)
		}
	}
	if binary.LittleEndian.Uint32(b[32:]) != 5 || binary.LittleEndian.Uint16(b[36:]) != 6 || binary.LittleEndian.Uint16(b[38:]) != 7 {
		t.Errorf("folios descriptor at 32: % x", b[32:])
	}
}
