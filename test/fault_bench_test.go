package test

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

var recoverySize = flag.String("fault.recovery-size", "4G", "bytes preserved by the guest of BenchmarkFaultRecovery")

// BenchmarkFaultRecovery SIGKILLs the serving sentry of a sandbox whose
// guest preserved -fault.recovery-size bytes (3 memfds in 2 sessions),
// and measures the time until a guest connecting at the instant of the
// kill is served by the recovered sentry: the supervisor noticing the
// death, killing what the sentry left, starting a sentry in recover mode,
// mapping the memory file, KHO recover, LUO deserialize, serving. With
// 2 MiB folios (the memfds' default) and 4 KiB folios only. Each
// recovered guest verifies every byte (outside the timing) before the
// next kill.
//
//	go test ./test -run XXX -bench FaultRecovery -benchtime 3x
func BenchmarkFaultRecovery(b *testing.B) {
	for _, folios := range []struct {
		name  string
		small bool
	}{{"2MiB-folios", false}, {"4KiB-folios", true}} {
		b.Run(*recoverySize+"/"+folios.name, func(b *testing.B) {
			c := newCLI(b)
			id := "recbench"
			if folios.small {
				id += "small"
			}
			args := append(guestArgs(*recoverySize, 77, true), "")
			args = args[:len(args)-1]
			if folios.small {
				args = append(args, "--small-folios")
			}
			size, err := sandbox.ParseSize(*recoverySize)
			if err != nil {
				b.Fatal(err)
			}
			// Room for the sentries' own pages besides the guest's.
			c.must(append([]string{"run", "--detach", fmt.Sprintf("--memory=%d", size+size/4+64<<20), id, "--"}, args...)...)
			c.waitEvent(id, "preserved", 0, 10*time.Minute)
			var ds []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				st := c.state(id)
				start := handover.Monotonic()
				syscall.Kill(st.PID, syscall.SIGKILL)
				g, err := guest.Dial(st.GuestSocket)
				if err != nil {
					b.Fatalf("connecting during the recovery: %v", err)
				}
				d := time.Duration(handover.Monotonic() - start)
				g.Disconnect()
				ds = append(ds, d)
				b.StopTimer()
				// The recovered guest verifies every byte and preserves
				// the next generation.
				c.waitEvent(id, "verified", st.LiveupdateNumber+1, 10*time.Minute)
				c.waitEvent(id, "preserved", st.LiveupdateNumber+1, 10*time.Minute)
				b.Logf("recovery %d: %v from the SIGKILL to a served guest; %s", i+1, d, recoveryLog(c, id))
				b.StartTimer()
			}
			b.StopTimer()
			sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
			b.ReportMetric(float64(ds[len(ds)/2])/1e6, "ms-median/recovery")
			b.ReportMetric(float64(ds[len(ds)-1])/1e6, "ms-max/recovery")
			c.must("kill", id)
			c.must("delete", id)
		})
	}
}

// BenchmarkFaultBlackoutWithWriters restarts (transfer mode) a sandbox
// whose 8 guests each rewrite their own preserved memfd with pwrite calls
// of 1 MiB without pause, and reports the blackout's median and 99th
// percentile (the pause waits for the calls in progress): the target is
// p99 ≤ 3 × p50. The soak command does the restarts and checks every byte.
//
//	go test ./test -run XXX -bench FaultBlackoutWithWriters -benchtime 100x
func BenchmarkFaultBlackoutWithWriters(b *testing.B) {
	soak := buildSoak(b)
	out, err := runSoak(soak, fmt.Sprintf("-n=%d", max(b.N, 10)), "-size=16M", "-writers=8", "-pwrite", "-write-pause=0", "-modes=transfer", "-kill-every=0", "-report-every=0")
	b.Logf("%s", out)
	if err != nil {
		b.Fatalf("soak: %v", err)
	}
	p50, p99 := soakPercentiles(b, out, "transfer")
	b.ReportMetric(p50, "ms-p50/blackout")
	b.ReportMetric(p99, "ms-p99/blackout")
	b.ReportMetric(p99/p50, "p99/p50")
}

// recoveryLog returns what the supervisor and the recovered sentry logged
// of the last recovery: when the supervisor started the sentry, and the
// sentry's phases.
func recoveryLog(c *cli, id string) string {
	b, _ := os.ReadFile(filepath.Join(c.root, id, "sentry.log"))
	var super, sentry string
	for _, line := range strings.Split(string(b), "\n") {
		if _, after, ok := strings.Cut(line, "] supervisor: sentry"); ok && strings.Contains(line, "recovering") {
			super = "supervisor: sentry" + after
		}
		if _, after, ok := strings.Cut(line, "(recover mode)"); ok {
			sentry = "recovered sentry:" + after
		}
	}
	return super + "; " + sentry
}
