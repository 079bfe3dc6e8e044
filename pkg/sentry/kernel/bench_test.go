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
			// The steady state: the first write of a page goes
			// through pwrite(2) in the sentry, the second through
			// its mapping, which it then keeps (memfd's copyIn).
			g.Pwrite(fd, buf, 0)
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

// BenchmarkGuestWriteFresh measures pwrite64 through the guest protocol
// of data no page of which exists yet, as a guest writes what it will
// preserve: 256 MiB in 4 MiB calls at rising offsets of one memfd, against
// the same writes to a new host memfd in the same run. It reports GiB/s and
// the ratio to the host.
func BenchmarkGuestWriteFresh(b *testing.B) {
	const (
		call  = 4 << 20
		total = 256 << 20
	)
	buf := make([]byte, call)
	for i := range buf {
		buf[i] = byte(i)
	}
	var host, guestTime time.Duration
	for range b.N {
		hfd, err := unix.MemfdCreate("floor", unix.MFD_CLOEXEC)
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for off := int64(0); off < total; off += call {
			if _, err := unix.Pwrite(hfd, buf, off); err != nil {
				b.Fatal(err)
			}
		}
		host += time.Since(start)
		unix.Close(hfd)

		b.StopTimer()
		s := newSandboxSized(b, total+(64<<20))
		g := s.dialB(b)
		fd, err := g.MemfdCreate("bench", 0)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start = time.Now()
		for off := int64(0); off < total; off += call {
			if _, err := g.Pwrite(fd, buf, off); err != nil {
				b.Fatal(err)
			}
		}
		guestTime += time.Since(start)
	}
	gib := float64(total) * float64(b.N) / (1 << 30)
	b.ReportMetric(gib/guestTime.Seconds(), "GiB/s")
	b.ReportMetric(gib/host.Seconds(), "host-GiB/s")
	b.ReportMetric(host.Seconds()/guestTime.Seconds(), "ratio-to-host")
}

// BenchmarkGuestReadAfterRestart measures a relaunched guest's first
// read of its data through the guest protocol: 256 MiB preserved, a live
// restart (in process, as two sentries of this build negotiate it), the
// memfd retrieved, then read with pread64 in 4 MiB calls, against the same
// reads of a host memfd in the same run. Nothing of the file is mapped in
// the new sentry yet, as after every restart.
func BenchmarkGuestReadAfterRestart(b *testing.B) {
	const size, chunk = 256 << 20, 4 << 20
	buf := make([]byte, chunk)
	for i := range buf {
		buf[i] = byte(i)
	}
	var ours, host time.Duration
	for range b.N {
		b.StopTimer()
		hfd, err := unix.MemfdCreate("floor", unix.MFD_CLOEXEC)
		if err != nil {
			b.Fatal(err)
		}
		s := newSandboxSized(b, 2*size+64<<20)
		g := s.dialB(b)
		fd, err := g.MemfdCreate("bench", 0)
		if err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < size; off += chunk {
			unix.Pwrite(hfd, buf, off)
			if _, err := g.Pwrite(fd, buf, off); err != nil {
				b.Fatal(err)
			}
		}
		g2, dev2 := preserveAndRestart(b, s, g, fd)
		fd2 := retrieveBenchFD(b, g2, dev2)
		b.StartTimer()
		t0 := time.Now()
		for off := int64(0); off < size; off += chunk {
			if n, err := unix.Pread(hfd, buf, off); n != chunk || err != nil {
				b.Fatalf("pread = %d, %v", n, err)
			}
		}
		t1 := time.Now()
		for off := int64(0); off < size; off += chunk {
			if n, err := g2.Pread(fd2, buf, off); n != chunk || err != nil {
				b.Fatalf("guest pread = %d, %v", n, err)
			}
		}
		ours += time.Since(t1)
		host += t1.Sub(t0)
		b.StopTimer()
		unix.Close(hfd)
	}
	gibps := func(d time.Duration) float64 { return float64(size) * float64(b.N) / d.Seconds() / (1 << 30) }
	b.ReportMetric(gibps(ours), "GiB/s")
	b.ReportMetric(gibps(host), "host-GiB/s")
	b.ReportMetric(host.Seconds()/ours.Seconds(), "ratio-to-host")
}
