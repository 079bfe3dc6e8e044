package kernel

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkGuestIO measures bulk pwrite64 and pread64 of a memfd through
// the guest protocol (one Unix socket round trip per call, data streamed
// in data frames) against the same calls on a host memfd in the same run,
// the floor a socket-based guest interface can only approach. It reports
// GiB/s and the ratio to the host.
func BenchmarkGuestIO(b *testing.B) {
	const size = 4 << 20
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = byte(i)
	}
	for _, op := range []string{"pwrite", "pread"} {
		b.Run(op, func(b *testing.B) {
			// The host floor, measured first.
			hfd, err := unix.MemfdCreate("floor", unix.MFD_CLOEXEC)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(hfd)
			unix.Pwrite(hfd, buf, 0)
			// testing.Benchmark cannot nest: time a fixed number of calls.
			const hostOps = 256
			start := time.Now()
			for range hostOps {
				if op == "pwrite" {
					unix.Pwrite(hfd, buf, 0)
				} else {
					unix.Pread(hfd, buf, 0)
				}
			}
			host := float64(size) * hostOps / time.Since(start).Seconds() / (1 << 30)
			s := newSandbox(b)
			g := s.dialB(b)
			fd, err := g.MemfdCreate("bench", 0)
			if err != nil {
				b.Fatal(err)
			}
			g.Pwrite(fd, buf, 0)
			b.SetBytes(size)
			b.ResetTimer()
			for range b.N {
				var err error
				if op == "pwrite" {
					_, err = g.Pwrite(fd, buf, 0)
				} else {
					_, err = g.Pread(fd, buf, 0)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			gibs := float64(size) * float64(b.N) / b.Elapsed().Seconds() / (1 << 30)
			b.ReportMetric(gibs, "GiB/s")
			b.ReportMetric(host, "host-GiB/s")
			b.ReportMetric(gibs/host, "ratio-to-host")
		})
	}
}
