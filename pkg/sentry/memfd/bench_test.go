package memfd

import (
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// BenchmarkSequential writes and then reads 1 GiB in 1 MiB chunks with
// Pwrite and Pread, and the same with pwrite(2) and pread(2) on a host memfd,
// chunk by chunk in turn (alternating which goes first) so that both see
// the same machine, and reports both throughputs and their ratio (ours /
// host). Each iteration moves 4 GiB; run it with -benchtime=Nx.
func BenchmarkSequential(b *testing.B) {
	const total, chunk = 1 << 30, 1 << 20
	mf := newTestMemoryFile(b, total+64<<20)
	src := pattern(chunk, 5)
	dst := make([]byte, chunk)
	var ours, host [2]time.Duration // write, read
	for i := 0; i < b.N; i++ {
		f, err := Create(mf, "bench", 0)
		if err != nil {
			b.Fatal(err)
		}
		fd, err := unix.MemfdCreate("bench", 0)
		if err != nil {
			b.Fatal(err)
		}
		oursWrite := func(off int64) {
			if n, err := f.Pwrite(src, off); n != chunk || err != nil {
				b.Fatalf("Pwrite = %d, %v", n, err)
			}
		}
		hostWrite := func(off int64) {
			if n, err := unix.Pwrite(fd, src, off); n != chunk || err != nil {
				b.Fatalf("pwrite = %d, %v", n, err)
			}
		}
		oursRead := func(off int64) {
			if n, err := f.Pread(dst, off); n != chunk || err != nil {
				b.Fatalf("Pread = %d, %v", n, err)
			}
		}
		hostRead := func(off int64) {
			if n, err := unix.Pread(fd, dst, off); n != chunk || err != nil {
				b.Fatalf("pread = %d, %v", n, err)
			}
		}
		for phase, fns := range [2][2]func(int64){{oursWrite, hostWrite}, {oursRead, hostRead}} {
			for off := int64(0); off < total; off += chunk {
				first := int(off/chunk) % 2
				for k := 0; k < 2; k++ {
					side := first ^ k
					t0 := time.Now()
					fns[side](off)
					if d := time.Since(t0); side == 0 {
						ours[phase] += d
					} else {
						host[phase] += d
					}
				}
			}
		}
		f.DecRef()
		unix.Close(fd)
		mf.Drain()
	}
	gibps := func(d time.Duration) float64 { return float64(b.N) / d.Seconds() }
	b.ReportMetric(gibps(ours[0]), "write-GiB/s")
	b.ReportMetric(gibps(host[0]), "host-write-GiB/s")
	b.ReportMetric(host[0].Seconds()/ours[0].Seconds(), "write-ratio")
	b.ReportMetric(gibps(ours[1]), "read-GiB/s")
	b.ReportMetric(gibps(host[1]), "host-read-GiB/s")
	b.ReportMetric(host[1].Seconds()/ours[1].Seconds(), "read-ratio")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkRandomPread4K reads 4 KiB at random page-aligned offsets of a
// fully written 256 MiB file: ours (Pread) and the host's pread(2) on a
// memfd in the same run, reporting ns per read of each and their ratio.
func BenchmarkRandomPread4K(b *testing.B) {
	const size = 256 << 20
	mf := newTestMemoryFile(b, size+64<<20)
	f, err := Create(mf, "bench", 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.DecRef()
	fd, err := unix.MemfdCreate("bench", 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	src := pattern(1<<20, 7)
	for off := int64(0); off < size; off += 1 << 20 {
		mustPwrite(b, f, src, off)
		if _, err := unix.Pwrite(fd, src, off); err != nil {
			b.Fatal(err)
		}
	}
	offs := make([]int64, 4096)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range offs {
		offs[i] = rng.Int64N(size/4096) * 4096
	}
	dst := make([]byte, 4096)
	// Warm both (fault the memory file's mapping in, as a long-running
	// sentry would have it).
	for off := int64(0); off < size; off += 4096 {
		f.Pread(dst, off)
	}
	b.ResetTimer()
	// Alternate blocks of reads so that both sides see the same machine.
	var ours, host time.Duration
	for done := 0; done < b.N; {
		n := min(len(offs), b.N-done)
		t0 := time.Now()
		for _, off := range offs[:n] {
			if k, err := f.Pread(dst, off); k != 4096 || err != nil {
				b.Fatalf("Pread = %d, %v", k, err)
			}
		}
		t1 := time.Now()
		for _, off := range offs[:n] {
			if k, err := unix.Pread(fd, dst, off); k != 4096 || err != nil {
				b.Fatalf("pread = %d, %v", k, err)
			}
		}
		ours += t1.Sub(t0)
		host += time.Since(t1)
		done += n
	}
	b.ReportMetric(float64(ours.Nanoseconds())/float64(b.N), "ns/pread")
	b.ReportMetric(float64(host.Nanoseconds())/float64(b.N), "host-ns/pread")
	b.ReportMetric(host.Seconds()/ours.Seconds(), "speedup")
	b.ReportMetric(0, "ns/op")
}

// pageCacheBytesPerFolio builds a page cache of n order-0 folios and
// returns the Go heap it takes per folio. Written in order, the folios
// follow each other in the memory file and make one run; written back to
// front (scattered), each is a run of its own: the worst case. Everything it allocates is freed
// (and the memory file's releaser drained) before it returns, so that
// repeated measurements do not see each other's garbage.
func pageCacheBytesPerFolio(tb testing.TB, n int, scattered bool) float64 {
	mf, err := pgalloc.New(pgalloc.Options{Size: 1 << 30})
	if err != nil {
		tb.Fatal(err)
	}
	defer mf.Close()
	f, err := Create(mf, "overhead", 0)
	if err != nil {
		tb.Fatal(err)
	}
	// Have the memory file allocate its own page metadata first (8 bytes
	// a page of order-0 folios, allocated as they are): it is not the
	// page cache's. The pages allocated and freed here are the ones the
	// page cache gets (the lowest free).
	warm, err := mf.Allocate(0)
	if err != nil {
		tb.Fatal(err)
	}
	pages := make([]pgalloc.Folio, n)
	for i := range pages {
		if pages[i], err = mf.Allocate(0); err != nil {
			tb.Fatal(err)
		}
	}
	for _, fo := range pages {
		mf.DecRef(fo)
	}
	pages = nil
	mf.Drain()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	// One byte in every page, so that no folio is large and the pages are
	// inserted one by one as a guest would.
	for i := 0; i < n; i++ {
		page := i
		if scattered {
			page = n - 1 - i
		}
		if _, err := f.Pwrite([]byte{1}, int64(page)*4096); err != nil {
			tb.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if got := f.Stat().Blocks; got != int64(n)*8 {
		tb.Fatalf("%d blocks, want %d", got, n*8)
	}
	f.DecRef()
	mf.DecRef(warm)
	mf.Drain()
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
}

// BenchmarkPageCacheOverhead reports the heap the page cache takes per
// folio, measured with runtime.MemStats: folios written in order (one run)
// and scattered (a run each, 24 bytes in a B-tree).
func BenchmarkPageCacheOverhead(b *testing.B) {
	var inOrder, scattered float64
	for i := 0; i < b.N; i++ {
		// 512 MiB: one GiB of page metadata in the memory file.
		inOrder += pageCacheBytesPerFolio(b, 1<<17, false)
		scattered += pageCacheBytesPerFolio(b, 1<<17, true)
	}
	b.ReportMetric(inOrder/float64(b.N), "B/folio-in-order")
	b.ReportMetric(scattered/float64(b.N), "B/folio-scattered")
	b.ReportMetric(0, "ns/op")
}

func TestPageCacheOverheadIsSmall(t *testing.T) {
	inOrder := pageCacheBytesPerFolio(t, 1<<16, false)
	scattered := pageCacheBytesPerFolio(t, 1<<16, true)
	t.Logf("page cache overhead: %.2f bytes per folio written in order, %.1f scattered", inOrder, scattered)
	if inOrder > 1 {
		t.Fatalf("folios written in order take %.2f bytes each, want at most 1 (one run for all)", inOrder)
	}
	if scattered > 48 {
		t.Fatalf("scattered folios take %.1f bytes each, want at most 48 (24-byte runs in a B-tree)", scattered)
	}
}
