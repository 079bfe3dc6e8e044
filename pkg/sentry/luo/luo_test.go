package luo_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	abimemfd "github.com/livesentry/livesentry/pkg/abi/memfd"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"golang.org/x/sys/unix"
)

// wrapped returns the memfd handler of s with its ops wrapped by fn, under
// the given compatible string.
func wrapped(s *sentry, compatible string, fn func(ops *luo.FileOps)) *luo.FileHandler {
	h := memfd.NewLUOHandler(s.mf, s.k)
	ops := *h.Ops
	fn(&ops)
	return &luo.FileHandler{Compatible: compatible, Ops: &ops}
}

// bootWith is coldBoot with handler h instead of the memfd handler.
func bootWith(t *testing.T, h func(s *sentry) *luo.FileHandler) *sentry {
	t.Helper()
	s := coldBoot(t)
	s.l = luo.New(s.k)
	if err := s.l.RegisterFileHandler(h(s)); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestFreezeFailureRollsBackAndARetrySucceeds(t *testing.T) {
	var freezes int
	var unfrozen []uint64
	tokenOf := map[luo.File]uint64{}
	s := bootWith(t, func(s *sentry) *luo.FileHandler {
		return wrapped(s, "memfd-v1", func(ops *luo.FileOps) {
			freeze := ops.Freeze
			ops.Freeze = func(a *luo.FileOpArgs) error {
				freezes++
				if freezes == 3 {
					return unix.EIO
				}
				return freeze(a)
			}
			ops.Unfreeze = func(a *luo.FileOpArgs) { unfrozen = append(unfrozen, tokenOf[a.File]) }
		})
	})
	dev, _ := s.openDevice(t)
	s1 := s.createSession(t, dev, "first")
	s2 := s.createSession(t, dev, "second")
	data := map[uint64][]byte{}
	for i, sfd := range []int32{s1, s1, s2, s2, s2} {
		token := uint64(i + 1)
		data[token] = []byte(strings.Repeat(string(rune('a'+i)), 5000))
		fd := s.memfdWith(t, data[token])
		tokenOf[s.fdt.get(t, fd)] = token
		if err := s.preserveFD(sfd, fd, token); err != nil {
			t.Fatal(err)
		}
	}
	err := s.l.Serialize()
	if !errors.Is(err, unix.EIO) || !strings.Contains(err.Error(), "0x3") {
		t.Fatalf("Serialize with the 3rd freeze failing = %v, want EIO naming token 0x3", err)
	}
	if want := []uint64{2, 1}; len(unfrozen) != 2 || unfrozen[0] != want[0] || unfrozen[1] != want[1] {
		t.Fatalf("unfrozen after the failure: %v, want %v (the frozen ones, last first)", unfrozen, want)
	}
	for _, ss := range s.l.Status().Sessions {
		for _, f := range ss.Files {
			if f.State != "preserved" {
				t.Fatalf("file %#x is %q after the rollback", f.Token, f.State)
			}
		}
	}
	if st := s.l.Status(); st.Serialized {
		t.Fatal("LUO reports serialized after a failed Serialize")
	}
	// The retry freezes everything (the injected failure was one-shot).
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r1 := n.retrieveSession(t, dev2, "first")
	r2 := n.retrieveSession(t, dev2, "second")
	for token, sfd := range map[uint64]int32{1: r1, 2: r1, 3: r2, 4: r2, 5: r2} {
		n.verify(t, sfd, token, data[token])
	}
}

// bootRecordingSer boots a sentry whose memfd handler records, in *ser,
// the address of the memfd_luo_ser block of the last file it preserved,
// so that a test can corrupt the record the next sentry will read.
func bootRecordingSer(t *testing.T) (*sentry, *uint64) {
	ser := new(uint64)
	s := bootWith(t, func(s *sentry) *luo.FileHandler {
		return wrapped(s, "memfd-v1", func(ops *luo.FileOps) {
			preserve := ops.Preserve
			ops.Preserve = func(a *luo.FileOpArgs) error {
				err := preserve(a)
				*ser = a.SerializedData
				return err
			}
		})
	})
	return s, ser
}

// allocatedAfterDrain returns the pages allocated once every free has been
// released.
func allocatedAfterDrain(s *sentry) uint64 {
	s.mf.Drain()
	return s.mf.Stats().AllocatedPages
}

func TestFinishingNeverRetrievedFilesFreesTheirFolios(t *testing.T) {
	base := allocatedAfterDrain(coldBoot(t))
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "unretrieved")
	for i := uint64(0); i < 3; i++ {
		fd := s.memfdWith(t, make([]byte, 1<<20))
		if err := s.preserveFD(sfd, fd, i); err != nil {
			t.Fatal(err)
		}
		s.fdt.close(t, fd)
	}
	n := s.restart(t)
	if got := allocatedAfterDrain(n); got < base+3*256 {
		t.Fatalf("after the restart only %d pages are allocated; the 3 MiB of preserved memfds are not held", got)
	}
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "unretrieved")
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
	if got := allocatedAfterDrain(n); got != base {
		t.Fatalf("after finishing, %d pages are allocated, want the cold-boot baseline %d", got, base)
	}
}

