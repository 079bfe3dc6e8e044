package memfd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

func newTestFile(t testing.TB, mf *pgalloc.MemoryFile, flags uint) *File {
	t.Helper()
	f, err := Create(mf, "test", flags)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(f.DecRef)
	return f
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}

func mustPwrite(t testing.TB, f *File, b []byte, off int64) {
	t.Helper()
	if n, err := f.Pwrite(b, off); err != nil || n != len(b) {
		t.Fatalf("Pwrite(%d bytes, %d) = %d, %v", len(b), off, n, err)
	}
}

func readAll(t testing.TB, f *File, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	k, err := f.Pread(b, off)
	if err != nil {
		t.Fatalf("Pread(%d, %d): %v", n, off, err)
	}
	return b[:k]
}

func TestCreate(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	// 1 GiB huge pages exist only where the host has that hstate, as in
	// Linux.
	var gigantic error
	if !hugePageShifts()[30] {
		gigantic = unix.ENODEV
	}
	for _, tc := range []struct {
		name      string
		memfdName string
		flags     uint
		wantErr   error
		wantSeals uint32
		wantMode  uint32
		wantName  string
		hugetlb   bool
		blksize   int64
	}{
		{name: "a plain memfd is executable and sealed against sealing", memfdName: "a", wantSeals: unix.F_SEAL_SEAL, wantMode: unix.S_IFREG | 0777, wantName: "memfd:a", blksize: 4096},
		{name: "MFD_ALLOW_SEALING starts without seals", memfdName: "b", flags: unix.MFD_ALLOW_SEALING | unix.MFD_CLOEXEC, wantMode: unix.S_IFREG | 0777, wantName: "memfd:b", blksize: 4096},
		{name: "MFD_NOEXEC_SEAL gives mode 0666 and F_SEAL_EXEC and allows sealing", memfdName: "c", flags: unix.MFD_NOEXEC_SEAL, wantSeals: unix.F_SEAL_EXEC, wantMode: unix.S_IFREG | 0666, wantName: "memfd:c", blksize: 4096},
		{name: "MFD_EXEC alone is sealed against sealing", memfdName: "d", flags: unix.MFD_EXEC, wantSeals: unix.F_SEAL_SEAL, wantMode: unix.S_IFREG | 0777, wantName: "memfd:d", blksize: 4096},
		{name: "MFD_EXEC with MFD_NOEXEC_SEAL is EINVAL", flags: unix.MFD_EXEC | unix.MFD_NOEXEC_SEAL, wantErr: unix.EINVAL},
		{name: "an unknown flag is EINVAL", flags: 0x20, wantErr: unix.EINVAL},
		{name: "a huge page size without MFD_HUGETLB is EINVAL", flags: unix.MFD_HUGE_2MB, wantErr: unix.EINVAL},
		{name: "only the low 32 bits of the flags count", memfdName: "e", flags: 1<<32 | unix.MFD_ALLOW_SEALING, wantMode: unix.S_IFREG | 0777, wantName: "memfd:e", blksize: 4096},
		{name: "a name of 249 bytes is accepted", memfdName: strings.Repeat("x", 249), wantSeals: unix.F_SEAL_SEAL, wantMode: unix.S_IFREG | 0777, wantName: "memfd:" + strings.Repeat("x", 249), blksize: 4096},
		{name: "a name of 250 bytes is EINVAL", memfdName: strings.Repeat("x", 250), wantErr: unix.EINVAL},
		{name: "a name is cut at its first NUL", memfdName: "ab\x00" + strings.Repeat("x", 300), wantSeals: unix.F_SEAL_SEAL, wantMode: unix.S_IFREG | 0777, wantName: "memfd:ab", blksize: 4096},
		{name: "MFD_HUGETLB with the default size is a 2 MiB hugetlb file", memfdName: "h", flags: unix.MFD_HUGETLB, wantSeals: unix.F_SEAL_SEAL, wantMode: unix.S_IFREG | 0777, wantName: "memfd:h", hugetlb: true, blksize: 2 << 20},
		{name: "MFD_HUGETLB with MFD_HUGE_1GB is a 1 GiB hugetlb file where the host has 1 GiB pages, else ENODEV", memfdName: "g", flags: unix.MFD_HUGETLB | unix.MFD_HUGE_1GB | unix.MFD_ALLOW_SEALING, wantMode: unix.S_IFREG | 0777, wantName: "memfd:g", hugetlb: true, blksize: 1 << 30, wantErr: gigantic},
		{name: "MFD_HUGETLB with a size the platform lacks is ENODEV", flags: unix.MFD_HUGETLB | unix.MFD_HUGE_8MB, wantErr: unix.ENODEV},
		{name: "a long name is EINVAL before a bad huge page size", memfdName: strings.Repeat("x", 250), flags: unix.MFD_HUGETLB | unix.MFD_HUGE_8MB, wantErr: unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Create(mf, tc.memfdName, tc.flags)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("Create(%q, %#x) = %v, want %v", tc.memfdName, tc.flags, err, tc.wantErr)
			}
			if err != nil {
				return
			}
			defer f.DecRef()
			seals, _ := f.GetSeals()
			st := f.Stat()
			if seals != tc.wantSeals || st.Mode != tc.wantMode || f.Name() != tc.wantName || f.IsHugetlb() != tc.hugetlb || st.Blksize != tc.blksize || st.Nlink != 0 {
				t.Fatalf("got seals %#x mode %#o name %q hugetlb %v blksize %d nlink %d; want %#x %#o %q %v %d 0",
					seals, st.Mode, f.Name(), f.IsHugetlb(), st.Blksize, st.Nlink, tc.wantSeals, tc.wantMode, tc.wantName, tc.hugetlb, tc.blksize)
			}
			if want := hostStatusFlags(t); f.StatusFlags() != want {
				t.Fatalf("StatusFlags = %#x, the host's memfd says %#x", f.StatusFlags(), want)
			}
		})
	}
}

