package memfd

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// The differential test runs random sequences of memfd calls against a File
// and against a memfd of the host kernel, the oracle, and compares every
// result. `go test` runs a fixed-seed subset; the long run is
//
//	go test ./pkg/sentry/memfd/ -run TestOracle -memfd.sequences=100000
var (
	flagSequences = flag.Int("memfd.sequences", 200, "number of random sequences TestOracle runs (30 with -short)")
	flagSeed      = flag.Uint64("memfd.seed", 1, "seed of TestOracle's first sequence (sequence i uses seed+i)")
	flagOps       = flag.Int("memfd.ops", 40, "operations per TestOracle sequence")
)

// hostHugePagesFree reports whether the host has huge pages to give a
// hugetlb memfd; our MFD_HUGETLB files behave as if it had none.
func hostHugePagesFree(t testing.TB) bool {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "HugePages_Free:"); ok {
			return strings.TrimSpace(v) != "0"
		}
	}
	return false
}

func TestOracle(t *testing.T) {
	mf := newTestMemoryFile(t, 2<<30)
	o := oracle{mf: mf, hostHuge: hostHugePagesFree(t)}
	sequences := *flagSequences
	if testing.Short() && !flagSet("memfd.sequences") {
		sequences = 30
	}
	for i := 0; i < sequences; i++ {
		seed := *flagSeed + uint64(i)
		if err := o.run(seed, *flagOps); err != nil {
			t.Fatalf("sequence with seed %d (rerun: -memfd.seed=%d -memfd.sequences=1): %v", seed, seed, err)
		}
	}
	mf.Drain()
	if st := mf.Stats(); st.AllocatedPages != 0 {
		t.Fatalf("%d memory-file pages still allocated after every memfd was released", st.AllocatedPages)
	}
	t.Logf("%d sequences of %d operations from seed %d: no divergence; %d creations failed alike on both; %d SEEK_DATA/SEEK_HOLE answers at the last page a file can have, where the host's offset arithmetic overflows (deliberate difference)",
		sequences, *flagOps, *flagSeed, o.createFailures, o.seekHoleOverflows)
}

