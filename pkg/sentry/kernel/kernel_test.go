package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"golang.org/x/sys/unix"
)

// sandbox is a kernel serving a guest socket in a temporary directory.
type sandbox struct {
	k    *Kernel
	l    *net.UnixListener
	path string
	done chan error
}

func startKernel(t testing.TB, k *Kernel) *sandbox {
	t.Helper()
	path := filepath.Join(t.TempDir(), "guest.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	s := &sandbox{k: k, l: l, path: path, done: make(chan error, 1)}
	go func() { s.done <- k.Serve(l) }()
	t.Cleanup(func() {
		l.Close()
		<-s.done
	})
	return s
}

func newSandbox(t testing.TB) *sandbox { return newSandboxSized(t, 64<<20) }

// newSandboxSized is newSandbox with a memory file of size bytes.
func newSandboxSized(t testing.TB, size uint64) *sandbox {
	t.Helper()
	k, err := New(Options{MemorySize: size, Logf: t.Logf})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	s := startKernel(t, k)
	t.Cleanup(k.Shutdown)
	// Cleanups run last-in first-out: a test that failed with the kernel
	// paused must not leave Shutdown waiting for its Resume.
	t.Cleanup(k.Resume)
	return s
}

func (s *sandbox) dialB(t testing.TB) *guest.Conn { return s.dial(t) }

func (s *sandbox) dial(t testing.TB) *guest.Conn {
	t.Helper()
	c, err := guest.Dial(s.path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Disconnect() })
	return c
}

func mustFD(t *testing.T) func(fd int, err error) int {
	return func(fd int, err error) int {
		t.Helper()
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return fd
	}
}