func TestSeals(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name  string
		flags uint
		seals uint32
		op    func(f *File) error
		want  error
	}{
		{name: "sealing a file without MFD_ALLOW_SEALING is EPERM", seals: unix.F_SEAL_WRITE, op: func(*File) error { return nil }, want: nil},
		{name: "an unknown seal is EINVAL", flags: unix.MFD_ALLOW_SEALING, seals: 0x40, op: func(*File) error { return nil }},
		{name: "F_SEAL_WRITE makes writes EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE,
			op: func(f *File) error { _, err := f.Pwrite([]byte("x"), 0); return err }, want: unix.EPERM},
		{name: "F_SEAL_FUTURE_WRITE makes writes EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_FUTURE_WRITE,
			op: func(f *File) error { _, err := f.Write([]byte("x")); return err }, want: unix.EPERM},
		{name: "F_SEAL_WRITE makes hole punching EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE,
			op: func(f *File) error {
				return f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
			}, want: unix.EPERM},
		{name: "F_SEAL_WRITE still lets fallocate allocate", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE,
			op: func(f *File) error { return f.Fallocate(0, 0, 8192) }},
		{name: "F_SEAL_WRITE still lets the file be truncated", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_WRITE,
			op: func(f *File) error { return f.Truncate(100) }},
		{name: "F_SEAL_SHRINK makes shrinking EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_SHRINK,
			op: func(f *File) error { return f.Truncate(4095) }, want: unix.EPERM},
		{name: "F_SEAL_SHRINK lets the file grow", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_SHRINK,
			op: func(f *File) error { return f.Truncate(8192) }},
		{name: "F_SEAL_GROW makes growing EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_GROW,
			op: func(f *File) error { return f.Truncate(4097) }, want: unix.EPERM},
		{name: "F_SEAL_GROW makes fallocate past the end EPERM even with KEEP_SIZE", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_GROW,
			op: func(f *File) error { return f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, 4000, 200) }, want: unix.EPERM},
		{name: "F_SEAL_GROW makes a write past the end EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_GROW,
			op: func(f *File) error { _, err := f.Pwrite([]byte("xy"), 4096); return err }, want: unix.EPERM},
		{name: "F_SEAL_GROW lets a write crossing the end write up to the end", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_GROW,
			op: func(f *File) error {
				if n, err := f.Pwrite([]byte("xy"), 4095); n != 1 || err != nil {
					return fmt.Errorf("Pwrite = %d, %v; want 1", n, err)
				}
				return nil
			}},
		{name: "F_SEAL_SEAL makes further sealing EPERM", flags: unix.MFD_ALLOW_SEALING, seals: unix.F_SEAL_SEAL,
			op: func(f *File) error { return f.AddSeals(0) }, want: unix.EPERM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, tc.flags)
			if err := f.Truncate(4096); err != nil {
				t.Fatal(err)
			}
			err := f.AddSeals(tc.seals)
			switch {
			case tc.flags&unix.MFD_ALLOW_SEALING == 0:
				if !errors.Is(err, unix.EPERM) {
					t.Fatalf("AddSeals on a file without MFD_ALLOW_SEALING = %v, want EPERM", err)
				}
				return
			case tc.seals&^allSeals != 0:
				if !errors.Is(err, unix.EINVAL) {
					t.Fatalf("AddSeals(%#x) = %v, want EINVAL", tc.seals, err)
				}
				return
			case err != nil:
				t.Fatalf("AddSeals(%#x): %v", tc.seals, err)
			}
			if got, _ := f.GetSeals(); got != tc.seals {
				t.Fatalf("GetSeals = %#x, want %#x", got, tc.seals)
			}
			if err := tc.op(f); !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
				t.Fatalf("operation = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestSealExecImpliesWriteSealsOnAnExecutableFile(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name  string
		flags uint
		want  uint32
	}{
		{name: "F_SEAL_EXEC on an executable file adds the write seals", flags: unix.MFD_ALLOW_SEALING, want: 0x3e},
		{name: "F_SEAL_EXEC on a MFD_NOEXEC_SEAL file adds nothing", flags: unix.MFD_NOEXEC_SEAL, want: unix.F_SEAL_EXEC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, tc.flags)
			if err := f.AddSeals(unix.F_SEAL_EXEC); err != nil {
				t.Fatal(err)
			}
			if got, _ := f.GetSeals(); got != tc.want {
				t.Fatalf("seals = %#x, want %#x", got, tc.want)
			}
		})
	}
}

