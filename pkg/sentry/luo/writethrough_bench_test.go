package luo_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
)

// BenchmarkFreeze measures the freeze phase of a planned restart
// (Serialize, inside the blackout) with 1 and 1000 one-page memfds in one
// session, and the pages it allocates. Abort, which undoes it, is not
// timed. Run the same benchmark on a build without write-through for the
// before numbers (docs/crash.md).
func BenchmarkFreeze(b *testing.B) {
	for _, files := range []int{1, 1000} {
		b.Run(fmt.Sprintf("files=%d", files), func(b *testing.B) {
			s := coldBoot(b)
			dev, _ := s.openDevice(b)
			sfd := s.createSession(b, dev, "bench")
			for i := 0; i < files; i++ {
				if err := s.preserveFD(sfd, s.memfdWith(b, []byte{byte(i)}), uint64(i)); err != nil {
					b.Fatal(err)
				}
			}
			var d time.Duration
			var pages int64
			for i := 0; i < b.N; i++ {
				before := s.mf.Stats().AllocatedPages
				start := time.Now()
				if err := s.l.Serialize(); err != nil {
					b.Fatal(err)
				}
				d += time.Since(start)
				pages += int64(s.mf.Stats().AllocatedPages) - int64(before)
				s.l.Abort()
			}
			b.ReportMetric(float64(d.Nanoseconds())/float64(b.N), "ns/freeze")
			b.ReportMetric(float64(d.Nanoseconds())/float64(b.N*files), "ns/file")
			b.ReportMetric(float64(pages)/float64(b.N), "pages/freeze")
		})
	}
}

// BenchmarkPreserveWriteThrough measures, per file, PRESERVE_FD of a
// one-page memfd into a session that holds 0 to 999 files, and the close of
// the session (which unpreserves all 1000). Interleaved in the same run,
// the baseline is the memfd handler's own Preserve and Unpreserve on the
// same files: what PRESERVE_FD and the close cost before LUO wrote its
// records through. Reported: ns per file for each, and the ratios.
func BenchmarkPreserveWriteThrough(b *testing.B) {
	const files = 1000
	s := coldBoot(b)
	dev, _ := s.openDevice(b)
	fds := make([]int32, files)
	for i := range fds {
		fds[i] = s.memfdWith(b, []byte{byte(i)})
	}
	mh := memfd.NewLUOHandler(s.mf, s.k)
	var tPreserve, tClose, tHPreserve, tHUnpreserve time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		sfd := s.createSession(b, dev, "bench")
		start := time.Now()
		for j, fd := range fds {
			if err := s.preserveFD(sfd, fd, uint64(j)); err != nil {
				b.Fatal(err)
			}
		}
		tPreserve += time.Since(start)
		start = time.Now()
		s.fdt.close(b, sfd)
		tClose += time.Since(start)

		args := make([]luo.FileOpArgs, files)
		start = time.Now()
		for j, fd := range fds {
			args[j] = luo.FileOpArgs{Handler: mh, File: s.fdt.get(b, fd)}
			if err := mh.Ops.Preserve(&args[j]); err != nil {
				b.Fatal(err)
			}
		}
		tHPreserve += time.Since(start)
		start = time.Now()
		for j := files - 1; j >= 0; j-- {
			mh.Ops.Unpreserve(&args[j])
		}
		tHUnpreserve += time.Since(start)
	}
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(b.N*files) }
	b.ReportMetric(per(tPreserve), "ns/preserve")
	b.ReportMetric(per(tHPreserve), "ns/preserve-baseline")
	b.ReportMetric(per(tClose), "ns/unpreserve")
	b.ReportMetric(per(tHUnpreserve), "ns/unpreserve-baseline")
	b.ReportMetric(float64(tPreserve)/float64(tHPreserve), "preserve/baseline")
	b.ReportMetric(float64(tClose)/float64(tHUnpreserve), "unpreserve/baseline")
}
