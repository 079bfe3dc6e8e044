package luo_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	abimemfd "github.com/livesentry/livesentry/pkg/abi/memfd"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"golang.org/x/sys/unix"
)

// build is the memfd handlers a sentry build registers.
type build func(mf *pgalloc.MemoryFile, k *kho.KHO) []*luo.FileHandler

var (
	// v1Build speaks only memfd-v1, like Linux v6.19.
	v1Build build = func(mf *pgalloc.MemoryFile, k *kho.KHO) []*luo.FileHandler {
		return []*luo.FileHandler{memfd.NewLUOHandler(mf, k)}
	}
	// v2Build speaks memfd-v2 and memfd-v1, preferring memfd-v2.
	v2Build build = memfd.NewLUOHandlers
)

func coldBootBuild(tb testing.TB, b build) *sentry {
	tb.Helper()
	s := coldBoot(tb)
	s.l = luo.New(s.k)
	for _, h := range b(s.mf, s.k) {
		if err := s.l.RegisterFileHandler(h); err != nil {
			tb.Fatal(err)
		}
	}
	return s
}

// reads returns every compatible string l reads, as the next sentry would
// announce them.
func reads(l *luo.LUO) []string {
	var cs []string
	for _, f := range l.Formats() {
		cs = append(cs, f.Reads...)
	}
	return cs
}

// nextSentry is the first half of a restart: s serializes for a next
// sentry of build b (with opts if withOpts), KHO finalizes and the next
// sentry ingests KHO and registers its handlers, but does not deserialize
// yet, so that the test can look at the records first.
func (s *sentry) nextSentry(tb testing.TB, b build, withOpts bool) (*sentry, error) {
	tb.Helper()
	file, err := s.mf.DupFile()
	if err != nil {
		tb.Fatal(err)
	}
	mf, err := pgalloc.Open(file, pgalloc.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { mf.Close() })
	n := &sentry{mf: mf, fdt: newFDTable()}
	// The next sentry's formats are known before the handover: register
	// its handlers on a LUO over a throwaway KHO to read them.
	probe := luo.New(nil)
	for _, h := range b(mf, nil) {
		if err := probe.RegisterFileHandler(h); err != nil {
			tb.Fatal(err)
		}
	}
	opts := luo.SerializeOptions{}
	if withOpts {
		opts.PeerReads = reads(probe)
	}
	if err := s.l.SerializeWith(opts); err != nil {
		return nil, err
	}
	if err := s.k.Finalize(); err != nil {
		tb.Fatal(err)
	}
	n.k = ingest(tb, mf, s.k.RootAddr())
	n.l = luo.New(n.k)
	for _, h := range b(mf, n.k) {
		if err := n.l.RegisterFileHandler(h); err != nil {
			tb.Fatal(err)
		}
	}
	return n, nil
}

func (n *sentry) deserialize(tb testing.TB) {
	tb.Helper()
	if err := n.l.Deserialize(); err != nil {
		tb.Fatalf("Deserialize: %v", err)
	}
	n.mf.ResumeReleases()
}

// fileRecord is one luo_file_ser as the previous sentry wrote it, with the
// 48 bytes at its data address (the memfd_luo_ser block).
type fileRecord struct {
	session string
	ser     abiluo.FileSer
	memfd   []byte
}