func TestGrowSealedWriteStopsAtThePageOfTheEnd(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name    string
		off     int64
		n       int
		want    int
		wantErr error
	}{
		{name: "a write from 0 across the end writes the first page", off: 0, n: 8000, want: 4096},
		{name: "a write from inside the first page writes to its end", off: 100, n: 8000, want: 3996},
		{name: "a write inside the end's page across the end is EPERM", off: 4990, n: 20, wantErr: unix.EPERM},
		{name: "a write ending at the end is whole", off: 4990, n: 10, want: 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, unix.MFD_ALLOW_SEALING)
			if err := f.Truncate(5000); err != nil {
				t.Fatal(err)
			}
			if err := f.AddSeals(unix.F_SEAL_GROW); err != nil {
				t.Fatal(err)
			}
			n, err := f.Pwrite(pattern(tc.n, 1), tc.off)
			if n != tc.want || !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("Pwrite = %d, %v; want %d, %v", n, err, tc.want, tc.wantErr)
			}
			if f.Size() != 5000 {
				t.Fatalf("size %d after a grow-sealed write, want 5000", f.Size())
			}
		})
	}
}

func TestFrozen(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name string
		op   func(f *File) error
		want error
	}{
		{name: "a write inside the file works", op: func(f *File) error { _, err := f.Pwrite([]byte("abc"), 10); return err }},
		{name: "a write crossing the end writes the pages before the end", op: func(f *File) error {
			if n, err := f.Pwrite(make([]byte, 5000), 4000); n != 4192 || err != nil {
				return fmt.Errorf("Pwrite = %d, %v; want 4192", n, err)
			}
			return nil
		}},
		{name: "a write past the end is EPERM", op: func(f *File) error { _, err := f.Pwrite([]byte("a"), 1<<20); return err }, want: unix.EPERM},
		{name: "an empty write past the end works", op: func(f *File) error { _, err := f.Pwrite(nil, 1<<20); return err }},
		{name: "a read works", op: func(f *File) error { _, err := f.Pread(make([]byte, 100), 0); return err }},
		{name: "a seek works", op: func(f *File) error { _, err := f.Seek(0, unix.SEEK_HOLE); return err }},
		{name: "truncating to half is EPERM", op: func(f *File) error { return f.Truncate(4096) }, want: unix.EPERM},
		{name: "growing is EPERM", op: func(f *File) error { return f.Truncate(1 << 20) }, want: unix.EPERM},
		{name: "truncating to the same size works", op: func(f *File) error { return f.Truncate(8192) }},
		{name: "fallocate inside the file is EPERM", op: func(f *File) error { return f.Fallocate(0, 0, 4096) }, want: unix.EPERM},
		{name: "fallocate with KEEP_SIZE is EPERM", op: func(f *File) error { return f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, 0, 4096) }, want: unix.EPERM},
		{name: "punching a hole is EPERM", op: func(f *File) error {
			return f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
		}, want: unix.EPERM},
		{name: "a bad fallocate range is still EINVAL", op: func(f *File) error { return f.Fallocate(0, -1, 4096) }, want: unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, 0)
			data := pattern(8192, 3)
			mustPwrite(t, f, data, 0)
			f.Lock()
			f.SetFrozen(true)
			f.Unlock()
			if !f.Frozen() {
				t.Fatal("Frozen() = false after SetFrozen(true)")
			}
			if err := tc.op(f); !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if f.Size() != 8192 {
				t.Fatalf("size %d, want 8192", f.Size())
			}
			f.Lock()
			f.SetFrozen(false)
			f.Unlock()
			if err := f.Truncate(4096); err != nil {
				t.Fatalf("Truncate after unfreezing: %v", err)
			}
		})
	}
}

