package kernel

import (
	"errors"
	"io"
	"sync/atomic"
	"testing"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// greetingFile is a file type the kernel has never heard of: reads give a
// fixed greeting, ioctl 0x4242 echoes its argument, fstat shows a FIFO,
// and everything else is vfs's defaults.
type greetingFile struct {
	vfs.FileDescriptionDefaultImpl
	refs atomic.Int64
}

const greeting = "hello from a new file type"

func (f *greetingFile) IncRef() { f.refs.Add(1) }
func (f *greetingFile) DecRef() { f.refs.Add(-1) }

func (f *greetingFile) Stat() abiguest.Stat {
	return abiguest.Stat{Blksize: 4096, Mode: unix.S_IFIFO | 0o600, Nlink: 1}
}

func (f *greetingFile) ReadTo(dst io.Writer, count int64) (int64, error) {
	n, err := dst.Write([]byte(greeting[:min(int64(len(greeting)), count)]))
	return int64(n), err
}

func (f *greetingFile) Ioctl(_ vfs.FDTable, cmd uint32, arg []byte) ([]byte, error) {
	if cmd != 0x4242 {
		return nil, unix.ENOTTY
	}
	return arg, nil
}

// onlyProcess returns the one guest process connected to s.
func onlyProcess(t *testing.T, s *sandbox) *Process {
	t.Helper()
	s.k.mu.Lock()
	defer s.k.mu.Unlock()
	if len(s.k.procs) != 1 {
		t.Fatalf("%d guest processes, want 1", len(s.k.procs))
	}
	for p := range s.k.procs {
		return p
	}
	return nil
}

func TestDispatchCallsANewFileTypeThroughItsOps(t *testing.T) {
	s := newSandbox(t)
	g := s.dial(t)
	f := &greetingFile{}
	f.refs.Store(1)
	fd32, err := onlyProcess(t, s).FDTable().InstallFD(f, false)
	if err != nil {
		t.Fatal(err)
	}
	f.DecRef()
	fd := int(fd32)
	buf := make([]byte, 64)
	tests := []struct {
		name  string
		call  func() (any, error)
		want  any
		errno error
	}{
		{name: "read reaches the file's own read op",
			call: func() (any, error) { n, err := g.Read(fd, buf); return string(buf[:n]), err }, want: greeting},
		{name: "fstat shows the file's own stat",
			call: func() (any, error) { st, err := g.Fstat(fd); return st.Mode, err }, want: uint32(unix.S_IFIFO | 0o600)},
		{name: "the file's own ioctl answers a command do_vfs_ioctl does not know",
			call: func() (any, error) { r, err := g.Ioctl(fd, 0x4242, []byte("echo")); return string(r), err }, want: "echo"},
		{name: "F_GETFL shows the default status flags of a new description",
			call: func() (any, error) { return g.GetFL(fd) }, want: unix.O_RDWR},
		{name: "pread64 without FMODE_PREAD is ESPIPE",
			call: func() (any, error) { return g.Pread(fd, buf, 0) }, errno: unix.ESPIPE},
		{name: "write without a write op is EINVAL",
			call: func() (any, error) { return g.Write(fd, buf) }, errno: unix.EINVAL},
		{name: "lseek without llseek is ESPIPE",
			call: func() (any, error) { return g.Seek(fd, 0, unix.SEEK_SET) }, errno: unix.ESPIPE},
		{name: "fallocate of a file that is not regular is ENODEV",
			call: func() (any, error) { return nil, g.Fallocate(fd, 0, 0, 10) }, errno: unix.ENODEV},
		{name: "FIOQSIZE of a file that is not regular is ENOTTY",
			call: func() (any, error) { return g.Ioctl(fd, vfs.FIOQSIZE, make([]byte, 8)) }, errno: unix.ENOTTY},
		{name: "FIOCLEX sets FD_CLOEXEC on any file",
			call: func() (any, error) {
				if _, err := g.Ioctl(fd, vfs.FIOCLEX, nil); err != nil {
					return nil, err
				}
				return g.GetFD(fd)
			}, want: unix.FD_CLOEXEC},
		{name: "a seal fcntl goes to the file, which does not know it",
			call: func() (any, error) { return g.GetSeals(fd) }, errno: unix.EINVAL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.call()
			if tc.errno != nil {
				if !errors.Is(err, tc.errno) {
					t.Fatalf("got %v, %v; want %v", got, err, tc.errno)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %#v, %v; want %#v", got, err, tc.want)
			}
		})
	}
	// Closing the last fd drops the last reference.
	dup := mustFD(t)(g.Dup(fd))
	if err := g.Close(fd); err != nil {
		t.Fatal(err)
	}
	if n := f.refs.Load(); n != 1 {
		t.Fatalf("%d references with one fd left, want 1", n)
	}
	if err := g.Close(dup); err != nil {
		t.Fatal(err)
	}
	if n := f.refs.Load(); n != 0 {
		t.Fatalf("%d references after the last close, want 0", n)
	}
}
