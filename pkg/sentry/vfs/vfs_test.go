package vfs_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"sync/atomic"
	"testing"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// anonFile is a file type with nothing but the defaults: what a new kind of
// anonymous-inode file gets before it implements any op.
type anonFile struct {
	vfs.FileDescriptionDefaultImpl
	refs atomic.Int64
}

func (f *anonFile) IncRef() { f.refs.Add(1) }
func (f *anonFile) DecRef() { f.refs.Add(-1) }

// pathFile is a file opened through a path (FMODE_PREAD, FMODE_PWRITE)
// that has no read or write op, as /dev/liveupdate.
type pathFile struct{ anonFile }

func (f *pathFile) FMode() vfs.FMode { return vfs.FModePRead | vfs.FModePWrite }

// errOf returns the error of a call, whatever else it returns.
func errOf[T any](_ T, err error) error { return err }

func TestDefaultsGiveLinuxErrnos(t *testing.T) {
	w := io.Discard
	r := strings.NewReader("data")
	tests := []struct {
		name  string
		file  vfs.FileDescription
		flags int
		call  func(f vfs.FileDescription, flags int) error
		want  error
	}{
		{name: "read of a file without a read op is EINVAL", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.Read(f, fl, w, 4)) }, want: unix.EINVAL},
		{name: "write of a file without a write op is EINVAL", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.Write(f, fl, r, 4)) }, want: unix.EINVAL},
		{name: "read of an fd opened write-only is EBADF before the missing op", file: &anonFile{}, flags: unix.O_WRONLY,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.Read(f, fl, w, 4)) }, want: unix.EBADF},
		{name: "write of an fd opened read-only is EBADF before the missing op", file: &anonFile{}, flags: unix.O_RDONLY,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.Write(f, fl, r, 4)) }, want: unix.EBADF},
		{name: "an access mode of 3 neither reads nor writes", file: &anonFile{}, flags: unix.O_ACCMODE,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.Read(f, fl, w, 4)) }, want: unix.EBADF},
		{name: "pread64 of an anonymous inode is ESPIPE", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.PRead(f, fl, w, 4, 0)) }, want: unix.ESPIPE},
		{name: "pwrite64 of an anonymous inode is ESPIPE", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.PWrite(f, fl, r, 4, 0)) }, want: unix.ESPIPE},
		{name: "pwrite64 of an anonymous inode is ESPIPE even on a read-only fd", file: &anonFile{}, flags: unix.O_RDONLY,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.PWrite(f, fl, r, 4, 0)) }, want: unix.ESPIPE},
		{name: "pread64 of a file opened by path without a read op is EINVAL", file: &pathFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.PRead(f, fl, w, 4, 0)) }, want: unix.EINVAL},
		{name: "pread64 of a file opened by path on a write-only fd is EBADF", file: &pathFile{}, flags: unix.O_WRONLY,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.PRead(f, fl, w, 4, 0)) }, want: unix.EBADF},
		{name: "pwrite64 of a file opened by path on a read-only fd is EBADF", file: &pathFile{}, flags: unix.O_RDONLY,
			call: func(f vfs.FileDescription, fl int) error { return errOf(vfs.PWrite(f, fl, r, 4, 0)) }, want: unix.EBADF},
		{name: "lseek of a file without llseek is ESPIPE", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error { return errOf(vfs.Seek(f, 0, unix.SEEK_SET)) }, want: unix.ESPIPE},
		{name: "lseek with a whence above SEEK_MAX is EINVAL before ESPIPE", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error { return errOf(vfs.Seek(f, 0, 99)) }, want: unix.EINVAL},
		{name: "ftruncate of a file that is not regular is EINVAL", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Truncate(f, fl, 10) }, want: unix.EINVAL},
		{name: "ftruncate of a read-only fd is EINVAL", file: &anonFile{}, flags: unix.O_RDONLY,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Truncate(f, fl, 10) }, want: unix.EINVAL},
		{name: "fallocate of a file that is not regular is ENODEV", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Fallocate(f, fl, 0, 0, 10) }, want: unix.ENODEV},
		{name: "fallocate of a read-only fd is EBADF before ENODEV", file: &anonFile{}, flags: unix.O_RDONLY,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Fallocate(f, fl, 0, 0, 10) }, want: unix.EBADF},
		{name: "fallocate of length 0 is EINVAL before the access mode", file: &anonFile{}, flags: unix.O_RDONLY,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Fallocate(f, fl, 0, 0, 0) }, want: unix.EINVAL},
		{name: "fallocate at a negative offset is EINVAL", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Fallocate(f, fl, 0, -1, 10) }, want: unix.EINVAL},
		{name: "fallocate with an unknown mode bit is EOPNOTSUPP", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error { return vfs.Fallocate(f, fl, 0x4000, 0, 10) }, want: unix.EOPNOTSUPP},
		{name: "fallocate punching a hole without KEEP_SIZE is EOPNOTSUPP", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, fl int) error {
				return vfs.Fallocate(f, fl, unix.FALLOC_FL_PUNCH_HOLE, 0, 10)
			}, want: unix.EOPNOTSUPP},
		{name: "an ioctl the file does not know is ENOTTY", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error { return errOf(vfs.Ioctl(f, nil, 0x1234, nil)) }, want: unix.ENOTTY},
		{name: "FIONBIO is accepted by every file", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error {
				return errOf(vfs.Ioctl(f, nil, vfs.FIONBIO, []byte{1, 0, 0, 0}))
			}},
		{name: "FIONBIO with an argument shorter than an int is EFAULT", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error { return errOf(vfs.Ioctl(f, nil, vfs.FIONBIO, []byte{1})) }, want: unix.EFAULT},
		{name: "FIOASYNC turning notification on is ENOTTY", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error {
				return errOf(vfs.Ioctl(f, nil, vfs.FIOASYNC, []byte{1, 0, 0, 0}))
			}, want: unix.ENOTTY},
		{name: "FIOASYNC turning notification off is accepted", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error {
				return errOf(vfs.Ioctl(f, nil, vfs.FIOASYNC, []byte{0, 0, 0, 0}))
			}},
		{name: "FIONREAD of a file that is not regular goes to the file's ioctl", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error { return errOf(vfs.Ioctl(f, nil, vfs.FIONREAD, nil)) }, want: unix.ENOTTY},
		{name: "FIOQSIZE of a file that is not regular is ENOTTY", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error {
				return errOf(vfs.Ioctl(f, nil, vfs.FIOQSIZE, make([]byte, 8)))
			}, want: unix.ENOTTY},
		{name: "the seal fcntls of a file that is not a memfd are EINVAL", file: &anonFile{}, flags: unix.O_RDWR,
			call: func(f vfs.FileDescription, _ int) error { return errOf(f.Fcntl(unix.F_GET_SEALS, 0)) }, want: unix.EINVAL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(tc.file, tc.flags); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestDefaultsDescribeAnAnonymousInode(t *testing.T) {
	f := &anonFile{}
	if got, want := f.Stat(), (abiguest.Stat{Blksize: 4096, Mode: 0o600, Nlink: 1}); got != want {
		t.Errorf("Stat() = %+v, want %+v", got, want)
	}
	if got := f.StatusFlags(); got != unix.O_RDWR {
		t.Errorf("StatusFlags() = %#x, want O_RDWR", got)
	}
	if got := f.FMode(); got != 0 {
		t.Errorf("FMode() = %#x, want 0", got)
	}
}

// newMemfd returns a memfd holding n bytes of pattern, its position at pos.
func newMemfd(t *testing.T, n, pos int64) *memfd.File {
	t.Helper()
	mf, err := pgalloc.New(pgalloc.Options{Size: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mf.Close() })
	f, err := memfd.Create(mf, "vfs", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.DecRef)
	if _, err := vfs.Write(f, f.StatusFlags(), bytes.NewReader(bytes.Repeat([]byte("ab"), int(n/2))), n); err != nil {
		t.Fatal(err)
	}
	if _, err := vfs.Seek(f, pos, unix.SEEK_SET); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestRegularFileOps(t *testing.T) {
	tests := []struct {
		name    string
		size    int64
		pos     int64
		cmd     uint32
		arg     []byte
		want    uint64
		wantErr error
	}{
		{name: "FIONREAD of a memfd replies with the bytes from the position to the end", size: 10000, pos: 1000,
			cmd: vfs.FIONREAD, arg: make([]byte, 4), want: 9000},
		{name: "FIONREAD of a memfd positioned past the end replies with a negative count", size: 100, pos: 300,
			cmd: vfs.FIONREAD, arg: make([]byte, 4), want: uint64(uint32(0xffffff38))},
		{name: "FIONREAD of a memfd with an argument shorter than an int is EFAULT", size: 100,
			cmd: vfs.FIONREAD, arg: make([]byte, 3), wantErr: unix.EFAULT},
		{name: "FIOQSIZE of a memfd replies with its allocated bytes", size: 10000,
			cmd: vfs.FIOQSIZE, arg: make([]byte, 8), want: 3 * 4096},
		{name: "FIOQSIZE of a memfd with an argument shorter than a loff_t is EFAULT", size: 100,
			cmd: vfs.FIOQSIZE, arg: make([]byte, 4), wantErr: unix.EFAULT},
		{name: "another ioctl of a memfd is ENOTTY", size: 100, cmd: 0x1234, wantErr: unix.ENOTTY},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newMemfd(t, tc.size, tc.pos)
			reply, err := vfs.Ioctl(f, nil, tc.cmd, tc.arg)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			var got uint64
			switch len(reply) {
			case 4:
				got = uint64(binary.LittleEndian.Uint32(reply))
			case 8:
				got = binary.LittleEndian.Uint64(reply)
			default:
				t.Fatalf("reply of %d bytes", len(reply))
			}
			if got != tc.want {
				t.Errorf("reply %d, want %d", got, tc.want)
			}
		})
	}
}

