package test

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

var (
	measure      = flag.Bool("measure", false, "run TestMeasureRestart (slow: fills and verifies every size in both modes)")
	measureSizes = flag.String("measure.sizes", "64M,1G,4G", "comma-separated preserved sizes for TestMeasureRestart")
	measureReps  = flag.Int("measure.reps", 5, "restarts measured per size and mode")
	measureLarge = flag.Bool("measure.large-folios", false, "let the memfds use 2 MiB folios (default: 4 KiB folios only)")
)

func parseSizeMiB(s string) (int64, error) {
	var n int64
	var unit string
	if _, err := fmt.Sscanf(s, "%d%s", &n, &unit); err != nil {
		return 0, fmt.Errorf("size %q: %v", s, err)
	}
	switch strings.ToUpper(unit) {
	case "M":
		return n << 20, nil
	case "G":
		return n << 30, nil
	}
	return 0, fmt.Errorf("size %q: unit must be M or G", s)
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// TestMeasureRestart measures blackout (guest dispatch paused in the old
// sentry → the new one accepting guests) and time to data (→ the relaunched
// guest has retrieved every file and read its last byte) for each size and
// mode, reporting medians. Run it with
//
//	go test ./test -run TestMeasureRestart -measure -v
func TestMeasureRestart(t *testing.T) {
	if !*measure {
		t.Skip("run with -measure")
	}
	type row struct {
		size              string
		mode              string
		blackout, ttd     []time.Duration
		freeze, finalize  []time.Duration
		send, ingest, luo []time.Duration
	}
	var rows []*row
	for _, size := range strings.Split(*measureSizes, ",") {
		bytes, err := parseSizeMiB(size)
		if err != nil {
			t.Fatal(err)
		}
		for _, mode := range []string{"transfer", "exec"} {
			c := newCLI(t)
			id := "measure"
			args := guestArgs(size, rand.Uint64(), true)
			if !*measureLarge {
				args = append(args, "--small-folios")
			}
			mem := fmt.Sprintf("%dM", 3*bytes>>20+256)
			c.must(append([]string{"run", "--detach", "--memory=" + mem, id, "--"}, args...)...)
			c.waitEvent(id, "preserved", 0, 10*time.Minute)
			r := &row{size: size, mode: mode}
			for gen := uint64(1); gen <= uint64(*measureReps); gen++ {
				tm := c.restartFull(id, "--mode="+mode)
				v := c.waitEvent(id, "verified", gen, 10*time.Minute)
				r.blackout = append(r.blackout, tm.Blackout)
				r.ttd = append(r.ttd, time.Duration(v.DataReadyAt-tm.PausedAt))
				r.freeze = append(r.freeze, tm.Freeze)
				r.finalize = append(r.finalize, tm.Finalize)
				r.send = append(r.send, tm.Send)
				r.ingest = append(r.ingest, tm.Ingest)
				r.luo = append(r.luo, tm.LUO)
				t.Logf("%s %s restart %d: blackout %v, time to data %v (freeze %v, finalize %v, send %v, map %v, ingest %v, LUO %v, ready %v)",
					size, mode, gen, tm.Blackout, r.ttd[len(r.ttd)-1], tm.Freeze, tm.Finalize, tm.Send, tm.Map, tm.Ingest, tm.LUO, tm.Ready)
				c.waitEvent(id, "preserved", gen, 10*time.Minute)
			}
			c.must("kill", id)
			c.must("delete", id)
			rows = append(rows, r)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| preserved | mode | blackout (median of %d) | time to data (median) | freeze | finalize | send | ingest+adopt | LUO |\n|---|---|---|---|---|---|---|---|---|\n", *measureReps)
	f := func(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/1e6) }
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.size, r.mode, f(median(r.blackout)), f(median(r.ttd)),
			f(median(r.freeze)), f(median(r.finalize)), f(median(r.send)), f(median(r.ingest)), f(median(r.luo)))
	}
	t.Log(b.String())
}