// peek reads the LUO records of the incoming handover straight from the
// memory file, restoring nothing.
func (n *sentry) peek(tb testing.TB) []fileRecord {
	tb.Helper()
	page := func(addr uint64) []byte {
		b, err := n.mf.Slice(addr>>pgalloc.PageShift, 1)
		if err != nil {
			tb.Fatal(err)
		}
		return b[addr&(pgalloc.PageSize-1):]
	}
	addr, err := n.k.RetrieveSubtree(abiluo.FDTName)
	if err != nil {
		tb.Fatal(err)
	}
	root, err := fdt.Parse(page(addr), pgalloc.PageSize)
	if err != nil {
		tb.Fatal(err)
	}
	sn := root.Child(abiluo.FDTSessionNode)
	if c, _ := sn.String("compatible"); c != "luo-session-v2" {
		tb.Fatalf("session node compatible %q, want luo-session-v2", c)
	}
	hdrAddr, err := sn.U64(abiluo.FDTSessionHeader)
	if err != nil {
		tb.Fatal(err)
	}
	hdr := page(hdrAddr)
	var recs []fileRecord
	for i := uint64(0); i < binary.LittleEndian.Uint64(hdr); i++ {
		var ss abiluo.SessionSer
		if err := ss.Decode(hdr[abiluo.SessionHeaderSerSize+i*abiluo.SessionSerSize:]); err != nil {
			tb.Fatal(err)
		}
		for j := uint64(0); j < ss.Count; j++ {
			var fs abiluo.FileSer
			if err := fs.Decode(page(ss.Files)[j*abiluo.FileSerSize:]); err != nil {
				tb.Fatal(err)
			}
			recs = append(recs, fileRecord{session: abiluo.CString(ss.Name[:]), ser: fs, memfd: page(fs.Data)[:abimemfd.SerV2Size]})
		}
	}
	return recs
}

// checkRecord verifies every byte of a memfd_luo_ser block: the format its
// luo_file_ser names, the fields, and zeros past a memfd-v1 record.
func checkRecord(tb testing.TB, r fileRecord, compat string, pos, size, seals uint64) {
	tb.Helper()
	if got := abiluo.CString(r.ser.Compatible[:]); got != compat {
		tb.Fatalf("file %#x of %q written as %q, want %q", r.ser.Token, r.session, got, compat)
	}
	var v abikho.Vmalloc
	var nr uint64
	switch compat {
	case abimemfd.Compatible:
		var s abimemfd.Ser
		if err := s.Decode(r.memfd); err != nil {
			tb.Fatal(err)
		}
		if s.Pos != pos || s.Size != size {
			tb.Fatalf("memfd-v1 record of %#x: %+v, want pos %d size %d", r.ser.Token, s, pos, size)
		}
		if !bytes.Equal(r.memfd[abimemfd.SerSize:], make([]byte, 8)) {
			tb.Fatalf("memfd-v1 record of %#x has a stale tail % x", r.ser.Token, r.memfd[abimemfd.SerSize:])
		}
		v, nr = s.Folios, s.NrFolios
	case abimemfd.CompatibleV2:
		var s abimemfd.SerV2
		if err := s.Decode(r.memfd); err != nil {
			tb.Fatal(err)
		}
		if s.Pos != pos || s.Size != size || uint64(s.Seals) != seals || s.Flags != 0 {
			tb.Fatalf("memfd-v2 record of %#x: %+v, want pos %d size %d seals %#x flags 0", r.ser.Token, s, pos, size, seals)
		}
		v, nr = s.Folios, s.NrFolios
	}
	pages := (size + pgalloc.PageSize - 1) / pgalloc.PageSize
	if size == 0 {
		if nr != 0 || v != (abikho.Vmalloc{}) {
			tb.Fatalf("empty memfd %#x has folios: nr %d, %+v", r.ser.Token, nr, v)
		}
		return
	}
	if nr == 0 || nr > pages || v.First == 0 || uint64(v.TotalPages) != (nr*abimemfd.FolioSerSize+pgalloc.PageSize-1)/pgalloc.PageSize {
		tb.Fatalf("memfd %#x of %d pages: nr_folios %d, folio array %+v", r.ser.Token, pages, nr, v)
	}
}

// restartFile is one memfd a test preserves and checks after the restart.
type restartFile struct {
	token     uint64
	data      []byte
	pos       int64
	flags     uint
	seals     uint32 // added before preserve
	wantSeals uint32 // after retrieve
}