func TestMemfdThroughTheOpsTable(t *testing.T) {
	f := newMemfd(t, 8, 2)
	var b bytes.Buffer
	if n, err := vfs.Read(f, f.StatusFlags(), &b, 4); err != nil || n != 4 || b.String() != "abab" {
		t.Fatalf("read from position 2: %d, %q, %v", n, b.String(), err)
	}
	if pos, err := vfs.Seek(f, 0, unix.SEEK_CUR); err != nil || pos != 6 {
		t.Fatalf("position after read: %d, %v, want 6", pos, err)
	}
	b.Reset()
	if n, err := vfs.PRead(f, f.StatusFlags(), &b, 3, 1); err != nil || n != 3 || b.String() != "bab" {
		t.Fatalf("pread at 1: %d, %q, %v", n, b.String(), err)
	}
	if n, err := vfs.PWrite(f, f.StatusFlags(), strings.NewReader("zz"), 2, 0); err != nil || n != 2 {
		t.Fatalf("pwrite at 0: %d, %v", n, err)
	}
	if pos, err := vfs.Seek(f, 0, unix.SEEK_CUR); err != nil || pos != 6 {
		t.Fatalf("position after pread and pwrite: %d, %v, want 6", pos, err)
	}
	if err := vfs.Truncate(f, f.StatusFlags(), 4096); err != nil {
		t.Fatal(err)
	}
	if err := vfs.Fallocate(f, f.StatusFlags(), 0, 0, 8192); err != nil {
		t.Fatal(err)
	}
	if st := f.Stat(); st.Size != 8192 || st.Mode&unix.S_IFMT != unix.S_IFREG {
		t.Errorf("after ftruncate and fallocate: %+v", st)
	}
	if seals, err := f.Fcntl(unix.F_GET_SEALS, 0); err != nil || seals != unix.F_SEAL_SEAL {
		t.Errorf("F_GET_SEALS of a memfd without MFD_ALLOW_SEALING: %#x, %v", seals, err)
	}
	if err := errOf(f.Fcntl(unix.F_ADD_SEALS, unix.F_SEAL_GROW)); !errors.Is(err, unix.EPERM) {
		t.Errorf("F_ADD_SEALS with F_SEAL_SEAL set: %v, want EPERM", err)
	}
	if err := errOf(f.Fcntl(unix.F_SETLK, 0)); !errors.Is(err, unix.EINVAL) {
		t.Errorf("an fcntl a memfd does not know: %v, want EINVAL", err)
	}
}