func TestLargeFolios(t *testing.T) {
	const huge = 2 << 20
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name       string
		setup      func(t *testing.T, f *File)
		wantHuge   uint64
		wantBlocks int64
		check      func(t *testing.T, f *File)
	}{
		{
			name:       "a write covering an aligned 2 MiB range uses one order-9 folio",
			setup:      func(t *testing.T, f *File) { mustPwrite(t, f, pattern(huge+100, 1), huge-50) },
			wantHuge:   1,
			wantBlocks: (huge + 2*4096) / 512,
			check: func(t *testing.T, f *File) {
				if got := readAll(t, f, huge-50, huge+100); !bytes.Equal(got, pattern(huge+100, 1)) {
					t.Fatal("contents differ")
				}
			},
		},
		{
			name:       "a write not covering an aligned 2 MiB range uses order-0 folios",
			setup:      func(t *testing.T, f *File) { mustPwrite(t, f, pattern(huge, 1), 4096) },
			wantBlocks: huge / 512,
		},
		{
			name: "punching a page out of a large folio splits it",
			setup: func(t *testing.T, f *File) {
				mustPwrite(t, f, pattern(huge, 2), 0)
				if err := f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192, 4096); err != nil {
					t.Fatal(err)
				}
			},
			wantBlocks: (huge - 4096) / 512,
			check: func(t *testing.T, f *File) {
				want := pattern(huge, 2)
				clear(want[8192 : 8192+4096])
				if got := readAll(t, f, 0, huge); !bytes.Equal(got, want) {
					t.Fatal("contents differ after the punch")
				}
				if h, _ := f.Seek(0, unix.SEEK_HOLE); h != 8192 {
					t.Fatalf("SEEK_HOLE = %d, want 8192", h)
				}
			},
		},
		{
			name: "zeroing inside a page of a large folio keeps it whole",
			setup: func(t *testing.T, f *File) {
				mustPwrite(t, f, pattern(huge, 2), 0)
				if err := f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 100, 200); err != nil {
					t.Fatal(err)
				}
			},
			wantHuge:   1,
			wantBlocks: huge / 512,
			check: func(t *testing.T, f *File) {
				want := pattern(huge, 2)
				clear(want[100:300])
				if got := readAll(t, f, 0, huge); !bytes.Equal(got, want) {
					t.Fatal("contents differ after the punch")
				}
			},
		},
		{
			name: "truncating into a large folio splits it and zeroes the tail of the last page",
			setup: func(t *testing.T, f *File) {
				mustPwrite(t, f, pattern(huge, 4), 0)
				if err := f.Truncate(5000); err != nil {
					t.Fatal(err)
				}
				if err := f.Truncate(huge); err != nil {
					t.Fatal(err)
				}
			},
			wantBlocks: 2 * 4096 / 512,
			check: func(t *testing.T, f *File) {
				want := make([]byte, huge)
				copy(want, pattern(5000, 4))
				if got := readAll(t, f, 0, huge); !bytes.Equal(got, want) {
					t.Fatal("contents differ after shrinking and growing")
				}
			},
		},
		{
			name:       "fallocate of an aligned 2 MiB range uses one order-9 folio that is a hole for SEEK_DATA",
			setup:      func(t *testing.T, f *File) { must(t, f.Fallocate(0, 0, huge)) },
			wantHuge:   1,
			wantBlocks: huge / 512,
			check: func(t *testing.T, f *File) {
				if _, err := f.Seek(0, unix.SEEK_DATA); !errors.Is(err, unix.ENXIO) {
					t.Fatalf("SEEK_DATA over fallocated pages = %v, want ENXIO", err)
				}
			},
		},
		{
			name: "writing one page of a fallocated large folio splits it so only that page is data",
			setup: func(t *testing.T, f *File) {
				must(t, f.Fallocate(0, 0, huge))
				mustPwrite(t, f, []byte("x"), 3*4096+5)
			},
			wantBlocks: huge / 512,
			check: func(t *testing.T, f *File) {
				if d, _ := f.Seek(0, unix.SEEK_DATA); d != 3*4096 {
					t.Fatalf("SEEK_DATA = %d, want %d", d, 3*4096)
				}
				if h, _ := f.Seek(3*4096, unix.SEEK_HOLE); h != 4*4096 {
					t.Fatalf("SEEK_HOLE = %d, want %d", h, 4*4096)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Create(mf, "large", 0)
			if err != nil {
				t.Fatal(err)
			}
			tc.setup(t, f)
			if got := mf.Stats().Folios[hugeOrder]; got != tc.wantHuge {
				t.Errorf("%d order-9 folios, want %d", got, tc.wantHuge)
			}
			if got := f.Stat().Blocks; got != tc.wantBlocks {
				t.Errorf("st_blocks = %d, want %d", got, tc.wantBlocks)
			}
			if tc.check != nil {
				tc.check(t, f)
			}
			f.DecRef()
			mf.Drain()
			if st := mf.Stats(); st.AllocatedPages != 0 {
				t.Fatalf("%d pages allocated after the last DecRef", st.AllocatedPages)
			}
		})
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// foliosOf returns the folios of rs, one by one.
func foliosOf(rs []CacheRun) []CacheFolio {
	var out []CacheFolio
	for _, c := range rs {
		for i := range uint64(c.Run.Count) {
			out = append(out, c.Folio(i))
		}
	}
	return out
}

// flagsOf returns the page cache's folios.
func flagsOf(f *File) []CacheFolio {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []CacheFolio
	f.ascendLocked(0, maxIndex, func(e entry) bool {
		out = append(out, cacheFolio(e))
		return true
	})
	return out
}

func TestFolioFlags(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name                    string
		op                      func(t *testing.T, f *File)
		wantDirty, wantUptodate bool
	}{
		{name: "a written folio is dirty and uptodate", op: func(t *testing.T, f *File) { mustPwrite(t, f, []byte("x"), 0) }, wantDirty: true, wantUptodate: true},
		{name: "a fallocated folio is dirty and not uptodate", op: func(t *testing.T, f *File) { must(t, f.Fallocate(0, 0, 10)) }, wantDirty: true},
		{name: "a folio fallocated twice is uptodate", op: func(t *testing.T, f *File) {
			must(t, f.Fallocate(0, 0, 10))
			must(t, f.Fallocate(0, 0, 10))
		}, wantDirty: true, wantUptodate: true},
		{name: "a fallocated folio written to is uptodate", op: func(t *testing.T, f *File) {
			must(t, f.Fallocate(0, 0, 10))
			mustPwrite(t, f, []byte("x"), 5)
		}, wantDirty: true, wantUptodate: true},
		{name: "a folio PinFolios fills a hole with is clean and uptodate", op: func(t *testing.T, f *File) {
			must(t, f.Truncate(10))
			f.Lock()
			fs, err := f.PinFolios()
			f.Unlock()
			must(t, err)
			f.UnpinFolios(fs)
		}, wantUptodate: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, 0)
			tc.op(t, f)
			fs := flagsOf(f)
			if len(fs) != 1 || fs[0].Dirty != tc.wantDirty || fs[0].Uptodate != tc.wantUptodate {
				t.Fatalf("folios %+v, want one with dirty %v uptodate %v", fs, tc.wantDirty, tc.wantUptodate)
			}
		})
	}
}