func (s *sentry) preserveFiles(tb testing.TB, sfd int32, files []restartFile) {
	tb.Helper()
	for _, rf := range files {
		f, err := memfd.Create(s.mf, "fmt", rf.flags)
		if err != nil {
			tb.Fatal(err)
		}
		if _, err := f.Pwrite(rf.data, 0); err != nil && len(rf.data) > 0 {
			tb.Fatal(err)
		}
		if _, err := f.Seek(rf.pos, 0); err != nil {
			tb.Fatal(err)
		}
		if rf.seals != 0 {
			if err := f.AddSeals(rf.seals); err != nil {
				tb.Fatal(err)
			}
		}
		fd, err := s.fdt.InstallFD(f, false)
		if err != nil {
			tb.Fatal(err)
		}
		f.DecRef()
		if err := s.preserveFD(sfd, fd, rf.token); err != nil {
			tb.Fatalf("PRESERVE_FD(%#x): %v", rf.token, err)
		}
	}
}

func (n *sentry) checkFiles(tb testing.TB, sfd int32, files []restartFile) {
	tb.Helper()
	for _, rf := range files {
		fd := n.verify(tb, sfd, rf.token, rf.data)
		f := n.memfd(tb, fd)
		seals, _ := f.GetSeals()
		if seals != rf.wantSeals || f.Pos() != rf.pos {
			tb.Fatalf("memfd %#x after the restart: seals %#x, pos %d; want %#x, %d", rf.token, seals, f.Pos(), rf.wantSeals, rf.pos)
		}
	}
}

func TestFormatsListWhatThisBuildReadsAndWrites(t *testing.T) {
	for _, tc := range []struct {
		name  string
		build build
		memfd []string
	}{
		{"a memfd-v1 build reads and writes memfd-v1", v1Build, []string{"memfd-v1"}},
		{"a memfd-v2 build reads and writes both, memfd-v2 first", v2Build, []string{"memfd-v2", "memfd-v1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := coldBootBuild(t, tc.build)
			want := []luo.Format{
				{Subsystem: "luo", Reads: []string{"luo-v1"}, Writes: []string{"luo-v1"}},
				{Subsystem: "luo-session", Reads: []string{"luo-session-v2"}, Writes: []string{"luo-session-v2"}},
				{Subsystem: "memfd", Reads: tc.memfd, Writes: tc.memfd},
			}
			if got := s.l.Formats(); !reflect.DeepEqual(got, want) {
				t.Fatalf("Formats = %+v, want %+v", got, want)
			}
		})
	}
}

