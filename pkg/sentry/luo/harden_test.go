package luo_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	abimemfd "github.com/livesentry/livesentry/pkg/abi/memfd"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// pageAt returns the page of s's memory file at the byte address addr.
func pageAt(tb testing.TB, s *sentry, addr uint64) []byte {
	tb.Helper()
	b, err := s.mf.Slice(addr>>pgalloc.PageShift, 1)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// sessionRecords returns the published luo_session_header_ser block of s,
// found as the next sentry finds it: KHO root, "LUO" subtree, LUO FDT.
func sessionRecords(tb testing.TB, s *sentry) []byte {
	tb.Helper()
	root, err := fdt.Parse(pageAt(tb, s, s.k.RootAddr()), pgalloc.PageSize)
	if err != nil {
		tb.Fatal(err)
	}
	// preserved-data in kho-v2, fdt after a kho-v1 Finalize.
	luoAddr, err := root.Child(abiluo.FDTName).U64(abikho.PropPreservedData)
	if err != nil {
		luoAddr, err = root.Child(abiluo.FDTName).U64(abikho.PropSubFDT)
	}
	if err != nil {
		tb.Fatal(err)
	}
	luoFDT, err := fdt.Parse(pageAt(tb, s, luoAddr), pgalloc.PageSize)
	if err != nil {
		tb.Fatal(err)
	}
	hdr, err := luoFDT.Child(abiluo.FDTSessionNode).U64(abiluo.FDTSessionHeader)
	if err != nil {
		tb.Fatal(err)
	}
	return pageAt(tb, s, hdr)
}

// fileRecords returns the luo_file_ser array of the i-th session record.
func fileRecords(tb testing.TB, s *sentry, i int) []byte {
	var ss abiluo.SessionSer
	if err := ss.Decode(sessionRecords(tb, s)[abiluo.SessionHeaderSerSize+i*abiluo.SessionSerSize:]); err != nil {
		tb.Fatal(err)
	}
	return pageAt(tb, s, ss.Files)
}

// folioArray returns the first page of the folio array of the memfd-v1
// record at ser.
func folioArray(tb testing.TB, s *sentry, ser uint64) (*abimemfd.Ser, []byte) {
	var rec abimemfd.Ser
	if err := rec.Decode(pageAt(tb, s, ser)); err != nil {
		tb.Fatal(err)
	}
	return &rec, pageAt(tb, s, abikho.VmallocChunkPhys(pageAt(tb, s, rec.Folios.First), 0))
}

func TestTwoFileRecordsWithOneMemfdRecordAreRefused(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "twice")
	for tok := uint64(1); tok <= 2; tok++ {
		if err := s.preserveFD(sfd, s.memfdWith(t, []byte("x")), tok); err != nil {
			t.Fatal(err)
		}
	}
	_, err := s.handoverAfter(t, func() {
		fb := fileRecords(t, s, 0)
		copy(fb[abiluo.FileSerSize+48:abiluo.FileSerSize+56], fb[48:56])
	})
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "is also the data of luo_file_ser[0]") {
		t.Fatalf("handover: %v; want EINVAL naming the shared data", err)
	}
}

func TestARecordPointerToUnpreservedMemoryIsRefused(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "dangling")
	if err := s.preserveFD(sfd, s.memfdWith(t, []byte("x")), 1); err != nil {
		t.Fatal(err)
	}
	// luo_file_set_ser.files of the session: a page nobody preserved.
	hb := sessionRecords(t, s)
	binary.LittleEndian.PutUint64(hb[abiluo.SessionHeaderSerSize+64:], (s.mf.Pages()-1)<<pgalloc.PageShift)
	_, err := s.handover(t)
	if err == nil || !strings.Contains(err.Error(), "luo_file_ser array of session") {
		t.Fatalf("handover with luo_file_set_ser.files at an unpreserved page: %v", err)
	}
}

func TestAMillionFileRecordsClaimedAllocateNothingOfTheirSize(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "claims")
	if err := s.preserveFD(sfd, s.memfdWith(t, []byte("x")), 1); err != nil {
		t.Fatal(err)
	}
	hb := sessionRecords(t, s)
	binary.LittleEndian.PutUint64(hb[abiluo.SessionHeaderSerSize+72:], 1<<20)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := s.handover(t)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "luo_file_set_ser.count 1048576") {
		t.Fatalf("handover claiming 1M file records: %v; want EINVAL naming the count", err)
	}
	// 1M luoFile records would be well over 100 MiB; the handover itself
	// (a fresh KHO and LUO over a 256 MiB file) needs a few MiB.
	if got := after.TotalAlloc - before.TotalAlloc; got > 32<<20 {
		t.Fatalf("refusing 1M claimed records allocated %d MiB", got>>20)
	}
}

// preservedMemfd preserves a memfd of pages order-0 pages, each starting
// with its number, under token 1 of a new session, and returns the
// address of its memfd_luo_ser.
func preservedMemfd(t *testing.T, name string, pages int) (*sentry, uint64) {
	s, ser := bootRecordingSer(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, name)
	fd := s.memfdWith(t, nil)
	for i := 0; i < pages; i++ {
		if _, err := s.memfd(t, fd).Pwrite([]byte{byte(i + 1)}, int64(i)*pgalloc.PageSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.preserveFD(sfd, fd, 1); err != nil {
		t.Fatal(err)
	}
	return s, *ser
}

// retrieveErr restarts s and returns the error of retrieving token 1 of
// session name, which must be EINVAL naming want.
func retrieveErr(t *testing.T, s *sentry, name, want string) {
	t.Helper()
	n := s.restart(t)
	dev, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev, name)
	if _, err := n.retrieveFD(r, 1); !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), want) {
		t.Fatalf("RETRIEVE_FD: %v; want EINVAL naming %q", err, want)
	}
}