func TestRetrievingTwiceReturnsTheSameFile(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "twice")
	if err := s.preserveFD(sfd, s.memfdWith(t, []byte("x")), 5); err != nil {
		t.Fatal(err)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "twice")
	a := n.verify(t, r, 5, []byte("x"))
	b := n.verify(t, r, 5, []byte("x"))
	if a == b || n.fdt.get(t, a) != n.fdt.get(t, b) {
		t.Fatalf("two retrieves gave fds %d and %d of files %p and %p; want two fds of one file", a, b, n.fdt.get(t, a), n.fdt.get(t, b))
	}
	if !n.fdt.cloexec[a] || !n.fdt.cloexec[b] {
		t.Fatal("retrieved fds are not O_CLOEXEC")
	}
	if _, err := n.retrieveFD(r, 6); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("RETRIEVE_FD of an unknown token = %v, want ENOENT", err)
	}
}

func TestAFailedRetrieveIsStickyAndNothingIsFreedTwice(t *testing.T) {
	base := allocatedAfterDrain(coldBoot(t))
	s, ser := bootRecordingSer(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "corrupt")
	if err := s.preserveFD(sfd, s.memfdWith(t, make([]byte, 1<<20)), 9); err != nil {
		t.Fatal(err)
	}
	// Corrupt memfd_luo_ser.size: beyond any file size.
	rec, err := s.mf.Slice(*ser>>pgalloc.PageShift, 1)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint64(rec[8:], 1<<63)
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "corrupt")
	_, err1 := n.retrieveFD(r, 9)
	_, err2 := n.retrieveFD(r, 9)
	if !errors.Is(err1, unix.EINVAL) || err2 == nil || err1.Error() != err2.Error() {
		t.Fatalf("retrieves of a corrupt memfd = %v, then %v; want EINVAL twice, the same error", err1, err2)
	}
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
	n.fdt.close(t, r)
	// The folios nobody could restore are released once no incoming
	// session is left.
	if got := allocatedAfterDrain(n); got != base {
		t.Fatalf("after closing the session, %d pages are allocated, want the cold-boot baseline %d", got, base)
	}
}

func TestIoctlStructSizeRules(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	long := strings.Repeat("n", 64)
	tests := []struct {
		name      string
		cmd       uint32
		arg       []byte
		want      error
		replySize int
	}{
		{"a size below the struct is EINVAL", 0xBA00, nameStruct(71, []byte("short")), unix.EINVAL, 0},
		{"a size beyond the buffer is EFAULT", 0xBA00, nameStruct(200, []byte("lying")), unix.EFAULT, 0},
		{"fewer than four bytes is EFAULT", 0xBA00, []byte{72, 0}, unix.EFAULT, 0},
		{"a larger struct with a zero tail works and gets our size back", 0xBA00, append(nameStruct(80, []byte("bigger")), make([]byte, 8)...), nil, 72},
		{"a larger struct with a non-zero tail is E2BIG", 0xBA00, append(nameStruct(80, []byte("tail")), 0, 0, 0, 1, 0, 0, 0, 0), unix.E2BIG, 0},
		{"a 63-byte name works", 0xBA00, nameStruct(72, []byte(long[:63])), nil, 72},
		{"a 64-byte name without NUL is EINVAL", 0xBA00, nameStruct(72, []byte(long)), unix.EINVAL, 0},
		{"an nr past the device's table is EINVAL", 0xBA02, nameStruct(72, nil), unix.EINVAL, 0},
		{"a session ioctl on the device is EINVAL", 0xBA40, nameStruct(72, nil), unix.EINVAL, 0},
		{"a known nr with another type is ENOTTY", 0xBB00, nameStruct(72, []byte("x")), unix.ENOTTY, 0},
		{"a known nr with size bits is ENOTTY", 0x4048BA00, nameStruct(72, []byte("y")), unix.ENOTTY, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reply, err := dev.Ioctl(s.fdt, tc.cmd, tc.arg)
			if tc.want == nil {
				if err != nil || len(reply) != tc.replySize {
					t.Fatalf("ioctl(%#x) = %d-byte reply, %v; want %d bytes", tc.cmd, len(reply), err, tc.replySize)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("ioctl(%#x) = %v, want %v", tc.cmd, err, tc.want)
			}
		})
	}
	// FINISH on a session this sentry created is refused, as Linux does
	// since "liveupdate: validate session type before performing operation".
	sfd := s.createSession(t, dev, "reply")
	_, err := s.session(t, sfd).Ioctl(s.fdt, 0xBA42, []byte{8, 0, 0, 0, 0, 0, 0, 0})
	wantErrno(t, "FINISH on an outgoing session", err, unix.EINVAL)
}