// Restarts between builds of different memfd formats, in both directions,
// checking every byte of the records and of the files.
func TestRestartsAcrossMemfdFormats(t *testing.T) {
	big := make([]byte, 1<<20+123)
	randomFill(big, 7)
	const sealed = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
	for _, tc := range []struct {
		name     string
		old, new build
		// negotiate passes the next sentry's reads to SerializeWith.
		negotiate bool
		compat    string
		files     []restartFile
	}{
		{
			name: "a memfd-v1 sentry hands over to a memfd-v2 one, which reads memfd-v1",
			old:  v1Build, new: v2Build, compat: "memfd-v1",
			files: []restartFile{
				{token: 1, data: big, pos: 4096, wantSeals: unix.F_SEAL_SEAL},
				{token: 2, data: nil, wantSeals: unix.F_SEAL_SEAL},
				// memfd-v1 drops seals, as Linux v6.19 does.
				{token: 3, data: []byte("sealed"), flags: unix.MFD_ALLOW_SEALING, seals: sealed, wantSeals: unix.F_SEAL_SEAL},
			},
		},
		{
			name: "a memfd-v2 sentry writes memfd-v1 for a memfd-v1 one",
			old:  v2Build, new: v1Build, negotiate: true, compat: "memfd-v1",
			files: []restartFile{
				{token: 1, data: big, pos: 77, wantSeals: unix.F_SEAL_SEAL},
				{token: 2, data: nil, wantSeals: unix.F_SEAL_SEAL},
				// Sealable but unsealed: it comes back unsealable, as
				// every memfd-v1 file does.
				{token: 3, data: []byte("sealable"), flags: unix.MFD_ALLOW_SEALING, wantSeals: unix.F_SEAL_SEAL},
			},
		},
		{
			name: "a memfd-v2 sentry hands seals over to a memfd-v2 one",
			old:  v2Build, new: v2Build, negotiate: true, compat: "memfd-v2",
			files: []restartFile{
				{token: 1, data: big, pos: 1 << 20, wantSeals: unix.F_SEAL_SEAL},
				{token: 2, data: nil, flags: unix.MFD_ALLOW_SEALING, wantSeals: 0},
				{token: 3, data: []byte("sealed"), flags: unix.MFD_ALLOW_SEALING, seals: sealed, wantSeals: sealed},
				{token: 4, data: []byte("write-sealed"), flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_FUTURE_WRITE, wantSeals: unix.F_SEAL_FUTURE_WRITE},
			},
		},
		{
			name: "without options a memfd-v2 sentry writes memfd-v2",
			old:  v2Build, new: v2Build, compat: "memfd-v2",
			files: []restartFile{
				{token: 9, data: []byte("default"), flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_GROW, wantSeals: unix.F_SEAL_GROW},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := coldBootBuild(t, tc.old)
			dev, _ := s.openDevice(t)
			sfd := s.createSession(t, dev, "formats")
			s.preserveFiles(t, sfd, tc.files)
			n, err := s.nextSentry(t, tc.new, tc.negotiate)
			if err != nil {
				t.Fatal(err)
			}
			recs := n.peek(t)
			if len(recs) != len(tc.files) {
				t.Fatalf("%d file records, want %d", len(recs), len(tc.files))
			}
			for i, rf := range tc.files {
				if recs[i].ser.Token != rf.token {
					t.Fatalf("record %d has token %#x, want %#x", i, recs[i].ser.Token, rf.token)
				}
				seals := uint64(0)
				if tc.compat == "memfd-v2" {
					seals = uint64(rf.wantSeals)
				}
				checkRecord(t, recs[i], tc.compat, uint64(rf.pos), uint64(len(rf.data)), seals)
			}
			n.deserialize(t)
			dev2, _ := n.openDevice(t)
			r := n.retrieveSession(t, dev2, "formats")
			n.checkFiles(t, r, tc.files)
			if err := n.finish(r); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Seals survive as seals: the retrieved memfd-v2 file enforces them.
func TestRetrievedSealsAreEnforced(t *testing.T) {
	s := coldBootBuild(t, v2Build)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "seals")
	s.preserveFiles(t, sfd, []restartFile{{token: 1, data: []byte("grow-sealed"), flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_GROW | unix.F_SEAL_WRITE}})
	n, err := s.nextSentry(t, v2Build, true)
	if err != nil {
		t.Fatal(err)
	}
	n.deserialize(t)
	dev2, _ := n.openDevice(t)
	f := n.memfd(t, n.verify(t, n.retrieveSession(t, dev2, "seals"), 1, []byte("grow-sealed")))
	wantErrno(t, "ftruncate past a F_SEAL_GROW end", f.Truncate(1<<20), unix.EPERM)
	_, err = f.Pwrite([]byte("x"), 0)
	wantErrno(t, "pwrite into a F_SEAL_WRITE file", err, unix.EPERM)
	if err := f.AddSeals(unix.F_SEAL_SHRINK); err != nil {
		t.Fatalf("F_ADD_SEALS on a retrieved file without F_SEAL_SEAL: %v", err)
	}
}

// A file preserved as memfd-v2 with seals cannot be written as memfd-v1:
// the serialization fails with EOPNOTSUPP, the files frozen before it are
// unfrozen and their records converted back, and a later restart to a
// memfd-v2 sentry carries everything.
func TestSealsMemfdV1CannotCarryFailTheSerialize(t *testing.T) {
	s := coldBootBuild(t, v2Build)
	dev, _ := s.openDevice(t)
	first := s.createSession(t, dev, "first")
	plain := []restartFile{{token: 1, data: []byte("frozen, converted, then rolled back"), pos: 3, wantSeals: unix.F_SEAL_SEAL}}
	s.preserveFiles(t, first, plain)
	second := s.createSession(t, dev, "second")
	sealed := []restartFile{{token: 2, data: []byte("sealed"), flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE, wantSeals: unix.F_SEAL_WRITE}}
	s.preserveFiles(t, second, sealed)

	_, err := s.nextSentry(t, v1Build, true)
	if !errors.Is(err, unix.EOPNOTSUPP) || !strings.Contains(err.Error(), "0x2") || !strings.Contains(err.Error(), "memfd-v1") {
		t.Fatalf("serializing a F_SEAL_WRITE memfd for a memfd-v1 sentry = %v; want EOPNOTSUPP naming the file and memfd-v1", err)
	}
	if st := s.l.Status(); st.Serialized {
		t.Fatal("LUO is serialized after a failed serialization")
	}
	for _, ss := range s.l.Status().Sessions {
		for _, f := range ss.Files {
			if f.State != "preserved" {
				t.Fatalf("file %#x is %q after the rollback", f.Token, f.State)
			}
		}
	}
	n, err := s.nextSentry(t, v2Build, true)
	if err != nil {
		t.Fatal(err)
	}
	recs := n.peek(t)
	checkRecord(t, recs[0], "memfd-v2", 3, uint64(len(plain[0].data)), unix.F_SEAL_SEAL)
	checkRecord(t, recs[1], "memfd-v2", 0, uint64(len(sealed[0].data)), unix.F_SEAL_WRITE)
	n.deserialize(t)
	dev2, _ := n.openDevice(t)
	n.checkFiles(t, n.retrieveSession(t, dev2, "first"), plain)
	n.checkFiles(t, n.retrieveSession(t, dev2, "second"), sealed)
}

// A next sentry that reads none of the formats a subsystem writes is
// refused before anything is frozen, naming the subsystem and both lists;
// the outgoing sentry goes on.
func TestNoCommonFormatIsRefusedNamingTheSubsystem(t *testing.T) {
	for _, tc := range []struct {
		name      string
		peer      []string
		subsystem string
	}{
		{"a peer without luo-session-v2", []string{"luo-v1", "luo-session-v1", "memfd-v2"}, `luo-session: this sentry writes ["luo-session-v2"]`},
		{"a peer without luo-v1", []string{"luo-v5", "luo-session-v2", "memfd-v2"}, `luo: this sentry writes ["luo-v1"]`},
		{"a peer without any memfd format", []string{"luo-v1", "luo-session-v2", "memfd-v9"}, `(memfd): this sentry writes ["memfd-v2" "memfd-v1"], the next one reads ["luo-v1" "luo-session-v2" "memfd-v9"]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := coldBootBuild(t, v2Build)
			dev, _ := s.openDevice(t)
			sfd := s.createSession(t, dev, "s")
			s.preserveFiles(t, sfd, []restartFile{{token: 0x42, data: []byte("x")}})
			err := s.l.SerializeWith(luo.SerializeOptions{PeerReads: tc.peer})
			if !errors.Is(err, luo.ErrNoCommonFormat) || !strings.Contains(err.Error(), tc.subsystem) {
				t.Fatalf("SerializeWith = %v; want ErrNoCommonFormat with %q", err, tc.subsystem)
			}
			// Not frozen: another file can be preserved.
			s.preserveFiles(t, sfd, []restartFile{{token: 0x43, data: []byte("y")}})
		})
	}
}

// A "luo-session-v1" session node is refused with an error that says why:
// the string names several layouts.
func TestALUOSessionV1HandoverIsRefused(t *testing.T) {
	s := coldBoot(t)
	root := &fdt.Node{}
	root.SetString("compatible", abiluo.FDTCompatible)
	root.SetU64(abiluo.FDTLiveupdateNum, 1)
	sn := root.AddChild(abiluo.FDTSessionNode)
	sn.SetString("compatible", "luo-session-v1")
	hdr, err := s.k.AllocPreserve(16)
	if err != nil {
		t.Fatal(err)
	}
	sn.SetU64(abiluo.FDTSessionHeader, hdr.Addr())
	blob, err := fdt.Build(root)
	if err != nil {
		t.Fatal(err)
	}
	fo, err := s.k.AllocPreserve(uint64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	copy(s.mf.Bytes(fo), blob)
	if err := s.k.AddSubtree(abiluo.FDTName, fo.Addr()); err != nil {
		t.Fatal(err)
	}
	if err := s.k.Finalize(); err != nil {
		t.Fatal(err)
	}
	file, err := s.mf.DupFile()
	if err != nil {
		t.Fatal(err)
	}
	mf, err := pgalloc.Open(file, pgalloc.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mf.Close()
	l := luo.New(ingest(t, mf, s.k.RootAddr()))
	err = l.Deserialize()
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), `"luo-session-v1"`) || !strings.Contains(err.Error(), "0153094d03df") || !strings.Contains(err.Error(), `reads only "luo-session-v2"`) {
		t.Fatalf("Deserialize of a luo-session-v1 node = %v", err)
	}
}

// Preserving a file of more than UINT_MAX pages is EFBIG (memfd_pin_folios
// counts in an unsigned int) in both formats, and leaves the file
// unfrozen; UINT_MAX pages exactly pass that check.
func TestPreservingMoreThanUintMaxPagesIsEFBIG(t *testing.T) {
	const uintMax = 1<<32 - 1
	for _, b := range []build{v2Build, v1Build} {
		s := coldBootBuild(t, b)
		compat := s.l.Formats()[2].Writes[0]
		dev, _ := s.openDevice(t)
		sfd := s.createSession(t, dev, "big")
		for _, tc := range []struct {
			name string
			size int64
			want unix.Errno
		}{
			{"UINT_MAX pages and one byte is EFBIG", uintMax*pgalloc.PageSize + 1, unix.EFBIG},
			{"UINT_MAX pages pass the check and fail on memory", uintMax * pgalloc.PageSize, unix.ENOMEM},
		} {
			t.Run(compat+": "+tc.name, func(t *testing.T) {
				fd := s.memfdWith(t, nil)
				f := s.memfd(t, fd)
				if err := f.Truncate(tc.size); err != nil {
					t.Fatal(err)
				}
				wantErrno(t, "PRESERVE_FD", s.preserveFD(sfd, fd, uint64(tc.size)), tc.want)
				if f.Frozen() {
					t.Fatal("the file stays frozen after a failed preserve")
				}
			})
		}
	}
}

// The retrieve side of memfd-v2 checks the record: a seal outside
// MEMFD_LUO_ALL_SEALS is EOPNOTSUPP, a non-zero flags word is EINVAL.
func TestAMemfdV2RecordWithUnknownSealsOrFlagsIsRefused(t *testing.T) {
	s := coldBootBuild(t, v2Build)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "bad")
	s.preserveFiles(t, sfd, []restartFile{{token: 1, data: []byte("a")}, {token: 2, data: []byte("b")}, {token: 3, data: []byte("c"), wantSeals: unix.F_SEAL_SEAL}})
	n, err := s.nextSentry(t, v2Build, true)
	if err != nil {
		t.Fatal(err)
	}
	recs := n.peek(t)
	binary.LittleEndian.PutUint32(recs[0].memfd[16:], unix.F_SEAL_SEAL|0x40)
	binary.LittleEndian.PutUint32(recs[1].memfd[20:], 1)
	n.deserialize(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "bad")
	_, err = n.retrieveFD(r, 1)
	wantErrno(t, "RETRIEVE_FD of a record with seal 0x40", err, unix.EOPNOTSUPP)
	_, err = n.retrieveFD(r, 2)
	wantErrno(t, "RETRIEVE_FD of a record with flags 1", err, unix.EINVAL)
	n.checkFiles(t, r, []restartFile{{token: 3, data: []byte("c"), wantSeals: unix.F_SEAL_SEAL}})
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
}

// Without the next sentry's formats, a memfd-v2 sentry writes memfd-v2,
// and a memfd-v1 sentry refuses the handover naming what it lacks; the
// outgoing sentry rolls back and can then write memfd-v1 for it.
func TestAMemfdV1SentryRefusesMemfdV2UnlessAskedFor(t *testing.T) {
	s := coldBootBuild(t, v2Build)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "down")
	files := []restartFile{{token: 5, data: []byte("downgrade"), pos: 2, wantSeals: unix.F_SEAL_SEAL}}
	s.preserveFiles(t, sfd, files)
	n, err := s.nextSentry(t, v1Build, false)
	if err != nil {
		t.Fatal(err)
	}
	err = n.l.Deserialize()
	if !errors.Is(err, unix.ENOENT) || !strings.Contains(err.Error(), `"memfd-v2"`) || !strings.Contains(err.Error(), `["memfd-v1"]`) {
		t.Fatalf("Deserialize of memfd-v2 by a memfd-v1 sentry = %v", err)
	}
	s.l.Abort()
	if err := s.k.Abort(); err != nil {
		t.Fatal(err)
	}
	n, err = s.nextSentry(t, v1Build, true)
	if err != nil {
		t.Fatal(err)
	}
	checkRecord(t, n.peek(t)[0], "memfd-v1", 2, uint64(len(files[0].data)), 0)
	n.deserialize(t)
	dev2, _ := n.openDevice(t)
	n.checkFiles(t, n.retrieveSession(t, dev2, "down"), files)
}

// PRESERVE_FD racing a serialization either lands before its session is
// frozen, and is in the records, or fails with EBUSY: no file is added to
// a session after it was frozen.
func TestPreservesRacingASerializationAreAllInTheRecordsOrEBUSY(t *testing.T) {
	s := coldBootBuild(t, v2Build)
	dev, _ := s.openDevice(t)
	const sessions, perSession = 4, 40
	sfds := make([]int32, sessions)
	fds := make([][]int32, sessions)
	for i := range sfds {
		sfds[i] = s.createSession(t, dev, fmt.Sprintf("race-%d", i))
		for j := 0; j < perSession; j++ {
			fds[i] = append(fds[i], s.memfdWith(t, []byte{byte(i), byte(j)}))
		}
	}
	ok := make([][]uint64, sessions)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range sfds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ss := s.session(t, sfds[i])
			for j, fd := range fds[i] {
				token := uint64(i<<8 | j)
				_, err := ss.Ioctl(s.fdt, abiluo.IoctlSessionPreserve, fdStruct(fd, token))
				switch {
				case err == nil:
					ok[i] = append(ok[i], token)
				case errors.Is(err, unix.EBUSY):
				default:
					t.Errorf("PRESERVE_FD(%#x) = %v", token, err)
				}
			}
		}()
	}
	close(start)
	n, err := s.nextSentry(t, v2Build, true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	for _, ss := range s.l.Status().Sessions {
		for _, f := range ss.Files {
			if f.State != "frozen" {
				t.Fatalf("file %#x of %q is %q after the serialization, want frozen", f.Token, ss.Name, f.State)
			}
		}
	}
	got := make([][]uint64, sessions)
	for _, r := range n.peek(t) {
		var i int
		fmt.Sscanf(r.session, "race-%d", &i)
		got[i] = append(got[i], r.ser.Token)
	}
	for i := range ok {
		if !reflect.DeepEqual(got[i], ok[i]) && (len(got[i]) != 0 || len(ok[i]) != 0) {
			t.Fatalf("session %d: records hold tokens %#x, the successful preserves were %#x", i, got[i], ok[i])
		}
	}
}
