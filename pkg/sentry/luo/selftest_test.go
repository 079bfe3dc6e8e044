package luo_test

// Ports of tools/testing/selftests/liveupdate (shared/spec/linux-luo.md §5),
// with the kexec replaced by an in-process restart.

import (
	"bytes"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// liveupdate.c: basic_open_close and exclusive_open.
func TestDeviceOpensOnceAtATime(t *testing.T) {
	s := coldBoot(t)
	_, fd := s.openDevice(t)
	if _, err := s.l.OpenDevice(); err == nil {
		t.Fatal("second open of /dev/liveupdate succeeded")
	} else {
		wantErrno(t, "second open", err, unix.EBUSY)
	}
	s.fdt.close(t, fd)
	_, fd = s.openDevice(t)
	s.fdt.close(t, fd)
}

// liveupdate.c: create_duplicate_session and create_distinct_sessions.
func TestSessionNamesAreUniqueInOutgoing(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	a := s.createSession(t, dev, "duplicate-session-test")
	_, err := sessionIoctl(s, dev, 0xBA00, "duplicate-session-test")
	wantErrno(t, "second CREATE_SESSION with the same name", err, unix.EEXIST)
	b := s.createSession(t, dev, "distinct-session-2")
	if a == b || a < 0 || b < 0 {
		t.Fatalf("two sessions got fds %d and %d", a, b)
	}
	if !s.fdt.cloexec[a] || !s.fdt.cloexec[b] {
		t.Fatal("session fds are not O_CLOEXEC")
	}
}

// liveupdate.c: preserve_memfd. Closing the session unpreserves the file;
// its contents stay and it is no longer frozen.
func TestClosingASessionUnpreservesItsFiles(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "preserve-memfd-test")
	mfd := s.memfdWith(t, []byte("hello liveupdate"))
	if err := s.preserveFD(sfd, mfd, 0x1234); err != nil {
		t.Fatal(err)
	}
	f := s.memfd(t, mfd)
	if !f.Frozen() {
		t.Fatal("a preserved memfd is not frozen")
	}
	before := s.mf.Stats()
	s.fdt.close(t, sfd)
	if f.Frozen() {
		t.Fatal("the memfd is still frozen after its session was closed")
	}
	if got := s.contents(t, mfd); string(got) != "hello liveupdate" {
		t.Fatalf("memfd holds %q after unpreserve", got)
	}
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatalf("growing the unpreserved memfd: %v", err)
	}
	if after := s.mf.Stats(); after.AllocatedPages >= before.AllocatedPages {
		t.Fatalf("unpreserve freed no metadata: %d allocated pages before, %d after", before.AllocatedPages, after.AllocatedPages)
	}
	if st := s.l.Status(); len(st.Sessions) != 0 {
		t.Fatalf("sessions after close: %+v", st.Sessions)
	}
}