func TestPinFolios(t *testing.T) {
	const huge = 2 << 20
	mf := newTestMemoryFile(t, 64<<20)
	f := newTestFile(t, mf, unix.MFD_ALLOW_SEALING)
	must(t, f.Truncate(huge+3*4096+10))
	mustPwrite(t, f, []byte("one"), 4096)
	must(t, f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, huge+4096, 4096))
	must(t, f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, 8*huge, 4096)) // Beyond the end: not pinned.

	f.Lock()
	rs, err := f.PinFolios()
	f.Unlock()
	must(t, err)
	fs := foliosOf(rs)
	// Page 0, page 1 (written), pages 2..511, then at 512 (huge): page 512,
	// 513 (fallocated), 514, 515.
	var next uint64
	for i, c := range fs {
		if c.Index != next {
			t.Fatalf("folio %d at index %d, want %d (index order, no gaps)", i, c.Index, next)
		}
		next = c.Index + c.Folio.Pages()
		if _, refs, ok := mf.Lookup(c.Folio.PFN); !ok || refs != 2 {
			t.Fatalf("folio %d has %d references while pinned, want 2", i, refs)
		}
		wantUptodate := c.Index != 513
		if c.Uptodate != wantUptodate || c.Dirty != (c.Index == 1 || c.Index == 513) {
			t.Fatalf("folio at index %d: dirty %v uptodate %v", c.Index, c.Dirty, c.Uptodate)
		}
	}
	if next != 516 {
		t.Fatalf("pinned folios end at index %d, want 516", next)
	}
	if err := f.AddSeals(unix.F_SEAL_WRITE); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("F_SEAL_WRITE while pinned = %v, want EBUSY", err)
	}
	if got := readAll(t, f, 4096, 3); string(got) != "one" {
		t.Fatalf("contents changed by pinning: %q", got)
	}
	f.UnpinFolios(rs)
	for _, c := range fs {
		if _, refs, ok := mf.Lookup(c.Folio.PFN); !ok || refs != 1 {
			t.Fatalf("folio at index %d has %d references after unpinning, want 1", c.Index, refs)
		}
	}
	if err := f.AddSeals(unix.F_SEAL_WRITE); err != nil {
		t.Fatalf("F_SEAL_WRITE after unpinning: %v", err)
	}
	if want := int64(516+1) * 8; f.Stat().Blocks != want {
		t.Fatalf("st_blocks = %d after filling the holes, want %d", f.Stat().Blocks, want)
	}
}

func TestPinFoliosOfAnEmptyFileReturnsNothing(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f := newTestFile(t, mf, 0)
	f.Lock()
	fs, err := f.PinFolios()
	f.Unlock()
	if err != nil || len(fs) != 0 {
		t.Fatalf("PinFolios of an empty file = %v, %v", fs, err)
	}
	f.UnpinFolios(fs)
}

func TestPinFoliosThatCannotFitChangesNothing(t *testing.T) {
	mf := newTestMemoryFile(t, 8<<20)
	for _, tc := range []struct {
		name string
		size int64
	}{
		{name: "a file larger than the memory file fails at once", size: 1 << 40},
		{name: "a file whose holes exhaust the memory file fails and frees them", size: 7 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, 0)
			must(t, f.Truncate(tc.size))
			hog, err := mf.Allocate(8) // 1 MiB: the 7 MiB of holes cannot all fit.
			must(t, err)
			defer mf.DecRef(hog)
			f.Lock()
			_, err = f.PinFolios()
			f.Unlock()
			if !errors.Is(err, unix.ENOMEM) {
				t.Fatalf("PinFolios = %v, want ENOMEM", err)
			}
			if f.Stat().Blocks != 0 || f.pins.Load() != 0 {
				t.Fatalf("after a failed PinFolios: %d blocks, %d pins", f.Stat().Blocks, f.pins.Load())
			}
		})
	}
}