func TestAShortenedNrFoliosIsRefused(t *testing.T) {
	s, ser := preservedMemfd(t, "short", 4)
	rec, _ := folioArray(t, s, ser)
	rec.NrFolios--
	if err := rec.Encode(pageAt(t, s, ser)); err != nil {
		t.Fatal(err)
	}
	retrieveErr(t, s, "short", "nr_folios 3")
}

func TestAFolioRecordWithPFN0IsRefused(t *testing.T) {
	s, ser := preservedMemfd(t, "pfn0", 4)
	_, array := folioArray(t, s, ser)
	r := abimemfd.DecodeFolioSer(array[2*abimemfd.FolioSerSize:])
	r.PFN = 0
	r.Encode(array[2*abimemfd.FolioSerSize:])
	retrieveErr(t, s, "pfn0", "memfd_luo_folio_ser[2] (index 0x2)")
}

func TestAHoleBetweenFolioRecordsIsRefused(t *testing.T) {
	s, ser := preservedMemfd(t, "hole", 4)
	_, array := folioArray(t, s, ser)
	// Move the last folio from index 3 to index 4: page 3 is uncovered.
	r := abimemfd.DecodeFolioSer(array[3*abimemfd.FolioSerSize:])
	r.Index = 4
	r.Encode(array[3*abimemfd.FolioSerSize:])
	retrieveErr(t, s, "hole", "leaves a hole")
}

func TestOneFileNamingAFolioTwiceIsRefused(t *testing.T) {
	s, ser := preservedMemfd(t, "dup", 4)
	_, array := folioArray(t, s, ser)
	copy(array[1*abimemfd.FolioSerSize:1*abimemfd.FolioSerSize+8], array[0:8])
	retrieveErr(t, s, "dup", "both name the folio")
}

func TestAFolioNamedByTwoSessionsIsRefusedToTheSecond(t *testing.T) {
	s, sers := bootRecordingSer(t)
	dev, _ := s.openDevice(t)
	var serA uint64
	for i, name := range []string{"a", "b"} {
		sfd := s.createSession(t, dev, name)
		fd := s.memfdWith(t, bytes.Repeat([]byte(name), pgalloc.PageSize))
		if err := s.preserveFD(sfd, fd, 1); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			serA = *sers
		}
	}
	// b's folio record names a's folio.
	_, arrayA := folioArray(t, s, serA)
	_, arrayB := folioArray(t, s, *sers)
	copy(arrayB[0:8], arrayA[0:8])
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	ra := n.retrieveSession(t, dev2, "a")
	n.verify(t, ra, 1, bytes.Repeat([]byte("a"), pgalloc.PageSize))
	rb := n.retrieveSession(t, dev2, "b")
	if _, err := n.retrieveFD(rb, 1); err == nil || !strings.Contains(err.Error(), "folio 0 of memfd_luo_ser") {
		t.Fatalf("RETRIEVE_FD of b, whose record names a's folio: %v; want a refusal", err)
	}
}

// TestARunOfFolioRecordsThatReachesAFreePageIsRefusedNamingIt: an 8-page
// memfd whose last page was punched out before preserve (preserve fills
// the hole with a page elsewhere) has its last record rewritten to name the
// punched page. The records then look like one run of order-0 folios,
// which a retrieve restores a bitmap word at a time; that fails on the
// free page, and the folios are then restored one by one so that the error
// names the record. Another session's file is untouched.
func TestARunOfFolioRecordsThatReachesAFreePageIsRefusedNamingIt(t *testing.T) {
	s, sers := bootRecordingSer(t)
	dev, _ := s.openDevice(t)
	fdA := s.memfdWith(t, bytes.Repeat([]byte("a"), pgalloc.PageSize))
	fdB := s.memfdWith(t, bytes.Repeat([]byte("b"), 8*pgalloc.PageSize))
	if err := s.memfd(t, fdB).Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 7*pgalloc.PageSize, pgalloc.PageSize); err != nil {
		t.Fatal(err)
	}
	var serB uint64
	for _, p := range []struct {
		name string
		fd   int32
	}{{"a", fdA}, {"b", fdB}} {
		sfd := s.createSession(t, dev, p.name)
		if err := s.preserveFD(sfd, p.fd, 1); err != nil {
			t.Fatal(err)
		}
		serB = *sers
	}
	_, arrayB := folioArray(t, s, serB)
	first := abimemfd.DecodeFolioSer(arrayB).PFN
	for i := range 7 {
		if r := abimemfd.DecodeFolioSer(arrayB[i*abimemfd.FolioSerSize:]); r.PFN != first+uint64(i) {
			t.Fatalf("b's page %d is at pfn %#x, want %#x: the test needs b's pages together", i, r.PFN, first+uint64(i))
		}
	}
	if _, _, allocated := s.mf.Lookup(first + 7); allocated {
		t.Fatalf("b's punched page, pfn %#x, is allocated again: the test needs it free", first+7)
	}
	r := abimemfd.DecodeFolioSer(arrayB[7*abimemfd.FolioSerSize:])
	r.PFN = first + 7
	r.Encode(arrayB[7*abimemfd.FolioSerSize:])
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	rb := n.retrieveSession(t, dev2, "b")
	if _, err := n.retrieveFD(rb, 1); !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "folio 7 of memfd_luo_ser") {
		t.Fatalf("RETRIEVE_FD of b, whose last record names a free page: %v; want EINVAL naming folio 7", err)
	}
	ra := n.retrieveSession(t, dev2, "a")
	n.verify(t, ra, 1, bytes.Repeat([]byte("a"), pgalloc.PageSize))
}
