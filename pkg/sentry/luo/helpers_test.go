package luo_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"golang.org/x/sys/unix"
)

// fdTable is a guest's file descriptor table, as the kernel keeps it.
type fdTable struct {
	mu      sync.Mutex
	files   map[int32]luo.File
	cloexec map[int32]bool
}

func newFDTable() *fdTable {
	return &fdTable{files: map[int32]luo.File{}, cloexec: map[int32]bool{}}
}

func (t *fdTable) InstallFD(f luo.File, cloexec bool) (int32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for fd := int32(0); ; fd++ {
		if _, ok := t.files[fd]; !ok {
			f.IncRef()
			t.files[fd] = f
			t.cloexec[fd] = cloexec
			return fd, nil
		}
	}
}

func (t *fdTable) FileFromFD(fd int32) (luo.File, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f, ok := t.files[fd]
	if !ok {
		return nil, unix.EBADF
	}
	f.IncRef()
	return f, nil
}

func (t *fdTable) get(tb testing.TB, fd int32) luo.File {
	tb.Helper()
	t.mu.Lock()
	defer t.mu.Unlock()
	f, ok := t.files[fd]
	if !ok {
		tb.Fatalf("fd %d is not open", fd)
	}
	return f
}

func (t *fdTable) close(tb testing.TB, fd int32) {
	tb.Helper()
	t.mu.Lock()
	f, ok := t.files[fd]
	delete(t.files, fd)
	delete(t.cloexec, fd)
	t.mu.Unlock()
	if !ok {
		tb.Fatalf("closing fd %d, which is not open", fd)
	}
	f.DecRef()
}

// sentry is one sentry's memory file, KHO and LUO with the memfd handler,
// and one guest's fd table.
type sentry struct {
	mf  *pgalloc.MemoryFile
	k   *kho.KHO
	l   *luo.LUO
	fdt *fdTable
}

const testFileSize = 256 << 20

func coldBoot(tb testing.TB) *sentry {
	tb.Helper()
	mf, err := pgalloc.New(pgalloc.Options{Size: testFileSize})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { mf.Close() })
	k, err := kho.New(mf)
	if err != nil {
		tb.Fatal(err)
	}
	s := &sentry{mf: mf, k: k, l: luo.New(k), fdt: newFDTable()}
	if err := s.l.RegisterFileHandler(memfd.NewLUOHandler(mf, k)); err != nil {
		tb.Fatal(err)
	}
	return s
}

// restart hands s over to a new sentry in the same process, as a live
// restart does: LUO serialize, KHO finalize, then a new memory file over
// the same memfd, KHO ingest and LUO deserialize. s must not be used
// afterwards.
func (s *sentry) restart(tb testing.TB) *sentry {
	tb.Helper()
	n, err := s.handover(tb)
	if err != nil {
		tb.Fatalf("handover: %v", err)
	}
	return n
}

func (s *sentry) handover(tb testing.TB) (*sentry, error) {
	tb.Helper()
	return s.handoverAfter(tb, func() {})
}

// handoverAfter is handover with between calls between the old sentry's
// freeze and finalize and the next sentry's ingest.
func (s *sentry) handoverAfter(tb testing.TB, between func()) (*sentry, error) {
	tb.Helper()
	if err := s.l.Serialize(); err != nil {
		return nil, err
	}
	if err := s.k.Finalize(); err != nil {
		tb.Fatalf("kho finalize: %v", err)
	}
	between()
	file, err := s.mf.DupFile()
	if err != nil {
		tb.Fatal(err)
	}
	mf, err := pgalloc.Open(file, pgalloc.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { mf.Close() })
	k, err := kho.Ingest(mf, s.k.RootAddr())
	if err != nil {
		tb.Fatalf("kho ingest: %v", err)
	}
	n := &sentry{mf: mf, k: k, l: luo.New(k), fdt: newFDTable()}
	if err := n.l.RegisterFileHandler(memfd.NewLUOHandler(mf, k)); err != nil {
		tb.Fatal(err)
	}
	if err := n.l.Deserialize(); err != nil {
		return nil, err
	}
	// The handover is accepted: this sentry may scrub what the previous
	// one did not preserve, and free the blocks of the records it read.
	mf.ResumeReleases()
	n.l.ReleaseIncomingRecords()
	return n, nil
}

func (s *sentry) openDevice(tb testing.TB) (*luo.Device, int32) {
	tb.Helper()
	d, err := s.l.OpenDevice()
	if err != nil {
		tb.Fatalf("open /dev/liveupdate: %v", err)
	}
	fd, err := s.fdt.InstallFD(d, true)
	if err != nil {
		tb.Fatal(err)
	}
	d.DecRef()
	return d, fd
}

func nameStruct(size uint32, name []byte) []byte {
	b := make([]byte, abiluo.CreateSessionSize)
	binary.LittleEndian.PutUint32(b, size)
	copy(b[8:], name)
	return b
}

func sessionIoctl(s *sentry, dev *luo.Device, cmd uint32, name string) (int32, error) {
	reply, err := dev.Ioctl(s.fdt, cmd, nameStruct(abiluo.CreateSessionSize, []byte(name)))
	if err != nil {
		return -1, err
	}
	return int32(binary.LittleEndian.Uint32(reply[4:])), nil
}

