// Package baseline measures, in one run, what a restart of guest memory
// costs with gVisor's checkpoint/restore (pkg/sentry/pgalloc SaveTo and
// LoadFrom, which copy every page out and back) and with livesentry's
// zero-copy handover (LUO serialize, KHO finalize and ingest, LUO
// deserialize, then retrieving the memfd and reading its last byte).
//
// Run: go test ./test/baseline -run XXX -bench . -benchtime 3x -count 5
package baseline

import (
	"bufio"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/hostarch"
	gvlog "gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/memutil"
	gvpgalloc "gvisor.dev/gvisor/pkg/sentry/pgalloc"
	"gvisor.dev/gvisor/pkg/sentry/usage"
)

func init() {
	// pgalloc logs each save at Info level.
	gvlog.SetLevel(gvlog.Warning)
}

var sizes = []struct {
	name string
	size uint64
}{
	{"256MiB", 256 << 20},
	{"1GiB", 1 << 30},
}

func newGVisorFile(b *testing.B) *gvpgalloc.MemoryFile {
	b.Helper()
	fd, err := memutil.CreateMemFD("gvisor-baseline", 0)
	if err != nil {
		b.Fatal(err)
	}
	mf, err := gvpgalloc.NewMemoryFile(os.NewFile(uintptr(fd), "gvisor-baseline"), gvpgalloc.MemoryFileOpts{DisableMemoryAccounting: true})
	if err != nil {
		b.Fatal(err)
	}
	return mf
}

// BenchmarkGVisorCheckpointRestore saves a MemoryFile whose pages all hold
// data to a checkpoint file and loads it into a new MemoryFile (sync mode,
// the restore completes when every page is back), then reads the last
// word. restore-ms is gVisor's time to data.
func BenchmarkGVisorCheckpointRestore(b *testing.B) {
	for _, sz := range sizes {
		b.Run(sz.name, func(b *testing.B) {
			var save, restore time.Duration
			for i := 0; i < b.N; i++ {
				mf := newGVisorFile(b)
				fr, err := mf.Allocate(sz.size, gvpgalloc.AllocOpts{Kind: usage.Anonymous, Mode: gvpgalloc.AllocateAndWritePopulate})
				if err != nil {
					b.Fatal(err)
				}
				bs, err := mf.MapInternal(fr, hostarch.ReadWrite)
				if err != nil {
					b.Fatal(err)
				}
				for ; !bs.IsEmpty(); bs = bs.Tail() {
					s := bs.Head().ToSlice()
					for off := 0; off < len(s); off += 4096 {
						binary.LittleEndian.PutUint64(s[off:], uint64(off)+1)
					}
				}
				path := filepath.Join(b.TempDir(), "checkpoint.img")
				f, err := os.Create(path)
				if err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				w := bufio.NewWriterSize(f, 1<<20)
				if err := mf.SaveTo(context.Background(), w, &gvpgalloc.SaveOpts{}); err != nil {
					b.Fatal(err)
				}
				if err := w.Flush(); err != nil {
					b.Fatal(err)
				}
				save += time.Since(t0)
				f.Close()
				mf.Destroy()

				r, err := os.Open(path)
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				mf2 := newGVisorFile(b)
				if err := mf2.LoadFrom(context.Background(), bufio.NewReaderSize(r, 1<<20), &gvpgalloc.LoadOpts{}); err != nil {
					b.Fatal(err)
				}
				bs2, err := mf2.MapInternal(fr, hostarch.Read)
				if err != nil {
					b.Fatal(err)
				}
				last := bs2.DropFirst64(sz.size - 4096).Head().ToSlice()
				restore += time.Since(t1)
				if got := binary.LittleEndian.Uint64(last); got != sz.size-4096+1 {
					b.Fatalf("last page after restore holds %d", got)
				}
				r.Close()
				mf2.Destroy()
				os.Remove(path)
			}
			b.ReportMetric(float64(save.Microseconds())/1e3/float64(b.N), "save-ms")
			b.ReportMetric(float64(restore.Microseconds())/1e3/float64(b.N), "restore-ms")
		})
	}
}

type fdTable map[int32]luo.File

func (t fdTable) InstallFD(f luo.File, _ bool) (int32, error) {
	for fd := int32(0); ; fd++ {
		if _, ok := t[fd]; !ok {
			f.IncRef()
			t[fd] = f
			return fd, nil
		}
	}
}

func (t fdTable) FileFromFD(fd int32) (luo.File, error) {
	f, ok := t[fd]
	if !ok {
		return nil, unix.EBADF
	}
	f.IncRef()
	return f, nil
}

