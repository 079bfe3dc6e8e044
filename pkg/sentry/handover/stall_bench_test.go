package handover

import (
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkRunningThreadStalls is the floor under a blackout's tail: how
// often a thread that never blocks loses its CPU for a while anyway (the
// hypervisor running something else on the vCPU, interrupts, the guest
// kernel's own work). One thread per CPU, pinned, reads the monotonic
// clock in a loop for 100 ms per iteration and counts the gaps between
// two reads. A blackout of about 1 ms that a gap of 2 ms falls into is a
// blackout of 3 ms, whatever the sentries do. Reported per CPU: gaps
// longer than 0.5, 1 and 2 ms per second, and the share of time lost in
// gaps longer than 0.1 ms.
//
//	go test ./pkg/sentry/handover -run '^$' -bench RunningThreadStalls -benchtime 300x
func BenchmarkRunningThreadStalls(b *testing.B) {
	cpus := runtime.NumCPU()
	thresholds := []time.Duration{500 * time.Microsecond, time.Millisecond, 2 * time.Millisecond}
	counts := make([][]int, cpus)
	lost := make([]time.Duration, cpus)
	var wg sync.WaitGroup
	b.ResetTimer()
	for cpu := 0; cpu < cpus; cpu++ {
		counts[cpu] = make([]int, len(thresholds))
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The thread ends with the goroutine, pinned.
			runtime.LockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				b.Errorf("pinning to CPU %d: %v", cpu, err)
				return
			}
			start := time.Now()
			end := start.Add(time.Duration(b.N) * 100 * time.Millisecond)
			for prev := start; prev.Before(end); {
				now := time.Now()
				gap := now.Sub(prev)
				prev = now
				if gap <= 100*time.Microsecond {
					continue
				}
				lost[cpu] += gap
				for i, th := range thresholds {
					if gap > th {
						counts[cpu][i]++
					}
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	secs := float64(b.N) / 10 * float64(cpus)
	for i, name := range []string{"gaps>0.5ms/s", "gaps>1ms/s", "gaps>2ms/s"} {
		n := 0
		for cpu := range counts {
			n += counts[cpu][i]
		}
		b.ReportMetric(float64(n)/secs, name)
	}
	var total time.Duration
	for _, l := range lost {
		total += l
	}
	b.ReportMetric(100*total.Seconds()/secs, "%lost")
	b.ReportMetric(0, "ns/op")
}