func TestNewFromFolios(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	alloc := func(order int, fill byte) pgalloc.Folio {
		fo, err := mf.Allocate(order)
		must(t, err)
		b := mf.Bytes(fo)
		for i := range b {
			b[i] = fill
		}
		return fo
	}
	t.Run("a retrieved file has the folios, size and position and no seals allowed", func(t *testing.T) {
		a, b := alloc(0, 'a'), alloc(9, 'b')
		f, err := NewFromFolios(mf, 513*4096, 77, []CacheFolio{
			{Index: 1, Folio: a, Dirty: true, Uptodate: true},
			{Index: 512, Folio: b, Uptodate: true},
		})
		must(t, err)
		defer f.DecRef()
		if f.Size() != 513*4096 || f.Pos() != 77 || f.Name() != "memfd:" {
			t.Fatalf("size %d pos %d name %q", f.Size(), f.Pos(), f.Name())
		}
		if seals, _ := f.GetSeals(); seals != unix.F_SEAL_SEAL {
			t.Fatalf("seals %#x, want F_SEAL_SEAL", seals)
		}
		got := readAll(t, f, 0, 513*4096)
		for i, c := range got {
			want := byte(0)
			switch {
			case i >= 4096 && i < 8192:
				want = 'a'
			case i >= 512*4096:
				want = 'b'
			}
			if c != want {
				t.Fatalf("byte %d = %q, want %q", i, c, want)
			}
		}
		if fs := flagsOf(f); len(fs) != 2 || !fs[0].Dirty || fs[1].Dirty || !fs[1].Uptodate {
			t.Fatalf("flags %+v", fs)
		}
		if st := f.Stat(); st.Blocks != 513*8 {
			t.Fatalf("st_blocks %d, want %d", st.Blocks, 513*8)
		}
	})
	for _, tc := range []struct {
		name      string
		size, pos int64
		fs        func(a, b pgalloc.Folio) []CacheFolio
		field     string
	}{
		{name: "folios out of order are rejected", size: 1 << 30, fs: func(a, b pgalloc.Folio) []CacheFolio {
			return []CacheFolio{{Index: 5, Folio: a}, {Index: 2, Folio: b}}
		}, field: "overlaps or precedes"},
		{name: "overlapping folios are rejected", size: 1 << 30, fs: func(a, b pgalloc.Folio) []CacheFolio {
			// PFN 2: any non-zero pfn aligned to order 1 (a.PFN &^ 1 is 0
			// when a is pfn 1).
			return []CacheFolio{{Index: 0, Folio: pgalloc.Folio{PFN: 2, Order: 1}}, {Index: 1, Folio: b}}
		}, field: "overlaps or precedes"},
		{name: "a folio beyond the size is rejected", size: 4096, fs: func(a, b pgalloc.Folio) []CacheFolio {
			return []CacheFolio{{Index: 0, Folio: a}, {Index: 1, Folio: b}}
		}, field: "beyond the file size"},
		{name: "a folio whose index is not aligned to its order is rejected", size: 1 << 30, fs: func(a, b pgalloc.Folio) []CacheFolio {
			return []CacheFolio{{Index: 3, Folio: pgalloc.Folio{PFN: 512, Order: 9}}}
		}, field: "not aligned"},
		{name: "a folio of an order above the maximum is rejected", size: 1 << 40, fs: func(a, b pgalloc.Folio) []CacheFolio {
			return []CacheFolio{{Index: 0, Folio: pgalloc.Folio{PFN: 1 << 11, Order: 11}}}
		}, field: "order 11"},
		{name: "a folio at pfn 0 is rejected", size: 1 << 30, fs: func(a, b pgalloc.Folio) []CacheFolio {
			return []CacheFolio{{Index: 0, Folio: pgalloc.Folio{}}}
		}, field: "pfn is 0"},
		{name: "a negative size is rejected", size: -1, fs: func(a, b pgalloc.Folio) []CacheFolio { return nil }, field: "size"},
		{name: "a negative position is rejected", size: 0, pos: -1, fs: func(a, b pgalloc.Folio) []CacheFolio { return nil }, field: "position"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := alloc(0, 1), alloc(0, 2)
			defer mf.DecRef(a)
			defer mf.DecRef(b)
			_, err := NewFromFolios(mf, tc.size, tc.pos, tc.fs(a, b))
			if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("NewFromFolios = %v, want EINVAL naming %q", err, tc.field)
			}
			for _, fo := range []pgalloc.Folio{a, b} {
				if _, refs, ok := mf.Lookup(fo.PFN); !ok || refs != 1 {
					t.Fatalf("caller's folio %v has %d references after the rejection, want 1", fo, refs)
				}
			}
		})
	}
}

func TestDecRefFreesTheFolios(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f, err := Create(mf, "x", 0)
	must(t, err)
	mustPwrite(t, f, pattern(3<<20, 1), 1<<20)
	must(t, f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, 10<<20, 1<<20))
	f.IncRef()
	f.DecRef()
	if mf.Stats().AllocatedPages == 0 {
		t.Fatal("folios freed while a reference remained")
	}
	f.DecRef()
	mf.Drain()
	if st := mf.Stats(); st.AllocatedPages != 0 {
		t.Fatalf("%d pages allocated after the last DecRef", st.AllocatedPages)
	}
}

type failingWriter struct{ left int }

func (w *failingWriter) Write(b []byte) (int, error) {
	if len(b) <= w.left {
		w.left -= len(b)
		return len(b), nil
	}
	n := w.left
	w.left = 0
	return n, errors.New("connection reset")
}

