package test

import (
	"math/rand/v2"
	"testing"
	"time"
)

// BenchmarkRestart restarts a sandbox whose guest keeps 64 MiB in 3 memfds
// (4 KiB folios) preserved, b.N times per mode, and reports the median
// blackout and time to data in ms. TestMeasureRestart (-measure) does the
// same for larger sizes.
//
//	go test ./test -run XXX -bench Restart -benchtime 10x
func BenchmarkRestart(b *testing.B) {
	for _, mode := range []string{"transfer", "exec"} {
		b.Run(mode, func(b *testing.B) {
			c := newCLI(b)
			const id = "bench"
			c.must(append([]string{"run", "--detach", "--memory=256M", id, "--"}, append(guestArgs("64M", rand.Uint64(), true), "--small-folios")...)...)
			c.waitEvent(id, "preserved", 0, time.Minute)
			var blackout, ttd []time.Duration
			b.ResetTimer()
			for i := range b.N {
				gen := uint64(i + 1)
				tm := c.restart(id, "--mode="+mode)
				b.StopTimer()
				v := c.waitEvent(id, "verified", gen, time.Minute)
				blackout = append(blackout, tm.Blackout)
				ttd = append(ttd, time.Duration(v.DataReadyAt-tm.PausedAt))
				c.waitEvent(id, "preserved", gen, time.Minute)
				b.StartTimer()
			}
			b.StopTimer()
			b.ReportMetric(float64(median(blackout))/1e6, "ms-blackout")
			b.ReportMetric(float64(median(ttd))/1e6, "ms-time-to-data")
			c.must("kill", id)
			c.must("delete", id)
		})
	}
}