// liveupdate.c: preserve_multiple_memfds and preserve_complex_scenario,
// carried across a restart.
func TestComplexScenarioSurvivesARestart(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	s1 := s.createSession(t, dev, "complex-session-1")
	s2 := s.createSession(t, dev, "complex-session-2")
	for _, p := range []struct {
		sfd   int32
		token uint64
		data  string
	}{
		{s1, 0x1111, "data for session 1"},
		{s1, 0x2222, ""},
		{s2, 0x3333, "data for session 2"},
		{s2, 0x4444, ""},
	} {
		fd := s.memfdWith(t, []byte(p.data))
		if err := s.preserveFD(p.sfd, fd, p.token); err != nil {
			t.Fatalf("PRESERVE_FD(%#x): %v", p.token, err)
		}
		// The selftests close the memfd: LUO's reference keeps it.
		s.fdt.close(t, fd)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r1 := n.retrieveSession(t, dev2, "complex-session-1")
	r2 := n.retrieveSession(t, dev2, "complex-session-2")
	n.verify(t, r1, 0x1111, []byte("data for session 1"))
	n.verify(t, r1, 0x2222, []byte{})
	n.verify(t, r2, 0x3333, []byte("data for session 2"))
	n.verify(t, r2, 0x4444, []byte{})
	for _, fd := range []int32{r1, r2} {
		if err := n.finish(fd); err != nil {
			t.Fatal(err)
		}
	}
	if got := n.l.LiveupdateNumber(); got != 1 {
		t.Fatalf("liveupdate number after one restart = %d, want 1", got)
	}
}

// liveupdate.c: preserve_unsupported_fd (the selftest uses /dev/null).
func TestPreservingAFileNoHandlerKnowsFails(t *testing.T) {
	s := coldBoot(t)
	dev, devfd := s.openDevice(t)
	sfd := s.createSession(t, dev, "unsupported-fd-test")
	wantErrno(t, "PRESERVE_FD of /dev/liveupdate itself", s.preserveFD(sfd, devfd, 0xdead), unix.ENOENT)
	wantErrno(t, "PRESERVE_FD of a session fd", s.preserveFD(sfd, sfd, 0xdead), unix.ENOENT)
	wantErrno(t, "PRESERVE_FD of a closed fd", s.preserveFD(sfd, 99, 0xdead), unix.EBADF)
}

// luo_kexec_simple.c.
func TestKexecSimple(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	state := s.createSession(t, dev, "kexec_simple_state")
	stfd := s.memfdWith(t, []byte("2"))
	if err := s.preserveFD(state, stfd, 999); err != nil {
		t.Fatal(err)
	}
	sfd := s.createSession(t, dev, "test-session")
	mfd := s.memfdWith(t, []byte("hello kexec world"))
	if err := s.preserveFD(sfd, mfd, 0x1A); err != nil {
		t.Fatal(err)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	st := n.retrieveSession(t, dev2, "kexec_simple_state")
	n.verify(t, st, 999, []byte("2"))
	r := n.retrieveSession(t, dev2, "test-session")
	n.verify(t, r, 0x1A, []byte("hello kexec world"))
	for _, fd := range []int32{r, st} {
		if err := n.finish(fd); err != nil {
			t.Fatal(err)
		}
	}
}

// luo_multi_session.c.
func TestKexecMultiSession(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	s.createSession(t, dev, "multi-test-empty-1")
	s.createSession(t, dev, "multi-test-empty-2")
	f1 := s.createSession(t, dev, "multi-test-files-1")
	f2 := s.createSession(t, dev, "multi-test-files-2")
	data := map[uint64]string{0x1001: "data for session 1", 0x2002: "data for session 2, file 1", 0x3003: "data for session 2, file 2"}
	for token, sfd := range map[uint64]int32{0x1001: f1, 0x2002: f2, 0x3003: f2} {
		if err := s.preserveFD(sfd, s.memfdWith(t, []byte(data[token])), token); err != nil {
			t.Fatal(err)
		}
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	for _, name := range []string{"multi-test-empty-1", "multi-test-empty-2"} {
		if err := n.finish(n.retrieveSession(t, dev2, name)); err != nil {
			t.Fatalf("finishing %s: %v", name, err)
		}
	}
	r1 := n.retrieveSession(t, dev2, "multi-test-files-1")
	r2 := n.retrieveSession(t, dev2, "multi-test-files-2")
	n.verify(t, r1, 0x1001, []byte(data[0x1001]))
	n.verify(t, r2, 0x2002, []byte(data[0x2002]))
	n.verify(t, r2, 0x3003, []byte(data[0x3003]))
	for _, fd := range []int32{r1, r2} {
		if err := n.finish(fd); err != nil {
			t.Fatal(err)
		}
	}
}

// luo_stress_sessions.c: 2000 empty sessions.
func TestStressSessions(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	const n = 2000
	for i := 0; i < n; i++ {
		s.createSession(t, dev, fmt.Sprintf("many-test-%d", i))
	}
	ns := s.restart(t)
	dev2, _ := ns.openDevice(t)
	for i := 0; i < n; i++ {
		fd := ns.retrieveSession(t, dev2, fmt.Sprintf("many-test-%d", i))
		if err := ns.finish(fd); err != nil {
			t.Fatal(err)
		}
		ns.fdt.close(t, fd)
	}
	if st := ns.l.Status(); len(st.Sessions) != 0 {
		t.Fatalf("%d sessions left after finishing all", len(st.Sessions))
	}
}

// luo_stress_files.c: 500 memfds in one session.
func TestStressFiles(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "stress-files")
	const n = 500
	for i := 0; i < n; i++ {
		fd := s.memfdWith(t, []byte(fmt.Sprintf("file-data-%d", i)))
		if err := s.preserveFD(sfd, fd, uint64(i)); err != nil {
			t.Fatalf("PRESERVE_FD(%d): %v", i, err)
		}
		s.fdt.close(t, fd)
	}
	ns := s.restart(t)
	dev2, _ := ns.openDevice(t)
	r := ns.retrieveSession(t, dev2, "stress-files")
	for i := 0; i < n; i++ {
		ns.fdt.close(t, ns.verify(t, r, uint64(i), []byte(fmt.Sprintf("file-data-%d", i))))
	}
	if err := ns.finish(r); err != nil {
		t.Fatal(err)
	}
}

// luo_memfd.c: memfd_data (1 MiB of random data) and zero_memfd.
func TestMemfdDataAndZeroSize(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "memfd-data")
	data := make([]byte, 1<<20)
	randomFill(data, 1)
	if err := s.preserveFD(sfd, s.memfdWith(t, data), 1); err != nil {
		t.Fatal(err)
	}
	if err := s.preserveFD(sfd, s.memfdWith(t, nil), 2); err != nil {
		t.Fatal(err)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "memfd-data")
	n.verify(t, r, 1, data)
	zfd := n.verify(t, r, 2, nil)
	if end, err := n.memfd(t, zfd).Seek(0, unix.SEEK_END); err != nil || end != 0 {
		t.Fatalf("lseek(SEEK_END) on the retrieved empty memfd = %d, %v", end, err)
	}
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
}

// luo_memfd.c: preserved_ops. A preserved memfd can be read and written
// inside its size; growing it by a write or shrinking it by ftruncate
// fails with EPERM and leaves the size alone.
func TestPreservedMemfdIsFrozen(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "preserved-ops")
	fd := s.memfdWith(t, bytes.Repeat([]byte{'a'}, 8192))
	if err := s.preserveFD(sfd, fd, 1); err != nil {
		t.Fatal(err)
	}
	f := s.memfd(t, fd)
	if _, err := f.Pwrite([]byte("inside"), 100); err != nil {
		t.Fatalf("a write inside the size: %v", err)
	}
	_, err := f.Pwrite([]byte("past the end"), 8192)
	wantErrno(t, "a write at the end", err, unix.EPERM)
	// As in Linux, a write that crosses the end writes what fits in the
	// page before it (generic_perform_write goes page by page and
	// shmem_write_begin refuses the page that would grow the file).
	if n, err := f.Pwrite([]byte("crosses the end"), 8190); n != 2 || err != nil {
		t.Fatalf("a write that crosses the end = %d, %v; want a short write of 2 bytes", n, err)
	}
	wantErrno(t, "ftruncate to half", f.Truncate(4096), unix.EPERM)
	wantErrno(t, "fallocate", f.Fallocate(0, 0, 4096), unix.EPERM)
	if f.Size() != 8192 {
		t.Fatalf("size of the frozen memfd changed to %d", f.Size())
	}
}

// luo_memfd.c: fallocate_memfd. Preserve a fallocated memfd, then write:
// the data written after preserve arrives.
func TestFallocateThenPreserveThenWrite(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "fallocate")
	fd := s.memfdWith(t, nil)
	f := s.memfd(t, fd)
	if err := f.Fallocate(0, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := s.preserveFD(sfd, fd, 7); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	randomFill(data, 2)
	if _, err := f.Pwrite(data, 0); err != nil {
		t.Fatal(err)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	n.verify(t, n.retrieveSession(t, dev2, "fallocate"), 7, data)
}