func TestSessionIoctlNumbers(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	ss := s.session(t, s.createSession(t, dev, "numbers"))
	for _, tc := range []struct {
		name string
		cmd  uint32
		want unix.Errno
	}{
		{"an nr below the session base is EINVAL", 0xBA3F, unix.EINVAL},
		{"an nr past the session table is EINVAL", 0xBA44, unix.EINVAL},
		{"a device ioctl on a session is EINVAL", 0xBA00, unix.EINVAL},
		{"a known nr with another type is ENOTTY", 0xBB41, unix.ENOTTY},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ss.Ioctl(s.fdt, tc.cmd, fdStruct(0, 1))
			wantErrno(t, "ioctl", err, tc.want)
		})
	}
}

func TestHandlerRegistrationRules(t *testing.T) {
	s := coldBoot(t)
	h := memfd.NewLUOHandler(s.mf, s.k)
	missing := *h.Ops
	missing.Finish = nil
	tests := []struct {
		name string
		h    *luo.FileHandler
		want unix.Errno
	}{
		{"a compatible string already registered is EEXIST", &luo.FileHandler{Compatible: "memfd-v1", Ops: h.Ops}, unix.EEXIST},
		{"a missing required op is EINVAL", &luo.FileHandler{Compatible: "other-v1", Ops: &missing}, unix.EINVAL},
		{"an empty compatible is EINVAL", &luo.FileHandler{Compatible: "", Ops: h.Ops}, unix.EINVAL},
		{"a compatible of 48 bytes is EINVAL", &luo.FileHandler{Compatible: strings.Repeat("c", 48), Ops: h.Ops}, unix.EINVAL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantErrno(t, "RegisterFileHandler", s.l.RegisterFileHandler(tc.h), tc.want)
		})
	}
	other := &luo.FileHandler{Compatible: "other-v1", Ops: h.Ops}
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "busy")
	wantErrno(t, "RegisterFileHandler while a session exists", s.l.RegisterFileHandler(other), unix.EBUSY)
	s.fdt.close(t, sfd)
	if err := s.l.RegisterFileHandler(other); err != nil {
		t.Fatalf("RegisterFileHandler once the session is gone: %v", err)
	}
	if err := s.l.UnregisterFileHandler(other); err != nil {
		t.Fatal(err)
	}
}

func TestPreserveAndRetrieveErrors(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	a := s.createSession(t, dev, "a")
	b := s.createSession(t, dev, "b")
	fd := s.memfdWith(t, []byte("once"))
	if err := s.preserveFD(a, fd, 1); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, "PRESERVE_FD with a token in use", s.preserveFD(a, s.memfdWith(t, nil), 1), unix.EEXIST)
	wantErrno(t, "PRESERVE_FD of the same file in the same session", s.preserveFD(a, fd, 2), unix.EBUSY)
	wantErrno(t, "PRESERVE_FD of the same file in another session", s.preserveFD(b, fd, 1), unix.EBUSY)
	_, err := s.retrieveFD(a, 1)
	wantErrno(t, "RETRIEVE_FD on an outgoing session", err, unix.EINVAL)
	_, err = sessionIoctl(s, dev, abiluo.IoctlRetrieveSession, "a")
	wantErrno(t, "RETRIEVE_SESSION of an outgoing session", err, unix.ENOENT)

	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "a")
	_, err = sessionIoctl(n, dev2, abiluo.IoctlRetrieveSession, "a")
	wantErrno(t, "RETRIEVE_SESSION twice", err, unix.EINVAL)
	_, err = sessionIoctl(n, dev2, abiluo.IoctlRetrieveSession, "never")
	wantErrno(t, "RETRIEVE_SESSION of an unknown name", err, unix.ENOENT)
	wantErrno(t, "PRESERVE_FD into an incoming session", n.preserveFD(r, n.memfdWith(t, nil), 3), unix.EINVAL)
	// A retrieved file stays LUO's until finish: it cannot be preserved
	// for the next restart before.
	got := n.verify(t, r, 1, []byte("once"))
	out := n.createSession(t, dev2, "a")
	wantErrno(t, "PRESERVE_FD of a retrieved, unfinished file", n.preserveFD(out, got, 1), unix.EBUSY)
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
	if err := n.preserveFD(out, got, 1); err != nil {
		t.Fatalf("PRESERVE_FD of a retrieved file after finish: %v", err)
	}
}