func sessionArg(name string) []byte {
	b := make([]byte, 72)
	binary.LittleEndian.PutUint32(b, 72)
	copy(b[8:], name)
	return b
}

func fdArg(fd int32, token uint64) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint32(b, 16)
	binary.LittleEndian.PutUint32(b[4:], uint32(fd))
	binary.LittleEndian.PutUint64(b[8:], token)
	return b
}

// BenchmarkLivesentryHandover preserves a memfd of 4 KiB folios holding
// data, hands the memory file over in-process (what the restart's
// blackout does, minus process start and the socket), then retrieves the
// memfd and reads its last word. blackout-ms covers serialize, finalize,
// ingest (with adopt) and deserialize; data-ms adds the retrieve and the
// read, livesentry's time to data.
func BenchmarkLivesentryHandover(b *testing.B) {
	for _, sz := range sizes {
		b.Run(sz.name, func(b *testing.B) {
			var blackout, data time.Duration
			for i := 0; i < b.N; i++ {
				mf, err := pgalloc.New(pgalloc.Options{Size: 2 * sz.size})
				if err != nil {
					b.Fatal(err)
				}
				k, err := kho.New(mf)
				if err != nil {
					b.Fatal(err)
				}
				l := luo.New(k)
				if err := l.RegisterFileHandler(memfd.NewLUOHandler(mf, k)); err != nil {
					b.Fatal(err)
				}
				f, err := memfd.Create(mf, "data", 0)
				if err != nil {
					b.Fatal(err)
				}
				page := make([]byte, 4096)
				for off := uint64(0); off < sz.size; off += 4096 {
					binary.LittleEndian.PutUint64(page, off+1)
					if _, err := f.Pwrite(page, int64(off)); err != nil {
						b.Fatal(err)
					}
				}
				fdt := fdTable{}
				dev, err := l.OpenDevice()
				if err != nil {
					b.Fatal(err)
				}
				reply, err := dev.Ioctl(fdt, 0xBA00, sessionArg("baseline"))
				if err != nil {
					b.Fatal(err)
				}
				sfd := int32(binary.LittleEndian.Uint32(reply[4:]))
				mfd, _ := fdt.InstallFD(f, false)
				if _, err := fdt[sfd].(*luo.Session).Ioctl(fdt, 0xBA40, fdArg(mfd, 1)); err != nil {
					b.Fatal(err)
				}

				t0 := time.Now()
				if err := l.Serialize(); err != nil {
					b.Fatal(err)
				}
				if err := k.Finalize(); err != nil {
					b.Fatal(err)
				}
				file, err := mf.DupFile()
				if err != nil {
					b.Fatal(err)
				}
				mf2, err := pgalloc.Open(file, pgalloc.Options{})
				if err != nil {
					b.Fatal(err)
				}
				k2, err := kho.Ingest(mf2, k.RootAddr())
				if err != nil {
					b.Fatal(err)
				}
				l2 := luo.New(k2)
				if err := l2.RegisterFileHandler(memfd.NewLUOHandler(mf2, k2)); err != nil {
					b.Fatal(err)
				}
				if err := l2.Deserialize(); err != nil {
					b.Fatal(err)
				}
				mf2.ResumeReleases()
				blackout += time.Since(t0)

				fdt2 := fdTable{}
				dev2, err := l2.OpenDevice()
				if err != nil {
					b.Fatal(err)
				}
				reply, err = dev2.Ioctl(fdt2, 0xBA01, sessionArg("baseline"))
				if err != nil {
					b.Fatal(err)
				}
				rs := fdt2[int32(binary.LittleEndian.Uint32(reply[4:]))].(*luo.Session)
				reply, err = rs.Ioctl(fdt2, 0xBA41, fdArg(0, 1))
				if err != nil {
					b.Fatal(err)
				}
				got := fdt2[int32(binary.LittleEndian.Uint32(reply[4:]))].(*memfd.File)
				last := make([]byte, 8)
				if _, err := got.Pread(last, int64(sz.size-4096)); err != nil {
					b.Fatal(err)
				}
				data += time.Since(t0)
				if v := binary.LittleEndian.Uint64(last); v != sz.size-4096+1 {
					b.Fatalf("last page after the handover holds %d", v)
				}
				mf2.Close()
				mf.Close()
			}
			b.ReportMetric(float64(blackout.Microseconds())/1e3/float64(b.N), "blackout-ms")
			b.ReportMetric(float64(data.Microseconds())/1e3/float64(b.N), "data-ms")
		})
	}
}