func TestStreaming(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	data := pattern(300000, 9)
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, f *File)
	}{
		{name: "WriteFromAt then ReadToAt round-trips across holes", run: func(t *testing.T, f *File) {
			n, err := f.WriteFromAt(bytes.NewReader(data), int64(len(data)), 5000)
			if n != int64(len(data)) || err != nil {
				t.Fatalf("WriteFromAt = %d, %v", n, err)
			}
			var w bytes.Buffer
			n, err = f.ReadToAt(&w, 1<<20, 0)
			want := append(make([]byte, 5000), data...)
			if n != int64(len(want)) || err != nil || !bytes.Equal(w.Bytes(), want) {
				t.Fatalf("ReadToAt = %d, %v (equal %v)", n, err, bytes.Equal(w.Bytes(), want))
			}
		}},
		{name: "offset -1 uses and advances the position", run: func(t *testing.T, f *File) {
			_, err := f.Seek(100, unix.SEEK_SET)
			must(t, err)
			n, err := f.WriteFromAt(bytes.NewReader(data[:10]), 10, -1)
			if n != 10 || err != nil || f.Pos() != 110 {
				t.Fatalf("WriteFromAt(-1) = %d, %v, position %d", n, err, f.Pos())
			}
			_, err = f.Seek(105, unix.SEEK_SET)
			must(t, err)
			var w bytes.Buffer
			n, err = f.ReadToAt(&w, 100, -1)
			if n != 5 || err != nil || f.Pos() != 110 || !bytes.Equal(w.Bytes(), data[5:10]) {
				t.Fatalf("ReadToAt(-1) = %d, %v, position %d", n, err, f.Pos())
			}
		}},
		{name: "a reader that ends early leaves what it gave and reports it", run: func(t *testing.T, f *File) {
			n, err := f.WriteFromAt(bytes.NewReader(data[:5000]), 9000, 0)
			if n != 5000 || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("WriteFromAt = %d, %v; want 5000, ErrUnexpectedEOF", n, err)
			}
			if f.Size() != 5000 || f.Stat().Blocks != 16 {
				t.Fatalf("size %d blocks %d after a short reader", f.Size(), f.Stat().Blocks)
			}
		}},
		{name: "a reader that ends early in a long write of new pages leaves what it gave", run: func(t *testing.T, f *File) {
			// Longer than syscallCopyMin and than the bounce buffer,
			// into pages not mapped in this process: the bytes go
			// through the bounce buffer with pwrite(2), and the
			// reader ends in its second fill.
			long := pattern(1<<20, 4)
			given := bounceSize + bounceSize/2 + 123
			n, err := f.WriteFromAt(bytes.NewReader(long[:given]), int64(len(long)), 4096)
			if n != int64(given) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("WriteFromAt = %d, %v; want %d, ErrUnexpectedEOF", n, err, given)
			}
			var w bytes.Buffer
			if n, err := f.ReadToAt(&w, 2<<20, 0); n != int64(4096+given) || err != nil {
				t.Fatalf("ReadToAt = %d, %v; want %d", n, err, 4096+given)
			}
			if want := append(make([]byte, 4096), long[:given]...); !bytes.Equal(w.Bytes(), want) {
				t.Fatal("the bytes read back are not the ones the reader gave")
			}
			// Written again, the same range goes through the mapping.
			if n, err := f.WriteFromAt(bytes.NewReader(long), int64(len(long)), 4096); n != int64(len(long)) || err != nil {
				t.Fatalf("WriteFromAt again = %d, %v", n, err)
			}
			w.Reset()
			if _, err := f.ReadToAt(&w, 2<<20, 4096); err != nil || !bytes.Equal(w.Bytes(), long) {
				t.Fatalf("after the second write: %v (equal %v)", err, bytes.Equal(w.Bytes(), long))
			}
		}},
		{name: "a writer that fails returns what it took and its error", run: func(t *testing.T, f *File) {
			mustPwrite(t, f, data, 0)
			w := &failingWriter{left: 7000}
			n, err := f.ReadToAt(w, int64(len(data)), 0)
			if n != 7000 || err == nil || !strings.Contains(err.Error(), "connection reset") {
				t.Fatalf("ReadToAt = %d, %v; want 7000 and the writer's error", n, err)
			}
		}},
		{name: "a read longer than MAX_RW_COUNT is shortened", run: func(t *testing.T, f *File) {
			must(t, f.Truncate(3<<30))
			n, err := f.ReadToAt(io.Discard, 3<<30, 0)
			if n != MaxRWCount || err != nil {
				t.Fatalf("ReadToAt(3 GiB) = %d, %v; want %d", n, err, MaxRWCount)
			}
		}},
		{name: "a negative count is EINVAL", run: func(t *testing.T, f *File) {
			if _, err := f.ReadToAt(io.Discard, -1, 0); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("ReadToAt(-1 bytes) = %v", err)
			}
			if _, err := f.WriteFromAt(bytes.NewReader(nil), -1, 0); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("WriteFromAt(-1 bytes) = %v", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, newTestFile(t, mf, 0)) })
	}
}

func TestHugetlb(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name string
		op   func(f *File) (int64, error)
		want int64
		err  error
	}{
		{name: "a write is EINVAL", op: func(f *File) (int64, error) { n, err := f.Pwrite([]byte("x"), 0); return int64(n), err }, err: unix.EINVAL},
		{name: "a size that is not a multiple of the huge page size is EINVAL", op: func(f *File) (int64, error) { return 0, f.Truncate(4096) }, err: unix.EINVAL},
		{name: "a read of the sparse file gives zeros", op: func(f *File) (int64, error) { n, err := f.Pread(make([]byte, 10), 100); return int64(n), err }, want: 10},
		{name: "allocating finds no huge pages", op: func(f *File) (int64, error) { return 0, f.Fallocate(0, 0, 4096) }, err: unix.ENOSPC},
		{name: "punching a hole works", op: func(f *File) (int64, error) {
			return 0, f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
		}},
		{name: "all of the file is data", op: func(f *File) (int64, error) { return f.Seek(5, unix.SEEK_DATA) }, want: 5},
		{name: "the hole is at the end", op: func(f *File) (int64, error) { return f.Seek(5, unix.SEEK_HOLE) }, want: 2 << 20},
		{name: "SEEK_HOLE from a negative offset gives the end", op: func(f *File) (int64, error) { return f.Seek(-5, unix.SEEK_HOLE) }, want: 2 << 20},
		{name: "SEEK_DATA from a negative offset is EINVAL", op: func(f *File) (int64, error) { return f.Seek(-5, unix.SEEK_DATA) }, err: unix.EINVAL},
		{name: "pinning is EINVAL", op: func(f *File) (int64, error) {
			f.Lock()
			defer f.Unlock()
			_, err := f.PinFolios()
			return 0, err
		}, err: unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, unix.MFD_HUGETLB)
			must(t, f.Truncate(2<<20))
			got, err := tc.op(f)
			if got != tc.want || !errors.Is(err, tc.err) || (err == nil) != (tc.err == nil) {
				t.Fatalf("got %d, %v; want %d, %v", got, err, tc.want, tc.err)
			}
			if st := f.Stat(); st.Blocks != 0 || st.Size != 2<<20 {
				t.Fatalf("stat %+v", st)
			}
		})
	}
}