func TestErrnosByFileType(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	mfd := mustFD(t)(g.MemfdCreate("m", unix.MFD_ALLOW_SEALING))
	dev := mustFD(t)(g.OpenLiveUpdate())
	sess := mustFD(t)(g.CreateSession(dev, "errnos"))
	buf := make([]byte, 16)
	tests := []struct {
		name string
		call func() error
		want unix.Errno
	}{
		{"read of a bad fd is EBADF", func() error { _, err := g.Read(99, buf); return err }, unix.EBADF},
		{"read of a negative fd is EBADF", func() error { _, err := g.Read(-1, buf); return err }, unix.EBADF},
		{"close of a bad fd is EBADF", func() error { return g.Close(77) }, unix.EBADF},
		{"read of /dev/liveupdate is EINVAL", func() error { _, err := g.Read(dev, buf); return err }, unix.EINVAL},
		{"write to /dev/liveupdate is EINVAL", func() error { _, err := g.Write(dev, buf); return err }, unix.EINVAL},
		{"read of a session fd is EINVAL", func() error { _, err := g.Read(sess, buf); return err }, unix.EINVAL},
		{"pwrite to a session fd is ESPIPE (an anonymous inode cannot pwrite)", func() error { _, err := g.Pwrite(sess, buf, 0); return err }, unix.ESPIPE},
		{"ioctl on a memfd is ENOTTY", func() error { _, err := g.Ioctl(mfd, 0xBA00, make([]byte, 72)); return err }, unix.ENOTTY},
		{"F_ADD_SEALS on /dev/liveupdate is EINVAL", func() error { return g.AddSeals(dev, unix.F_SEAL_GROW) }, unix.EINVAL},
		{"F_GET_SEALS on a session is EINVAL", func() error { _, err := g.GetSeals(sess); return err }, unix.EINVAL},
		{"lseek on /dev/liveupdate is ESPIPE", func() error { _, err := g.Seek(dev, 0, 0); return err }, unix.ESPIPE},
		{"ftruncate of a session is EINVAL", func() error { return g.Ftruncate(sess, 10) }, unix.EINVAL},
		{"fallocate on /dev/liveupdate is ENODEV", func() error { return g.Fallocate(dev, 0, 0, 10) }, unix.ENODEV},
		{"dup3 onto the same fd is EINVAL", func() error { _, err := g.Dup3(mfd, mfd, 0); return err }, unix.EINVAL},
		{"dup3 with a flag other than O_CLOEXEC is EINVAL", func() error { _, err := g.Dup3(mfd, 50, unix.O_NONBLOCK); return err }, unix.EINVAL},
		{"dup3 from a bad fd is EBADF", func() error { _, err := g.Dup3(60, 61, 0); return err }, unix.EBADF},
		{"dup3 onto an fd past the limit is EBADF", func() error { _, err := g.Dup3(mfd, MaxFDs, 0); return err }, unix.EBADF},
		{"an unknown fcntl command is EINVAL", func() error { _, err := g.Fcntl(mfd, 9999, 0); return err }, unix.EINVAL},
		{"F_DUPFD beyond the limit is EINVAL", func() error { _, err := g.Fcntl(mfd, unix.F_DUPFD, MaxFDs); return err }, unix.EINVAL},
		{"a second open of /dev/liveupdate is EBUSY", func() error { _, err := g.OpenLiveUpdate(); return err }, unix.EBUSY},
		{"open of another path is ENOENT", func() error { _, err := g.Open("/etc/passwd", unix.O_RDONLY); return err }, unix.ENOENT},
		{"open of /dev/liveupdate with O_DIRECTORY is ENOTDIR", func() error { _, err := g.Open("/dev/liveupdate", unix.O_RDWR|unix.O_DIRECTORY); return err }, unix.ENOTDIR},
		{"memfd_create with an unknown flag is EINVAL", func() error { _, err := g.MemfdCreate("x", 0x100); return err }, unix.EINVAL},
		{"pread at a negative offset is EINVAL", func() error { _, err := g.Pread(mfd, buf, -1); return err }, unix.EINVAL},
		{"pwrite at a negative offset is EINVAL", func() error { _, err := g.Pwrite(mfd, buf, -5); return err }, unix.EINVAL},
		{"lseek with a bad whence is EINVAL", func() error { _, err := g.Seek(mfd, 0, 17); return err }, unix.EINVAL},
		{"an ioctl with a short struct is EINVAL", func() error {
			b := make([]byte, 72)
			binary.LittleEndian.PutUint32(b, 8)
			_, err := g.Ioctl(dev, 0xBA00, b)
			return err
		}, unix.EINVAL},
		{"preserving a bad fd is EBADF", func() error { return g.PreserveFD(sess, 88, 1) }, unix.EBADF},
		{"retrieving an unknown session is ENOENT", func() error { _, err := g.RetrieveSession(dev, "nothing"); return err }, unix.ENOENT},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	// The connection survived every error.
	if _, err := g.Write(mfd, []byte("still here")); err != nil {
		t.Fatalf("write after the errors: %v", err)
	}
}

func TestFDTableSemantics(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	a := mustFD(t)(g.MemfdCreate("a", unix.MFD_CLOEXEC))
	if a != 0 {
		t.Fatalf("first fd is %d, want 0", a)
	}
	if fl, err := g.GetFD(a); err != nil || fl != unix.FD_CLOEXEC {
		t.Fatalf("F_GETFD of an MFD_CLOEXEC memfd: %d, %v; want FD_CLOEXEC", fl, err)
	}
	b := mustFD(t)(g.Dup(a))
	if b != 1 {
		t.Fatalf("dup gave %d, want the lowest free fd 1", b)
	}
	if fl, _ := g.GetFD(b); fl != 0 {
		t.Fatalf("F_GETFD of a dup: %d, want 0 (dup clears FD_CLOEXEC)", fl)
	}
	// dup'ed fds share the file position.
	if _, err := g.Write(a, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if off, err := g.Seek(b, 0, unix.SEEK_CUR); err != nil || off != 5 {
		t.Fatalf("position through the dup: %d, %v; want 5", off, err)
	}
	if err := g.SetFD(b, unix.FD_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	if fl, _ := g.GetFD(b); fl != unix.FD_CLOEXEC {
		t.Fatalf("F_GETFD after F_SETFD: %d", fl)
	}
	if fl, _ := g.GetFD(a); fl != unix.FD_CLOEXEC {
		t.Fatalf("F_SETFD on one fd changed the other's flag")
	}
	other := mustFD(t)(g.MemfdCreate("other", 0))
	// dup3 onto an open fd closes what was there.
	if fd, err := g.Dup3(a, other, unix.O_CLOEXEC); err != nil || fd != other {
		t.Fatalf("dup3: %d, %v", fd, err)
	}
	st, err := g.Fstat(other)
	if err != nil || st.Size != 5 {
		t.Fatalf("fstat after dup3: %+v, %v; want the size of a's file (5)", st, err)
	}
	if err := g.Close(a); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(a); !errors.Is(err, unix.EBADF) {
		t.Fatalf("second close: %v, want EBADF", err)
	}
	// The lowest free fd is reused.
	if fd := mustFD(t)(g.Dup(b)); fd != a {
		t.Fatalf("dup after close gave %d, want %d", fd, a)
	}
	if fd, err := g.Fcntl(b, unix.F_DUPFD_CLOEXEC, 10); err != nil || fd != 10 {
		t.Fatalf("F_DUPFD_CLOEXEC 10: %d, %v", fd, err)
	}
	if fl, err := g.GetFL(b); err != nil || fl&unix.O_ACCMODE != unix.O_RDWR {
		t.Fatalf("F_GETFL: %#x, %v", fl, err)
	}
}

func TestMemfdCallsThroughTheGuestProtocol(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	fd := mustFD(t)(g.MemfdCreate("data", unix.MFD_ALLOW_SEALING))
	// 5 MiB + 123: large folios, several data frames, a partial last page.
	data := make([]byte, 5<<20+123)
	rand.NewChaCha8([32]byte{1}).Read(data)
	if n, err := g.Write(fd, data); err != nil || n != len(data) {
		t.Fatalf("write: %d, %v", n, err)
	}
	got := make([]byte, len(data)+100)
	if n, err := g.Pread(fd, got, 0); err != nil || n != len(data) || !bytes.Equal(got[:n], data) {
		t.Fatalf("pread of everything: %d, %v, equal %v", n, err, bytes.Equal(got[:n], data))
	}
	if n, err := g.Pread(fd, got[:10], int64(len(data))); err != nil || n != 0 {
		t.Fatalf("pread at EOF: %d, %v", n, err)
	}
	if _, err := g.Seek(fd, 1000, unix.SEEK_SET); err != nil {
		t.Fatal(err)
	}
	if n, err := g.Read(fd, got[:4096]); err != nil || n != 4096 || !bytes.Equal(got[:n], data[1000:5096]) {
		t.Fatalf("read from 1000: %d, %v", n, err)
	}
	if off, _ := g.Seek(fd, 0, unix.SEEK_CUR); off != 5096 {
		t.Fatalf("read did not advance the position: %d", off)
	}
	if n, err := g.Pwrite(fd, []byte("XYZ"), 7); err != nil || n != 3 {
		t.Fatalf("pwrite: %d, %v", n, err)
	}
	if err := g.Ftruncate(fd, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := g.Fallocate(fd, 0, 0, 8<<20); err != nil {
		t.Fatal(err)
	}
	st, err := g.Fstat(fd)
	if err != nil || st.Size != 8<<20 || st.Blocks != 8<<20/512 || st.Mode != unix.S_IFREG|0o777 {
		t.Fatalf("fstat: %+v, %v", st, err)
	}
	if err := g.AddSeals(fd, unix.F_SEAL_GROW); err != nil {
		t.Fatal(err)
	}
	if seals, err := g.GetSeals(fd); err != nil || seals != unix.F_SEAL_GROW {
		t.Fatalf("F_GET_SEALS: %#x, %v", seals, err)
	}
	if _, err := g.Pwrite(fd, []byte("x"), 8<<20); !errors.Is(err, unix.EPERM) {
		t.Fatalf("growing write on a F_SEAL_GROW memfd: %v, want EPERM", err)
	}
	if n, err := g.Pread(fd, got[:10], 5); err != nil || n != 10 || string(got[2:5]) != "XYZ" {
		t.Fatalf("pread after pwrite: %q, %v", got[:n], err)
	}
}

// rawConn is a guest speaking the protocol by hand.
func rawConn(t *testing.T, s *sandbox, hello bool) net.Conn {
	t.Helper()
	if hello {
		return rawConnVersion(t, s, abiguest.Version)
	}
	c, err := net.Dial("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expectFatal reads until the sentry closes c and checks that it sent a
// fatal frame first.
func expectFatal(t *testing.T, c net.Conn, skip int) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading until close: %v", err)
	}
	b = b[skip:]
	if len(b) < abiguest.ResponseHeaderSize {
		t.Fatalf("connection closed after %d bytes, without a fatal frame", len(b))
	}
	rh, err := abiguest.DecodeResponseHeader(b[:abiguest.ResponseHeaderSize])
	if err != nil || rh.Kind != abiguest.KindFatal {
		t.Fatalf("first frame: %+v, %v; want a fatal frame", rh, err)
	}
	t.Logf("fatal: %s", b[abiguest.ResponseHeaderSize:])
}

func TestMalformedFramesCloseOnlyThatConnection(t *testing.T) {
	s := newSandbox(t)
	bystander := s.dial(t)
	fd := mustFD(t)(bystander.MemfdCreate("bystander", 0))
	if _, err := bystander.Write(fd, []byte("kept")); err != nil {
		t.Fatal(err)
	}
	header := func(op abiguest.Op, dataLen uint32) []byte {
		h := abiguest.RequestHeader{Op: op, DataLen: dataLen}
		b := make([]byte, abiguest.RequestHeaderSize)
		h.Encode(b)
		return b
	}
	tests := []struct {
		name  string
		hello bool
		send  []byte
		// skip is the number of bytes before the fatal frame.
		skip int
	}{
		{name: "a hello with a bad magic is refused", send: []byte("GARBAGE!\x01\x00\x00\x00\x00\x00\x00\x00")},
		{name: "an unknown op is fatal", hello: true, send: header(999, 0)},
		{name: "op zero is fatal", hello: true, send: header(0, 0)},
		{name: "a close carrying a payload is fatal", hello: true, send: header(abiguest.OpClose, 8)},
		{name: "an ioctl payload above 4 KiB is fatal", hello: true, send: header(abiguest.OpIoctl, abiguest.MaxSmallPayload+1)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := rawConn(t, s, tc.hello)
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			expectFatal(t, c, tc.skip)
		})
	}
	t.Run("a hello with another version is refused with EPROTONOSUPPORT", func(t *testing.T) {
		c := rawConn(t, s, false)
		var b [abiguest.HelloSize]byte
		abiguest.Hello{Version: 99}.Encode(b[:])
		c.Write(b[:])
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		all, _ := io.ReadAll(c)
		if len(all) != abiguest.HelloSize {
			t.Fatalf("got %d bytes, want just a hello", len(all))
		}
		h, err := abiguest.DecodeHello(all)
		if err != nil || unix.Errno(h.Errno) != unix.EPROTONOSUPPORT {
			t.Fatalf("hello %+v, %v; want EPROTONOSUPPORT", h, err)
		}
	})
	got := make([]byte, 4)
	if n, err := bystander.Pread(fd, got, 0); err != nil || string(got[:n]) != "kept" {
		t.Fatalf("the other guest after the malformed frames: %q, %v", got[:n], err)
	}
}

func TestGuestKilledMidCallLosesItsFilesOnly(t *testing.T) {
	s := newSandbox(t)
	bystander := s.dial(t)
	dev := mustFD(t)(bystander.OpenLiveUpdate())
	// The victim opens nothing that outlives it but a memfd and sends half
	// of a 1 MiB write before dying.
	victim := rawConn(t, s, true)
	h := abiguest.RequestHeader{Op: abiguest.OpMemfdCreate, DataLen: 2}
	b := make([]byte, abiguest.RequestHeaderSize)
	h.Encode(b)
	victim.Write(append(b, 'v', 0))
	var rb [abiguest.ResponseHeaderSize]byte
	if _, err := io.ReadFull(victim, rb[:]); err != nil {
		t.Fatal(err)
	}
	if rh, _ := abiguest.DecodeResponseHeader(rb[:]); rh.Errno != 0 || rh.Result != 0 {
		t.Fatalf("memfd_create by hand: %+v", rh)
	}
	h = abiguest.RequestHeader{Op: abiguest.OpWrite, DataLen: 1 << 20, Args: [5]uint64{0}}
	h.Encode(b)
	victim.Write(b)
	victim.Write(make([]byte, 512<<10))
	deadline := time.Now().Add(5 * time.Second)
	for s.k.Guests() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d guests connected, want 2", s.k.Guests())
		}
		time.Sleep(time.Millisecond)
	}
	victim.Close()
	for s.k.Guests() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the killed guest is still connected (%d guests)", s.k.Guests())
		}
		time.Sleep(time.Millisecond)
	}
	if st := s.k.MemoryFile().Stats(); st.AllocatedPages > 16 {
		// The dead guest's memfd (and the pages its half write filled)
		// were freed with its fd table; what remains is KHO's root.
		t.Errorf("%d pages still allocated after the guest died", st.AllocatedPages)
	}
	sess, err := bystander.CreateSession(dev, "alive")
	if err != nil || sess < 0 {
		t.Fatalf("the other guest after the kill: %d, %v", sess, err)
	}
}

func TestPauseHoldsCallsUntilResume(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	fd := mustFD(t)(g.MemfdCreate("p", 0))
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := g.Write(fd, []byte("late"))
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a call ran while the kernel was paused (err %v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	s.k.Resume()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("write after resume: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the call did not run after Resume")
	}
}

func TestPrepareIncomingRehearsesABootAndLeavesNothing(t *testing.T) {
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := fds()
	if err := PrepareIncoming(64 << 20); err != nil {
		t.Fatal(err)
	}
	// Twice: the rehearsal's kernel is gone, nothing of it is reused.
	format, err := rehearse()
	if err != nil {
		t.Fatal(err)
	}
	// A restart between two sentries of this build hands KHO over in
	// the first format this build writes: the rehearsal must read the
	// same, or the blackout runs that reader cold.
	if want := kho.WriteFormats()[0]; format != want {
		t.Errorf("the rehearsal ingested %q, want %q, what a restart to this build hands over", format, want)
	}
	if after := fds(); after != before {
		t.Errorf("%d fds open after two rehearsals, %d before: a memory file is left open", after, before)
	}
}