func TestAnUnknownCompatibleRefusesTheHandoverAndTheOldSentryGoesOn(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "keep")
	data := []byte(strings.Repeat("keep me ", 1000))
	if err := s.preserveFD(sfd, s.memfdWith(t, data), 0x77); err != nil {
		t.Fatal(err)
	}
	if err := s.l.Serialize(); err != nil {
		t.Fatal(err)
	}
	if err := s.k.Finalize(); err != nil {
		t.Fatal(err)
	}
	// The next sentry only speaks memfd-v9.
	file, err := s.mf.DupFile()
	if err != nil {
		t.Fatal(err)
	}
	mf, err := pgalloc.Open(file, pgalloc.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mf.Close()
	next := &sentry{mf: mf}
	next.k = ingest(t, mf, s.k.RootAddr())
	next.l = luo.New(next.k)
	if err := next.l.RegisterFileHandler(wrapped(next, "memfd-v9", func(*luo.FileOps) {})); err != nil {
		t.Fatal(err)
	}
	err = next.l.Deserialize()
	if !errors.Is(err, unix.ENOENT) || !strings.Contains(err.Error(), `"memfd-v1"`) || !strings.Contains(err.Error(), "memfd-v9") || !strings.Contains(err.Error(), "0x77") {
		t.Fatalf("Deserialize with only memfd-v9 = %v; want ENOENT naming memfd-v1, memfd-v9 and the token", err)
	}
	// The old sentry rolls back and is intact: a later restart works.
	s.l.Abort()
	if err := s.k.Abort(); err != nil {
		t.Fatal(err)
	}
	if st := s.l.Status(); st.Serialized {
		t.Fatal("still serialized after Abort")
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	n.verify(t, n.retrieveSession(t, dev2, "keep"), 0x77, data)
}

func TestUnretrievedSessionsAreDroppedAtTheNextRestart(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	forgotten := s.createSession(t, dev, "forgotten")
	if err := s.preserveFD(forgotten, s.memfdWith(t, make([]byte, 4<<20)), 1); err != nil {
		t.Fatal(err)
	}
	kept := s.createSession(t, dev, "kept")
	if err := s.preserveFD(kept, s.memfdWith(t, []byte("kept")), 2); err != nil {
		t.Fatal(err)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "kept")
	got := n.verify(t, r, 2, []byte("kept"))
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
	out := n.createSession(t, dev2, "kept")
	if err := n.preserveFD(out, got, 2); err != nil {
		t.Fatal(err)
	}
	n2 := n.restart(t)
	dev3, _ := n2.openDevice(t)
	_, err := sessionIoctl(n2, dev3, abiluo.IoctlRetrieveSession, "forgotten")
	wantErrno(t, "RETRIEVE_SESSION of a session not retrieved before the last restart", err, unix.ENOENT)
	n2.verify(t, n2.retrieveSession(t, dev3, "kept"), 2, []byte("kept"))
	if got, limit := allocatedAfterDrain(n2), uint64(256); got > limit {
		t.Fatalf("%d pages allocated after the second restart; the forgotten 4 MiB (1024 pages) should be gone", got)
	}
	if got := n2.l.LiveupdateNumber(); got != 2 {
		t.Fatalf("liveupdate number after two restarts = %d", got)
	}
}

func TestASessionClosedWhileSerializedIsReleasedByAbort(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "closing")
	fd := s.memfdWith(t, []byte("data"))
	if err := s.preserveFD(sfd, fd, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.l.Serialize(); err != nil {
		t.Fatal(err)
	}
	_, err := sessionIoctl(s, dev, abiluo.IoctlCreateSession, "late")
	wantErrno(t, "CREATE_SESSION while serialized", err, unix.EBUSY)
	wantErrno(t, "PRESERVE_FD while serialized", s.preserveFD(sfd, s.memfdWith(t, []byte("late")), 2), unix.EBUSY)
	s.fdt.close(t, sfd)
	if f := s.memfd(t, fd); !f.Frozen() {
		t.Fatal("closing a session while serialized unpreserved its files")
	}
	s.l.Abort()
	if f := s.memfd(t, fd); f.Frozen() {
		t.Fatal("Abort did not release the session closed while serialized")
	}
	if st := s.l.Status(); len(st.Sessions) != 0 {
		t.Fatalf("sessions after Abort: %+v", st.Sessions)
	}
}

func TestARetrieveThatFailsHalfwayFreesEveryFolio(t *testing.T) {
	base := allocatedAfterDrain(coldBoot(t))
	s, ser := bootRecordingSer(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "halfway")
	fd := s.memfdWith(t, nil)
	// 16 order-0 folios.
	for i := 0; i < 16; i++ {
		if _, err := s.memfd(t, fd).Pwrite([]byte{byte(i + 1)}, int64(i)*pgalloc.PageSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.preserveFD(sfd, fd, 3); err != nil {
		t.Fatal(err)
	}
	// Point the 9th memfd_luo_folio_ser at a page nobody preserved.
	page := func(addr uint64) []byte {
		b, err := s.mf.Slice(addr>>pgalloc.PageShift, 1)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var rec abimemfd.Ser
	if err := rec.Decode(page(*ser)); err != nil {
		t.Fatal(err)
	}
	array := page(abikho.VmallocChunkPhys(page(rec.Folios.First), 0))
	bogus := abimemfd.DecodeFolioSer(array[8*abimemfd.FolioSerSize:])
	bogus.PFN = s.mf.Pages() - 1
	bogus.Encode(array[8*abimemfd.FolioSerSize:])

	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "halfway")
	if _, err := n.retrieveFD(r, 3); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("RETRIEVE_FD with a bogus folio record = %v, want EINVAL", err)
	}
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
	n.fdt.close(t, r)
	if got := allocatedAfterDrain(n); got != base {
		t.Fatalf("after the failed retrieve and finish, %d pages are allocated, want the cold-boot baseline %d", got, base)
	}
}

func TestTheSessionLimitIsCheckedBeforeTheName(t *testing.T) {
	if testing.Short() {
		t.Skip("creates 52,428 sessions")
	}
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	for i := 0; i < luo.MaxSessions; i++ {
		s.createSession(t, dev, fmt.Sprintf("s%d", i))
	}
	_, err := sessionIoctl(s, dev, abiluo.IoctlCreateSession, "s0")
	wantErrno(t, "CREATE_SESSION of an existing name with the outgoing list full", err, unix.ENOMEM)
}

func TestDeserializeKeepsTheRecordBlocksUntilTheyAreReleased(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "kept")
	fd := s.memfdWith(t, make([]byte, 1<<20))
	if err := s.preserveFD(sfd, fd, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.l.Serialize(); err != nil {
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
	k, err := kho.Ingest(mf, s.k.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	l := luo.New(k)
	if err := l.RegisterFileHandler(memfd.NewLUOHandler(mf, k)); err != nil {
		t.Fatal(err)
	}
	before := mf.Stats().AllocatedPages
	if err := l.Deserialize(); err != nil {
		t.Fatal(err)
	}
	// Deserialize restores the record blocks but frees none: freeing
	// would build page metadata inside the blackout.
	if got := mf.Stats().AllocatedPages; got != before {
		t.Fatalf("Deserialize changed the allocated pages from %d to %d", before, got)
	}
	l.ReleaseIncomingRecords()
	released := mf.Stats().AllocatedPages
	// The LUO FDT, the session header and the file records at least.
	if released+3 > before {
		t.Fatalf("ReleaseIncomingRecords freed %d pages of %d, want the record blocks (at least 3)", before-released, before)
	}
	l.ReleaseIncomingRecords()
	if got := mf.Stats().AllocatedPages; got != released {
		t.Fatalf("a second ReleaseIncomingRecords freed %d more pages", released-got)
	}
}