// The deliberate differences from Linux listed in docs/memfd.md.
func TestSeekAtTheLastPossiblePage(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	for _, tc := range []struct {
		name   string
		whence int
		off    int64
		want   int64
	}{
		{name: "SEEK_DATA finds data in the last page a file can have", whence: unix.SEEK_DATA, off: 0, want: MaxFileSize &^ 4095},
		{name: "SEEK_HOLE after data in the last page is the end of the file", whence: unix.SEEK_HOLE, off: MaxFileSize - 10, want: MaxFileSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, mf, 0)
			mustPwrite(t, f, []byte("end"), MaxFileSize-3)
			got, err := f.Seek(tc.off, tc.whence)
			if err != nil || got != tc.want {
				t.Fatalf("Seek(%d, %d) = %d, %v; want %d (Linux: ENXIO for SEEK_DATA, a negative offset for SEEK_HOLE)", tc.off, tc.whence, got, err, tc.want)
			}
		})
	}
}

func TestPinnedLargeFolioWrittenInPartBecomesUptodateWhole(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f := newTestFile(t, mf, 0)
	must(t, f.Fallocate(0, 0, 2<<20))
	f.Lock()
	f.SetFrozen(true)
	fs, err := f.PinFolios()
	f.Unlock()
	must(t, err)
	defer func() {
		f.Lock()
		f.SetFrozen(false)
		f.UnpinFolios(fs)
		f.Unlock()
	}()
	mustPwrite(t, f, []byte("x"), 4096)
	// A pinned folio cannot be split: like Linux with a large folio, the
	// whole folio becomes uptodate, so all of it is data.
	if d, err := f.Seek(0, unix.SEEK_DATA); d != 0 || err != nil {
		t.Fatalf("SEEK_DATA = %d, %v; want 0", d, err)
	}
	if got := readAll(t, f, 4095, 3); !bytes.Equal(got, []byte{0, 'x', 0}) {
		t.Fatalf("contents %q", got)
	}
}

func TestConcurrentUse(t *testing.T) {
	mf := newTestMemoryFile(t, 256<<20)
	f := newTestFile(t, mf, 0)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			b := make([]byte, 8192)
			for i := 0; i < 300; i++ {
				off := int64((g*300 + i) % 97 * 4096)
				switch i % 5 {
				case 0:
					f.Pwrite(pattern(6000, byte(g)), off)
				case 1:
					f.Pread(b, off)
				case 2:
					f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, 5000)
				case 3:
					f.Seek(off, unix.SEEK_DATA)
				case 4:
					f.ReadToAt(io.Discard, 10000, off)
				}
			}
		}(g)
	}
	wg.Wait()
	must(t, f.Truncate(0))
	if st := f.Stat(); st.Blocks != 0 {
		t.Fatalf("%d blocks after truncating to 0", st.Blocks)
	}
}

func TestReadsAndWritesDoNotAllocatePerPage(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f := newTestFile(t, mf, 0)
	mustPwrite(t, f, make([]byte, 4<<20), 0)
	buf := make([]byte, 1<<20)
	for _, tc := range []struct {
		name string
		op   func()
	}{
		{name: "a 1 MiB pread allocates once at most", op: func() { f.Pread(buf, 4096) }},
		{name: "a 4 KiB pread allocates once at most", op: func() { f.Pread(buf[:4096], 7*4096) }},
		{name: "a 1 MiB pwrite over cached pages allocates once at most", op: func() { f.Pwrite(buf, 4096) }},
		{name: "a 1 MiB streamed read allocates a few times at most", op: func() { f.ReadToAt(io.Discard, 1<<20, 4096) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if n := testing.AllocsPerRun(50, tc.op); n > 2 {
				t.Fatalf("%.0f allocations per call, want at most 2 (none per page)", n)
			}
		})
	}
}

func TestTruncateToTheSameSizeFreesPagesPastTheEnd(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f := newTestFile(t, mf, 0)
	must(t, f.Truncate(5000))
	mustPwrite(t, f, []byte("abc"), 0)
	must(t, f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, 100000, 4096))
	if got := f.Stat().Blocks; got != 24 {
		t.Fatalf("st_blocks = %d before truncating, want 24", got)
	}
	must(t, f.Truncate(5000))
	if got := f.Stat().Blocks; got != 8 {
		t.Fatalf("st_blocks = %d after truncating to the same size, want 8 (as on Linux)", got)
	}
	if got := readAll(t, f, 0, 3); string(got) != "abc" {
		t.Fatalf("contents %q", got)
	}
}

// hostStatusFlags returns what F_GETFL reports for a memfd of the host.
func hostStatusFlags(t *testing.T) int {
	t.Helper()
	fd, err := unix.MemfdCreate("flags", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl
}

func TestHugePageSizesAreTheHosts(t *testing.T) {
	ents, err := os.ReadDir("/sys/kernel/mm/hugepages")
	if err != nil {
		t.Skipf("the host lists no huge page sizes: %v", err)
	}
	for _, e := range ents {
		var kb uint64
		if _, err := fmt.Sscanf(e.Name(), "hugepages-%dkB", &kb); err != nil {
			continue
		}
		shift := uint(bits.TrailingZeros64(kb)) + 10
		if !hugePageShifts()[shift] {
			t.Errorf("the host has %s, but MFD_HUGETLB of size 1<<%d is refused", e.Name(), shift)
		}
	}
	if len(hugePageShifts()) != len(ents) {
		t.Errorf("huge page sizes %v, host %d entries", hugePageShifts(), len(ents))
	}
}