func (s *sentry) createSession(tb testing.TB, dev *luo.Device, name string) int32 {
	tb.Helper()
	fd, err := sessionIoctl(s, dev, abiluo.IoctlCreateSession, name)
	if err != nil {
		tb.Fatalf("LIVEUPDATE_IOCTL_CREATE_SESSION(%q): %v", name, err)
	}
	return fd
}

func (s *sentry) retrieveSession(tb testing.TB, dev *luo.Device, name string) int32 {
	tb.Helper()
	fd, err := sessionIoctl(s, dev, abiluo.IoctlRetrieveSession, name)
	if err != nil {
		tb.Fatalf("LIVEUPDATE_IOCTL_RETRIEVE_SESSION(%q): %v", name, err)
	}
	return fd
}

func (s *sentry) session(tb testing.TB, fd int32) *luo.Session {
	tb.Helper()
	ss, ok := s.fdt.get(tb, fd).(*luo.Session)
	if !ok {
		tb.Fatalf("fd %d is not a session", fd)
	}
	return ss
}

func fdStruct(fd int32, token uint64) []byte {
	b := make([]byte, abiluo.SessionPreserveFDSize)
	binary.LittleEndian.PutUint32(b, abiluo.SessionPreserveFDSize)
	binary.LittleEndian.PutUint32(b[4:], uint32(fd))
	binary.LittleEndian.PutUint64(b[8:], token)
	return b
}

func (s *sentry) preserveFD(sfd, fd int32, token uint64) error {
	ss, ok := s.fdt.files[sfd].(*luo.Session)
	if !ok {
		return unix.EBADF
	}
	_, err := ss.Ioctl(s.fdt, abiluo.IoctlSessionPreserve, fdStruct(fd, token))
	return err
}

func (s *sentry) retrieveFD(sfd int32, token uint64) (int32, error) {
	ss, ok := s.fdt.files[sfd].(*luo.Session)
	if !ok {
		return -1, unix.EBADF
	}
	reply, err := ss.Ioctl(s.fdt, abiluo.IoctlSessionRetrieve, fdStruct(0, token))
	if err != nil {
		return -1, err
	}
	return int32(binary.LittleEndian.Uint32(reply[4:])), nil
}

func (s *sentry) finish(sfd int32) error {
	ss, ok := s.fdt.files[sfd].(*luo.Session)
	if !ok {
		return unix.EBADF
	}
	b := make([]byte, abiluo.SessionFinishSize)
	binary.LittleEndian.PutUint32(b, abiluo.SessionFinishSize)
	_, err := ss.Ioctl(s.fdt, abiluo.IoctlSessionFinish, b)
	return err
}

// memfdWith creates a memfd holding data, as the selftests'
// create_and_preserve_memfd does before PRESERVE_FD.
func (s *sentry) memfdWith(tb testing.TB, data []byte) int32 {
	tb.Helper()
	f, err := memfd.Create(s.mf, "luo-test", 0)
	if err != nil {
		tb.Fatal(err)
	}
	if len(data) > 0 {
		if _, err := f.Pwrite(data, 0); err != nil {
			tb.Fatal(err)
		}
	}
	fd, err := s.fdt.InstallFD(f, false)
	if err != nil {
		tb.Fatal(err)
	}
	f.DecRef()
	return fd
}

func (s *sentry) memfd(tb testing.TB, fd int32) *memfd.File {
	tb.Helper()
	f, ok := s.fdt.get(tb, fd).(*memfd.File)
	if !ok {
		tb.Fatalf("fd %d is not a memfd", fd)
	}
	return f
}

// contents reads the whole memfd behind fd.
func (s *sentry) contents(tb testing.TB, fd int32) []byte {
	tb.Helper()
	f := s.memfd(tb, fd)
	b := make([]byte, f.Size())
	if n, err := f.Pread(b, 0); err != nil || n != len(b) {
		tb.Fatalf("pread of %d bytes = %d, %v", len(b), n, err)
	}
	return b
}

func (s *sentry) verify(tb testing.TB, sfd int32, token uint64, want []byte) int32 {
	tb.Helper()
	fd, err := s.retrieveFD(sfd, token)
	if err != nil {
		tb.Fatalf("LIVEUPDATE_SESSION_RETRIEVE_FD(%#x): %v", token, err)
	}
	if got := s.contents(tb, fd); !bytes.Equal(got, want) {
		tb.Fatalf("memfd %#x after the restart holds %d bytes %.32q, want %d bytes %.32q", token, len(got), got, len(want), want)
	}
	return fd
}

func wantErrno(tb testing.TB, what string, err error, want unix.Errno) {
	tb.Helper()
	if !errors.Is(err, want) {
		tb.Fatalf("%s = %v, want %v", what, err, want)
	}
}

func randomFill(b []byte, seed uint64) {
	c := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	_, _ = c.Read(b)
}

func ingest(tb testing.TB, mf *pgalloc.MemoryFile, root uint64) *kho.KHO {
	tb.Helper()
	k, err := kho.Ingest(mf, root)
	if err != nil {
		tb.Fatalf("kho ingest: %v", err)
	}
	return k
}