func flagSet(name string) bool {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

type oracle struct {
	mf       *pgalloc.MemoryFile
	hostHuge bool

	createFailures    int
	seekHoleOverflows int
}

// sequence is the state of one run.
type sequence struct {
	*oracle
	rng     *rand.Rand
	f       *File
	fd      int
	hugetlb bool
	log     []string
	touched [][2]int64
}

func errnoOf(err error) unix.Errno {
	if err == nil {
		return 0
	}
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return unix.Errno(math.MaxInt32) // Not an errno at all: never matches.
}

func (s *sequence) fail(format string, args ...any) error {
	start := max(0, len(s.log)-60)
	return fmt.Errorf("%s\noperations (last %d):\n  %s", fmt.Sprintf(format, args...), len(s.log)-start, strings.Join(s.log[start:], "\n  "))
}

func (o *oracle) run(seed uint64, ops int) (err error) {
	s := &sequence{oracle: o, rng: rand.New(rand.NewPCG(seed, seed^0x6d656d6664))}
	name, flags := s.pickCreate()
	s.log = append(s.log, fmt.Sprintf("create(name len %d, %#x)", len(name), flags))
	f, ferr := Create(o.mf, name, flags)
	fd, herr := unix.MemfdCreate(name, int(flags))
	if errnoOf(ferr) != errnoOf(herr) {
		if ferr == nil {
			f.DecRef()
		}
		if herr == nil {
			unix.Close(fd)
		}
		return s.fail("create: ours %v, host %v", ferr, herr)
	}
	if ferr != nil {
		o.createFailures++
		return nil
	}
	defer f.DecRef()
	defer unix.Close(fd)
	if f.Name() != "memfd:"+name {
		return s.fail("name %q, want %q", f.Name(), "memfd:"+name)
	}
	s.f, s.fd, s.hugetlb = f, fd, flags&unix.MFD_HUGETLB != 0
	if err := s.compareState(); err != nil {
		return err
	}
	for i := 0; i < ops; i++ {
		if err := s.step(); err != nil {
			return err
		}
		if err := s.compareState(); err != nil {
			return err
		}
	}
	return s.compareContents()
}

func (s *sequence) pickCreate() (string, uint) {
	var name string
	switch s.rng.IntN(10) {
	case 0:
		name = strings.Repeat("n", 245+s.rng.IntN(10))
	case 1:
		name = ""
	default:
		name = fmt.Sprintf("seq%d", s.rng.IntN(1000))
	}
	var flags uint
	switch r := s.rng.IntN(20); {
	case r == 0:
		flags = uint(s.rng.Uint32())
	case r == 1:
		flags = 1 << s.rng.IntN(32)
	default:
		for _, fl := range []uint{unix.MFD_CLOEXEC, unix.MFD_ALLOW_SEALING, unix.MFD_NOEXEC_SEAL, unix.MFD_EXEC} {
			if s.rng.IntN(3) == 0 {
				flags |= fl
			}
		}
		if s.rng.IntN(6) == 0 {
			flags |= unix.MFD_HUGETLB
			flags |= uint([]int{0, 0, 21, 30, 22, 16, 63}[s.rng.IntN(7)]) << unix.MFD_HUGE_SHIFT
		}
	}
	return name, flags
}

// pickOff returns an offset: small, near the end of the file, at a 2 MiB
// boundary, huge, or negative.
func (s *sequence) pickOff() int64 {
	size := s.f.Size()
	switch s.rng.IntN(16) {
	case 0, 1, 2, 3:
		return s.rng.Int64N(6 * pageSize)
	case 4, 5, 6:
		return max(0, size+s.rng.Int64N(3*pageSize)-3*pageSize/2)
	case 7, 8:
		return s.rng.Int64N(4)*(2<<20) + []int64{0, 0, 1, -1, pageSize, -pageSize}[s.rng.IntN(6)]
	case 9:
		return MaxFileSize - s.rng.Int64N(3*pageSize)
	case 10:
		return 1 << (30 + s.rng.IntN(33)) >> 1 * 1
	case 11:
		return s.rng.Int64N(64 << 20)
	case 12:
		return []int64{-1, -pageSize, math.MinInt64, MaxFileSize, 1 << 62}[s.rng.IntN(5)]
	default:
		return s.rng.Int64N(max(size, 1))
	}
}

// pickLen returns a length of an I/O or fallocate.
func (s *sequence) pickLen() int64 {
	switch s.rng.IntN(12) {
	case 0:
		return 0
	case 1, 2, 3:
		return 1 + s.rng.Int64N(100)
	case 4, 5, 6:
		return 1 + s.rng.Int64N(3*pageSize)
	case 7:
		return (1 + s.rng.Int64N(8)) * pageSize
	case 8:
		return 2<<20 + []int64{0, 0, pageSize, -pageSize, 1}[s.rng.IntN(5)]
	case 9:
		return 4<<20 + s.rng.Int64N(3)*pageSize
	default:
		return 1 + s.rng.Int64N(64<<10)
	}
}

func (s *sequence) touch(off, n int64) {
	if off >= 0 && n > 0 && off+n > 0 {
		s.touched = append(s.touched, [2]int64{off, n})
	}
}

func (s *sequence) data(n int64) []byte {
	b := make([]byte, n)
	for i := 0; i < len(b); i += 8 {
		v := s.rng.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func (s *sequence) step() error {
	switch op := s.rng.IntN(20); op {
	case 0, 1: // write
		b := s.data(s.pickLen())
		pos := s.f.Pos()
		var n int
		var err error
		via := "Write"
		if s.rng.IntN(2) == 0 {
			n, err = s.f.Write(b)
		} else {
			via = "WriteFromAt(-1)"
			var n64 int64
			n64, err = s.f.WriteFromAt(bytes.NewReader(b), int64(len(b)), -1)
			n = int(n64)
		}
		hn, herr := unix.Write(s.fd, b)
		s.log = append(s.log, fmt.Sprintf("write(%d) at pos %d via %s = %d, %v", len(b), pos, via, n, err))
		s.touch(pos, int64(len(b)))
		return s.compareRet("write", int64(n), err, int64(hn), herr)
	case 2, 3, 4: // pwrite
		b := s.data(s.pickLen())
		off := s.pickOff()
		var n int
		var err error
		via := "Pwrite"
		if s.rng.IntN(2) == 0 || off == -1 { // -1 means the position to WriteFromAt.
			n, err = s.f.Pwrite(b, off)
		} else {
			via = "WriteFromAt"
			var n64 int64
			n64, err = s.f.WriteFromAt(bytes.NewReader(b), int64(len(b)), off)
			n = int(n64)
		}
		hn, herr := unix.Pwrite(s.fd, b, off)
		s.log = append(s.log, fmt.Sprintf("pwrite(%d, %d) via %s = %d, %v", len(b), off, via, n, err))
		s.touch(off, int64(len(b)))
		return s.compareRet("pwrite", int64(n), err, int64(hn), herr)
	case 5, 6: // read
		n := s.pickLen()
		pos := s.f.Pos()
		b, hb := make([]byte, n), make([]byte, n)
		var got int64
		var err error
		via := "Read"
		if s.rng.IntN(2) == 0 {
			var k int
			k, err = s.f.Read(b)
			got = int64(k)
		} else {
			via = "ReadToAt(-1)"
			var w bytes.Buffer
			got, err = s.f.ReadToAt(&w, n, -1)
			copy(b, w.Bytes())
		}
		hn, herr := unix.Read(s.fd, hb)
		s.log = append(s.log, fmt.Sprintf("read(%d) at pos %d via %s = %d, %v", n, pos, via, got, err))
		if err := s.compareRet("read", got, err, int64(hn), herr); err != nil {
			return err
		}
		if !bytes.Equal(b[:max(got, 0)], hb[:max(got, 0)]) {
			return s.fail("read returned different bytes: %s", firstDiff(b[:got], hb[:got]))
		}
	case 7, 8: // pread
		n := s.pickLen()
		off := s.pickOff()
		b, hb := make([]byte, n), make([]byte, n)
		var got int64
		var err error
		via := "Pread"
		if s.rng.IntN(2) == 0 || off == -1 { // -1 means the position to ReadToAt.
			var k int
			k, err = s.f.Pread(b, off)
			got = int64(k)
		} else {
			via = "ReadToAt"
			var w bytes.Buffer
			got, err = s.f.ReadToAt(&w, n, off)
			copy(b, w.Bytes())
		}
		hn, herr := unix.Pread(s.fd, hb, off)
		s.log = append(s.log, fmt.Sprintf("pread(%d, %d) via %s = %d, %v", n, off, via, got, err))
		if err := s.compareRet("pread", got, err, int64(hn), herr); err != nil {
			return err
		}
		if !bytes.Equal(b[:max(got, 0)], hb[:max(got, 0)]) {
			return s.fail("pread returned different bytes: %s", firstDiff(b[:got], hb[:got]))
		}
	case 9, 10, 11: // lseek
		whence := s.rng.IntN(5)
		if s.rng.IntN(20) == 0 {
			whence = []int{-1, 5, 7}[s.rng.IntN(3)]
		}
		off := s.pickOff()
		if whence == unix.SEEK_CUR || whence == unix.SEEK_END {
			if s.rng.IntN(2) == 0 {
				off = s.rng.Int64N(4*pageSize) - 2*pageSize
			}
		}
		got, err := s.f.Seek(off, whence)
		hgot, herr := unix.Seek(s.fd, off, whence)
		s.log = append(s.log, fmt.Sprintf("lseek(%d, %d) = %d, %v (host %d, %v)", off, whence, got, err, hgot, herr))
		if hostSeekOverflow(whence, got, err, hgot, herr) {
			// Linux's mapping_seek_hole_data overflows at the folio that
			// ends at 2^63: SEEK_HOLE returns a negative offset as if it
			// were a position, SEEK_DATA misses the data there (ENXIO).
			// We return the answer (docs/memfd.md).
			s.seekHoleOverflows++
			if _, err := unix.Seek(s.fd, got, unix.SEEK_SET); err != nil {
				return s.fail("resyncing the host position: %v", err)
			}
			return nil
		}
		return s.compareRet("lseek", got, err, hgot, herr)
	case 12, 13: // ftruncate
		var size int64
		switch s.rng.IntN(4) {
		case 0:
			size = s.f.Size() / int64(1+s.rng.IntN(3))
		case 1:
			size = s.f.Size() + s.rng.Int64N(3*pageSize) - pageSize
		default:
			size = s.pickOff()
		}
		if s.hugetlb && s.rng.IntN(2) == 0 {
			size &^= 2<<20 - 1
		}
		err := s.f.Truncate(size)
		herr := unix.Ftruncate(s.fd, size)
		s.log = append(s.log, fmt.Sprintf("ftruncate(%d) = %v", size, err))
		s.touch(size-pageSize, 2*pageSize)
		return s.compareRet("ftruncate", 0, err, 0, herr)
	case 14, 15, 16: // fallocate
		modes := []uint32{0, 0, unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE,
			unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_PUNCH_HOLE,
			unix.FALLOC_FL_ZERO_RANGE, unix.FALLOC_FL_COLLAPSE_RANGE, unix.FALLOC_FL_INSERT_RANGE | unix.FALLOC_FL_KEEP_SIZE,
			unix.FALLOC_FL_UNSHARE_RANGE, unix.FALLOC_FL_WRITE_ZEROES, unix.FALLOC_FL_NO_HIDE_STALE, 0x100, s.rng.Uint32()}
		mode := modes[s.rng.IntN(len(modes))]
		off, n := s.pickOff(), s.pickLen()
		if s.rng.IntN(8) == 0 {
			n = []int64{-1, MaxFileSize, MaxFileSize - off}[s.rng.IntN(3)]
		}
		punch := mode&unix.FALLOC_FL_PUNCH_HOLE != 0
		if !punch && n > 8<<20 {
			n = 8 << 20 // Allocating: keep the host's memory in check.
		}
		if s.hugetlb && !punch && s.hostHuge {
			mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
		}
		err := s.f.Fallocate(mode, off, n)
		herr := unix.Fallocate(s.fd, mode, off, n)
		s.log = append(s.log, fmt.Sprintf("fallocate(%#x, %d, %d) = %v", mode, off, n, err))
		s.touch(off-pageSize, min(n, 16<<20)+2*pageSize)
		return s.compareRet("fallocate", 0, err, 0, herr)
	case 17, 18: // F_ADD_SEALS
		seals := uint32(0)
		for s.rng.IntN(2) == 0 {
			seals |= 1 << s.rng.IntN(7)
		}
		err := s.f.AddSeals(seals)
		_, herr := unix.FcntlInt(uintptr(s.fd), unix.F_ADD_SEALS, int(seals))
		s.log = append(s.log, fmt.Sprintf("F_ADD_SEALS(%#x) = %v", seals, err))
		return s.compareRet("F_ADD_SEALS", 0, err, 0, herr)
	default: // F_GET_SEALS, checked by compareState
		s.log = append(s.log, "F_GET_SEALS")
	}
	return nil
}

// hostSeekOverflow reports whether the host gave a wrong SEEK_DATA or
// SEEK_HOLE answer because of the overflow in mapping_seek_hole_data at the
// last page a file can have, where ours gave the right one.
func hostSeekOverflow(whence int, got int64, err error, hgot int64, herr error) bool {
	lastPage := int64(maxIndex) << pageShift
	switch whence {
	case unix.SEEK_HOLE:
		return herr == nil && hgot < 0 && err == nil && got >= lastPage
	case unix.SEEK_DATA:
		return herr == unix.ENXIO && err == nil && got >= lastPage
	}
	return false
}

func (s *sequence) compareRet(op string, got int64, err error, hgot int64, herr error) error {
	if errnoOf(err) != errnoOf(herr) || err == nil && got != hgot {
		return s.fail("%s: ours %d, %v; host %d, %v", op, got, err, hgot, herr)
	}
	return nil
}

// compareState compares what fstat, lseek(SEEK_CUR) and F_GET_SEALS show.
func (s *sequence) compareState() error {
	var hst unix.Stat_t
	if err := unix.Fstat(s.fd, &hst); err != nil {
		return s.fail("host fstat: %v", err)
	}
	if err := checkCache(s.f); err != nil {
		return s.fail("page cache: %v", err)
	}
	st := s.f.Stat()
	if st.Size != hst.Size || st.Blocks != hst.Blocks || st.Blksize != int64(hst.Blksize) || st.Mode != hst.Mode || st.Nlink != uint32(hst.Nlink) {
		return s.fail("fstat: ours size %d blocks %d blksize %d mode %#o nlink %d; host size %d blocks %d blksize %d mode %#o nlink %d",
			st.Size, st.Blocks, st.Blksize, st.Mode, st.Nlink, hst.Size, hst.Blocks, hst.Blksize, hst.Mode, hst.Nlink)
	}
	hpos, err := unix.Seek(s.fd, 0, unix.SEEK_CUR)
	if err != nil {
		return s.fail("host lseek(SEEK_CUR): %v", err)
	}
	if pos, err := s.f.Seek(0, unix.SEEK_CUR); err != nil || pos != hpos || s.f.Pos() != hpos {
		return s.fail("position: ours %d (Pos %d), %v; host %d", pos, s.f.Pos(), err, hpos)
	}
	hseals, err := unix.FcntlInt(uintptr(s.fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return s.fail("host F_GET_SEALS: %v", err)
	}
	if seals, err := s.f.GetSeals(); err != nil || seals != uint32(hseals) {
		return s.fail("seals: ours %#x, %v; host %#x", seals, err, hseals)
	}
	return nil
}

// compareContents compares the data/hole map and the bytes of both files:
// all of them if the file is small, else every range an operation touched.
func (s *sequence) compareContents() error {
	size := s.f.Size()
	if !s.hugetlb {
		for x, n := int64(0), 0; x < size && n < 4096; n++ {
			d, err := s.f.Seek(x, unix.SEEK_DATA)
			hd, herr := unix.Seek(s.fd, x, unix.SEEK_DATA)
			if hostSeekOverflow(unix.SEEK_DATA, d, err, hd, herr) {
				break
			}
			if errnoOf(err) != errnoOf(herr) || err == nil && d != hd {
				return s.fail("final SEEK_DATA from %d: ours %d, %v; host %d, %v", x, d, err, hd, herr)
			}
			if err != nil {
				break
			}
			h, err := s.f.Seek(d, unix.SEEK_HOLE)
			hh, herr := unix.Seek(s.fd, d, unix.SEEK_HOLE)
			if hostSeekOverflow(unix.SEEK_HOLE, h, err, hh, herr) {
				break
			}
			if errnoOf(err) != errnoOf(herr) || err == nil && h != hh {
				return s.fail("final SEEK_HOLE from %d: ours %d, %v; host %d, %v", d, h, err, hh, herr)
			}
			x = h
		}
	}
	ranges := s.touched
	if size <= 16<<20 {
		ranges = [][2]int64{{0, size}}
	}
	for _, r := range ranges {
		start, end := max(r[0], 0), size
		if r[0] >= 0 && r[1] < size-r[0] {
			end = r[0] + r[1]
		}
		for off, n := start, int64(0); off < end; off += n {
			n = min(1<<20, end-off)
			b, hb := make([]byte, n), make([]byte, n)
			k, err := s.f.Pread(b, off)
			hk, herr := unix.Pread(s.fd, hb, off)
			if err != nil || herr != nil || int64(k) != n || hk != k {
				return s.fail("final pread(%d, %d): ours %d, %v; host %d, %v", n, off, k, err, hk, herr)
			}
			if !bytes.Equal(b, hb) {
				return s.fail("final contents at %d differ: %s", off, firstDiff(b, hb))
			}
		}
	}
	return nil
}

func firstDiff(a, b []byte) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at byte %d: ours %#x, host %#x", i, a[i], b[i])
		}
	}
	return fmt.Sprintf("lengths %d and %d", len(a), len(b))
}

func newTestMemoryFile(t testing.TB, size uint64) *pgalloc.MemoryFile {
	t.Helper()
	mf, err := pgalloc.New(pgalloc.Options{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mf.Close() })
	return mf
}
