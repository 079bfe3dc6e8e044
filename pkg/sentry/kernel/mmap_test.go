package kernel

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// hostMemfd makes a host memfd of size bytes with seals, the oracle of the
// mmap tests.
func hostMemfd(t *testing.T, size int64, flags int, seals int) int {
	t.Helper()
	fd, err := unix.MemfdCreate("oracle", flags|unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if flags&unix.MFD_HUGETLB == 0 {
		if err := unix.Ftruncate(fd, size); err != nil {
			t.Fatal(err)
		}
	}
	if seals != 0 {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}

func TestMmapErrnosMatchTheHost(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	const size = 3 * 4096
	tests := []struct {
		name        string
		memfdFlags  int
		seals       int
		off         int64
		length      int
		prot, flags int
	}{
		{name: "a shared writable mapping works", prot: unix.PROT_READ | unix.PROT_WRITE, flags: unix.MAP_SHARED, length: size},
		{name: "a private mapping works", prot: unix.PROT_READ | unix.PROT_WRITE, flags: unix.MAP_PRIVATE, length: size},
		{name: "a mapping past the end of the file works", prot: unix.PROT_READ, flags: unix.MAP_SHARED, length: 4 * size},
		{name: "a mapping at an offset works", prot: unix.PROT_READ, flags: unix.MAP_SHARED, off: 4096, length: 4096},
		{name: "a zero length is EINVAL", prot: unix.PROT_READ, flags: unix.MAP_SHARED, length: 0},
		{name: "an unaligned offset is EINVAL", prot: unix.PROT_READ, flags: unix.MAP_SHARED, off: 100, length: 4096},
		{name: "no mapping type is EINVAL", prot: unix.PROT_READ, flags: 0, length: 4096},
		{name: "MAP_SHARED_VALIDATE works", prot: unix.PROT_READ, flags: unix.MAP_SHARED_VALIDATE, length: 4096},
		{name: "MAP_SHARED_VALIDATE with MAP_SYNC is EOPNOTSUPP", prot: unix.PROT_READ, flags: unix.MAP_SHARED_VALIDATE | unix.MAP_SYNC, length: 4096},
		{name: "MAP_SHARED ignores MAP_SYNC", prot: unix.PROT_READ, flags: unix.MAP_SHARED | unix.MAP_SYNC, length: 4096},
		{name: "MAP_GROWSDOWN on a file is EINVAL", prot: unix.PROT_READ, flags: unix.MAP_SHARED | unix.MAP_GROWSDOWN, length: 4096},
		{name: "a length beyond the address space is ENOMEM", prot: unix.PROT_READ, flags: unix.MAP_SHARED, length: 1 << 48},
		{name: "a range ending beyond the largest file offset is EOVERFLOW", prot: unix.PROT_READ, flags: unix.MAP_SHARED, off: 1<<63 - 4096, length: 2 * 4096},
		{name: "a shared writable mapping of an F_SEAL_WRITE file is EPERM", memfdFlags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE, prot: unix.PROT_READ | unix.PROT_WRITE, flags: unix.MAP_SHARED, length: 4096},
		{name: "a shared writable mapping of an F_SEAL_FUTURE_WRITE file is EPERM", memfdFlags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_FUTURE_WRITE, prot: unix.PROT_WRITE, flags: unix.MAP_SHARED, length: 4096},
		{name: "a shared read-only mapping of an F_SEAL_WRITE file works", memfdFlags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE, prot: unix.PROT_READ, flags: unix.MAP_SHARED, length: 4096},
		{name: "a private writable mapping of an F_SEAL_WRITE file works", memfdFlags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE, prot: unix.PROT_READ | unix.PROT_WRITE, flags: unix.MAP_PRIVATE, length: 4096},
		{name: "a mapping of an MFD_HUGETLB file with no huge pages is ENOMEM", memfdFlags: unix.MFD_HUGETLB, prot: unix.PROT_READ, flags: unix.MAP_SHARED, length: 2 << 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			host := hostMemfd(t, size, tc.memfdFlags, tc.seals)
			hb, herr := unix.Mmap(host, tc.off, tc.length, tc.prot, tc.flags)
			if herr == nil {
				unix.Munmap(hb)
			}
			fd, err := g.MemfdCreate("m", uint(tc.memfdFlags))
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close(fd)
			if tc.memfdFlags&unix.MFD_HUGETLB == 0 {
				if err := g.Ftruncate(fd, size); err != nil {
					t.Fatal(err)
				}
			}
			if tc.seals != 0 {
				if err := g.AddSeals(fd, tc.seals); err != nil {
					t.Fatal(err)
				}
			}
			b, err := g.Mmap(fd, tc.off, tc.length, tc.prot, tc.flags)
			if err == nil {
				defer g.Munmap(b)
			}
			if !errors.Is(err, herr) && !(err == nil && herr == nil) {
				t.Fatalf("mmap: ours %v, host %v", err, herr)
			}
		})
	}
}

func TestMmapOfFilesWithoutMmapIsENODEV(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	dev, err := g.OpenLiveUpdate()
	if err != nil {
		t.Fatal(err)
	}
	sess, err := g.CreateSession(dev, "s")
	if err != nil {
		t.Fatal(err)
	}
	// The host gives an anonymous inode (an eventfd) the same answer.
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if _, err := unix.Mmap(efd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED); !errors.Is(err, unix.ENODEV) {
		t.Fatalf("host eventfd mmap: %v", err)
	}
	for _, fd := range []int{dev, sess} {
		if _, err := g.Mmap(fd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED); !errors.Is(err, unix.ENODEV) {
			t.Errorf("mmap of fd %d: %v, want ENODEV", fd, err)
		}
	}
	if _, err := g.Mmap(99, 0, 4096, unix.PROT_READ, unix.MAP_SHARED); !errors.Is(err, unix.EBADF) {
		t.Errorf("mmap of a bad fd: %v, want EBADF", err)
	}
}

func TestAMappingAndReadWriteSeeTheSamePages(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	fd, err := g.MemfdCreate("shared", 0)
	if err != nil {
		t.Fatal(err)
	}
	const size = 3<<20 + 100 // a 2 MiB folio, 4 KiB ones, and a partial page
	pat := bytes.Repeat([]byte("livesentry"), size/10+1)[:size]
	if _, err := g.Pwrite(fd, pat[:size/2], 0); err != nil {
		t.Fatal(err)
	}
	// The second half is a hole the mapping fills.
	if err := g.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	b, err := g.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Munmap(b)
	if !bytes.Equal(b[:size/2], pat[:size/2]) || !bytes.Equal(b[size/2:], make([]byte, size-size/2)) {
		t.Fatal("the mapping does not show the file's contents")
	}
	copy(b[size/2:], pat[size/2:])
	got := make([]byte, size)
	if n, err := g.Pread(fd, got, 0); err != nil || n != len(pat) || !bytes.Equal(got[:n], pat) {
		t.Fatalf("pread after writing through the mapping: %d, %v, equal %v", n, err, bytes.Equal(got[:n], pat))
	}
	if _, err := g.Pwrite(fd, []byte("CHANGED"), 4096); err != nil {
		t.Fatal(err)
	}
	if string(b[4096:4096+7]) != "CHANGED" {
		t.Fatalf("the mapping does not see a pwrite: %q", b[4096:4096+7])
	}
	// A private mapping is copy-on-write in this process.
	p, err := g.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	copy(p, "private")
	if string(b[:7]) == "private" {
		t.Fatal("a write to a private mapping reached the file")
	}
	if err := g.Munmap(p); err != nil {
		t.Fatal(err)
	}
}

func TestATruncatedMappedPageNeverShowsAnotherFilesData(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	fd, err := g.MemfdCreate("victim", 0)
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{0xAA}, 8*4096)
	g.Pwrite(fd, old, 0)
	b, err := g.Mmap(fd, 0, len(old), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	// Another file takes every page it can get.
	other, err := g.MemfdCreate("other", 0)
	if err != nil {
		t.Fatal(err)
	}
	g.Pwrite(other, bytes.Repeat([]byte{0xBB}, 32<<20), 0)
	if !bytes.Equal(b, old) {
		t.Fatalf("the mapping of a truncated file changed: %d bytes of 0xBB", bytes.Count(b, []byte{0xBB}))
	}
	before := s.k.MemoryFile().Stats().AllocatedPages
	if err := g.Munmap(b); err != nil {
		t.Fatal(err)
	}
	if after := s.k.MemoryFile().Stats().AllocatedPages; after != before-8 {
		t.Fatalf("allocated pages %d after munmap, %d before: the 8 pinned pages were not freed", after, before)
	}
}

func TestPinsGoWithUnmapAndDisconnect(t *testing.T) {
	s := newSandbox(t)
	base := s.k.MemoryFile().Stats().AllocatedPages
	g := s.dial(t)
	fd, _ := g.MemfdCreate("f", 0)
	g.Ftruncate(fd, 64*4096)
	b, err := g.Mmap(fd, 0, 64*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	// Truncated away while mapped: the pins keep the folios.
	if err := g.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	g.Close(fd)
	if got := s.k.MemoryFile().Stats().AllocatedPages - base; got != 64 {
		t.Fatalf("%d pages allocated with a mapping of a truncated file, want its 64", got)
	}
	if err := g.Munmap(b[:32*4096]); err != nil {
		t.Fatal(err)
	}
	if got := s.k.MemoryFile().Stats().AllocatedPages - base; got != 32 {
		t.Fatalf("%d pages allocated after unmapping half of it, want 32", got)
	}
	g.Disconnect()
	deadline := time.Now().Add(5 * time.Second)
	for s.k.MemoryFile().Stats().AllocatedPages != base {
		if time.Now().After(deadline) {
			t.Fatalf("pins left after the guest went away: %d pages", s.k.MemoryFile().Stats().AllocatedPages-base)
		}
		time.Sleep(10 * time.Millisecond)
	}
	unix.Munmap(b[32*4096:])
}

func TestSealsAndSharedWritableMappingsExcludeEachOther(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	host := hostMemfd(t, 4096, unix.MFD_ALLOW_SEALING, 0)
	hb, err := unix.Mmap(host, 0, 4096, unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	_, herr := unix.FcntlInt(uintptr(host), unix.F_ADD_SEALS, unix.F_SEAL_WRITE)
	unix.Munmap(hb)
	fd, _ := g.MemfdCreate("sealed", unix.MFD_ALLOW_SEALING)
	g.Ftruncate(fd, 4096)
	b, err := g.Mmap(fd, 0, 4096, unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.AddSeals(fd, unix.F_SEAL_WRITE); !errors.Is(err, herr) {
		t.Fatalf("F_SEAL_WRITE with a shared writable mapping: ours %v, host %v", err, herr)
	}
	g.Munmap(b)
	if err := g.AddSeals(fd, unix.F_SEAL_FUTURE_WRITE); err != nil {
		t.Fatal(err)
	}
	// A read-only shared mapping of a write-sealed file can never become
	// writable.
	ro, err := g.Mmap(fd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	unix.FcntlInt(uintptr(host), unix.F_ADD_SEALS, unix.F_SEAL_FUTURE_WRITE)
	hro, err := unix.Mmap(host, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	herr = unix.Mprotect(hro, unix.PROT_READ|unix.PROT_WRITE)
	unix.Munmap(hro)
	if err := g.Mprotect(ro, unix.PROT_READ|unix.PROT_WRITE); !errors.Is(err, herr) || herr == nil {
		t.Fatalf("mprotect(PROT_WRITE) of a sealed file's shared mapping: ours %v, host %v", err, herr)
	}
	g.Munmap(ro)
}

func TestForkCopiesTheFDTableAndExecClosesCloexecFDs(t *testing.T) {
	s := newSandbox(t)
	parent := s.dial(t)
	keep, _ := parent.MemfdCreate("keep", 0)
	parent.Pwrite(keep, []byte("inherited"), 0)
	cloexec, _ := parent.MemfdCreate("cloexec", unix.MFD_CLOEXEC)
	m, err := parent.Mmap(keep, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	token, err := parent.ForkToken()
	if err != nil {
		t.Fatal(err)
	}
	child := s.dial(t)
	if err := child.Attach(token + 1); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("attaching a wrong token: %v", err)
	}
	if err := child.Attach(token); err != nil {
		t.Fatal(err)
	}
	if err := child.Attach(token); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("attaching twice: %v", err)
	}
	buf := make([]byte, 9)
	if n, err := child.Pread(keep, buf, 0); err != nil || string(buf[:n]) != "inherited" {
		t.Fatalf("the child reads %q, %v", buf[:n], err)
	}
	if fl, err := child.GetFD(cloexec); err != nil || fl != unix.FD_CLOEXEC {
		t.Fatalf("the child's F_GETFD of the cloexec fd: %d, %v", fl, err)
	}
	// The parent's fds are its own.
	parent.Close(keep)
	if _, err := child.Fstat(keep); err != nil {
		t.Fatalf("the child's fd after the parent closed its own: %v", err)
	}
	if err := child.Exec(); err != nil {
		t.Fatal(err)
	}
	if _, err := child.Fstat(cloexec); !errors.Is(err, unix.EBADF) {
		t.Fatalf("an FD_CLOEXEC fd after exec: %v, want EBADF", err)
	}
	if _, err := child.Fstat(keep); err != nil {
		t.Fatalf("an fd without FD_CLOEXEC after exec: %v", err)
	}
	parent.Munmap(m)
}

func TestAVersion1GuestIsStillServed(t *testing.T) {
	s := newSandbox(t)
	c := rawConn(t, s, false)
	var b [abiguest.HelloSize]byte
	abiguest.Hello{Version: abiguest.MinVersion}.Encode(b[:])
	if _, err := c.Write(b[:]); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatal(err)
	}
	h, err := abiguest.DecodeHello(b[:])
	if err != nil || h.Errno != 0 || h.Version != abiguest.Version {
		t.Fatalf("hello to a version-1 guest: %+v, %v", h, err)
	}
}
