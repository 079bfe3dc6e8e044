package kernel

import (
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// gib1 is the size the mmap benchmarks map.
const gib1 = 1 << 30

// sweep copies a 1 MiB buffer over every MiB of b (write) or every MiB of
// b into it (read): sequential access through a mapping.
func sweep(b, buf []byte, write bool) {
	for off := 0; off < len(b); off += len(buf) {
		if write {
			copy(b[off:], buf)
		} else {
			copy(buf, b[off:])
		}
	}
}

// BenchmarkMappedSequential maps a 1 GiB memfd shared and writes or reads
// it sequentially through the mapping: the sentry's memfd mapped straight
// from the memory file against a host memfd mapped the same way, in the
// same run. Each iteration maps, sweeps and unmaps; the ratio is the
// sentry's GiB/s over the host's.
func BenchmarkMappedSequential(b *testing.B) {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for _, op := range []string{"write", "read"} {
		b.Run(op, func(b *testing.B) {
			write := op == "write"
			hfd, err := unix.MemfdCreate("floor", unix.MFD_CLOEXEC)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(hfd)
			unix.Ftruncate(hfd, gib1)
			s := newSandboxSized(b, 2*gib1)
			g := s.dialB(b)
			fd, err := g.MemfdCreate("bench", 0)
			if err != nil {
				b.Fatal(err)
			}
			g.Ftruncate(fd, gib1)
			var host, ours time.Duration
			b.SetBytes(gib1)
			b.ResetTimer()
			for range b.N {
				// The host, then the sentry, interleaved.
				start := time.Now()
				hb, err := unix.Mmap(hfd, 0, gib1, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
				if err != nil {
					b.Fatal(err)
				}
				sweep(hb, buf, write)
				unix.Munmap(hb)
				host += time.Since(start)
				start = time.Now()
				m, err := g.Mmap(fd, 0, gib1, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
				if err != nil {
					b.Fatal(err)
				}
				sweep(m, buf, write)
				if err := g.Munmap(m); err != nil {
					b.Fatal(err)
				}
				ours += time.Since(start)
			}
			gibs := func(d time.Duration) float64 { return float64(b.N) / d.Seconds() }
			b.ReportMetric(gibs(ours), "GiB/s")
			b.ReportMetric(gibs(host), "host-GiB/s")
			b.ReportMetric(host.Seconds()/ours.Seconds(), "ratio")
		})
	}
}

// BenchmarkMmap1GiB is the first mmap of a 1 GiB memfd whose contents are
// in 2 MiB folios: the call, the runs and the MAP_FIXED mappings, without
// touching the pages.
func BenchmarkMmap1GiB(b *testing.B) {
	s := newSandboxSized(b, 2*gib1)
	g := s.dialB(b)
	fd := fillMemfd(b, g, gib1, "2MiB")
	b.ResetTimer()
	for range b.N {
		m, err := g.Mmap(fd, 0, gib1, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		g.Munmap(m)
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/mmap")
}

// fillMemfd makes a memfd of size bytes, byte i of it byte(i), with the
// folios of layout:
//   - "2MiB": 2 MiB writes, so 2 MiB folios (a write over a whole empty
//     aligned 2 MiB range gets one);
//   - "4KiB": 4 KiB folios in two runs of the memory file per 2 MiB of the
//     file (a 1-byte write into each empty 2 MiB range first caches a
//     4 KiB folio there, then 2 MiB writes fill the rest), the worst case
//     for a mapping, one mmap per run;
//   - "4KiB-in-order": 4 KiB folios one after the other in the memory
//     file, as 64 KiB writes in order leave them.
func fillMemfd(b testing.TB, g *guest.Conn, size int64, layout string) int {
	fd, err := g.MemfdCreate("data", 0)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 2<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	chunk := int64(len(buf))
	switch layout {
	case "4KiB":
		for off := int64(0); off < size; off += 2 << 20 {
			g.Pwrite(fd, buf[:1], off)
		}
	case "4KiB-in-order":
		chunk = 64 << 10
	}
	for off := int64(0); off < size; off += chunk {
		if _, err := g.Pwrite(fd, buf[off%int64(len(buf)):][:chunk], off); err != nil {
			b.Fatal(err)
		}
	}
	return fd
}

// BenchmarkRetrieveMapAndRead is a relaunched guest's way back to its
// memory after a live restart: retrieve the session and the 1 GiB memfd,
// map all of it and read its last byte. The restart itself (in this
// process, negotiated as two sentries of this build negotiate it: kho-v2,
// carried) is not timed.
// preserveAndRestart preserves g's memfd fd in session "bench" under
// token 1, restarts s live (page metadata prepared first, as a transfer
// restart's new sentry does before Ready with --metadata-chunks) and
// returns a guest of the new sentry with /dev/liveupdate open.
func preserveAndRestart(b *testing.B, s *sandbox, g *guest.Conn, fd int) (*guest.Conn, int) {
	b.Helper()
	dev, err := g.OpenLiveUpdate()
	if err != nil {
		b.Fatal(err)
	}
	sess, err := g.CreateSession(dev, "bench")
	if err != nil {
		b.Fatal(err)
	}
	if err := g.PreserveFD(sess, fd, 1); err != nil {
		b.Fatal(err)
	}
	pgalloc.PrepareMetadata(s.k.MemoryFile().MetadataChunks())
	g2 := negotiatedRestart(b, s).dialB(b)
	dev2, err := g2.OpenLiveUpdate()
	if err != nil {
		b.Fatal(err)
	}
	return g2, dev2
}

// retrieveBenchFD retrieves, on g's /dev/liveupdate dev, the memfd that
// preserveAndRestart preserved, and returns its fd.
func retrieveBenchFD(b *testing.B, g *guest.Conn, dev int) int {
	b.Helper()
	sess, err := g.RetrieveSession(dev, "bench")
	if err != nil {
		b.Fatal(err)
	}
	fd, err := g.RetrieveFD(sess, 1)
	if err != nil {
		b.Fatal(err)
	}
	return fd
}

func BenchmarkRetrieveMapAndRead(b *testing.B) {
	for _, folios := range []string{"2MiB", "4KiB", "4KiB-in-order"} {
		b.Run(folios, func(b *testing.B) {
			var total time.Duration
			for range b.N {
				b.StopTimer()
				s := newSandboxSized(b, 2*gib1)
				g := s.dialB(b)
				fd := fillMemfd(b, g, gib1, folios)
				g2, dev2 := preserveAndRestart(b, s, g, fd)
				b.StartTimer()
				start := time.Now()
				fd2 := retrieveBenchFD(b, g2, dev2)
				m, err := g2.Mmap(fd2, 0, gib1, unix.PROT_READ, unix.MAP_SHARED)
				if err != nil {
					b.Fatal(err)
				}
				if m[gib1-1] != byte((2<<20-1)&0xff) {
					b.Fatalf("last byte %#x", m[gib1-1])
				}
				total += time.Since(start)
				b.StopTimer()
				g2.Munmap(m)
			}
			b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/retrieve-map-read")
		})
	}
}
