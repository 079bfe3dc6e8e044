package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/demo"
)

// luoCLI runs runsc-luo with one root.
type luoCLI struct {
	bin, root string
}

func (c *luoCLI) run(args ...string) (string, error) {
	cmd := exec.Command(c.bin, append([]string{"--root=" + c.root}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("runsc-luo %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// waitEvent waits for the demo guest's line with event ev of generation
// gen in the sandbox's entrypoint log.
func (c *luoCLI) waitEvent(id, ev string, gen uint64, timeout time.Duration) (demo.Event, error) {
	deadline := time.Now().Add(timeout)
	log := filepath.Join(c.root, id, "entrypoint.log")
	for {
		b, _ := os.ReadFile(log)
		for _, line := range strings.Split(string(b), "\n") {
			var e demo.Event
			if json.Unmarshal([]byte(line), &e) != nil {
				continue
			}
			if e.Event == "failed" && e.Generation == gen {
				return e, fmt.Errorf("guest generation %d failed: %s", gen, e.Error)
			}
			if e.Event == ev && e.Generation == gen {
				return e, nil
			}
		}
		if time.Now().After(deadline) {
			return demo.Event{}, fmt.Errorf("no %q event of generation %d within %v; entrypoint log:\n%s", ev, gen, timeout, b)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// measureLivesentry runs one sandbox whose entrypoint is the demo guest
// (3 memfds of random contents totalling r.Size in 2 sessions, 4 KiB or
// 2 MiB folios, a new generation after each restart) and restarts it
// reps times in r.Method's mode, each r.IdleGap after the guest
// preserved its generation (0: at once). Each restart's blackout is the
// sentries' own measure (guest dispatch paused in the old sentry → the
// new one accepting guests); the time to data runs from the same pause
// to the relaunched guest having retrieved every file and read its last
// byte (the guest's DataReadyAt, CLOCK_MONOTONIC like PausedAt). Every
// byte is verified by the guest before the next restart.
func measureLivesentry(c Config, r *Row, reps int) error {
	l, err := startLivesentry(c, r)
	if err != nil {
		return err
	}
	defer l.close()
	for gen := uint64(1); gen <= uint64(reps); gen++ {
		if err := l.restart(gen); err != nil {
			return err
		}
	}
	return nil
}

// measureInterleaved is measureLivesentry for rows of one method and folio
// size at several sizes, their sandboxes all running at once and their
// restarts interleaved: the first restart of each size, then the second
// of each, and so on. A drift of the machine's speed during the run (this
// VM's varies over minutes) then weighs on every size alike, which
// comparing the sizes' medians needs. On error every sandbox is removed.
func measureInterleaved(c Config, rows []*Row, reps int) error {
	var runs []*lsRun
	defer func() {
		for _, l := range runs {
			l.close()
		}
	}()
	for _, r := range rows {
		l, err := startLivesentry(c, r)
		if err != nil {
			return fmt.Errorf("%s: %w", sizeLabel(r.Size), err)
		}
		runs = append(runs, l)
	}
	for gen := uint64(1); gen <= uint64(reps); gen++ {
		for _, l := range runs {
			if err := l.restart(gen); err != nil {
				return fmt.Errorf("%s: %w", sizeLabel(l.r.Size), err)
			}
		}
	}
	return nil
}

// lsRun is one running sandbox of measureLivesentry.
type lsRun struct {
	c       Config
	r       *Row
	cli     *luoCLI
	root    string
	id      string
	timeout time.Duration
}

// startLivesentry starts r's sandbox and waits until its guest has
// preserved its first generation.
func startLivesentry(c Config, r *Row) (*lsRun, error) {
	root, err := os.MkdirTemp(c.WorkDir, "ls-")
	if err != nil {
		return nil, err
	}
	l := &lsRun{c: c, r: r, cli: &luoCLI{bin: c.RunscLUO, root: root}, root: root, id: "bench"}
	args := []string{c.RunscLUO, "demo-guest", fmt.Sprintf("--size=%d", r.Size), "--files=3", "--sessions=2",
		fmt.Sprintf("--seed=%d", rand.Uint64()), "--cycle"}
	if r.Folio == folio4K {
		args = append(args, "--small-folios")
	}
	// Two generations live at once (the one retrieved and the next),
	// plus room for metadata; the file is sparse.
	mem := fmt.Sprintf("--memory=%dM", 3*r.Size>>20+256)
	if _, err := l.cli.run(append([]string{"run", "--detach", mem, l.id, "--"}, args...)...); err != nil {
		os.RemoveAll(root)
		return nil, err
	}
	// Filling and verifying run through the guest socket: allow ~10 s/GiB.
	l.timeout = time.Minute + time.Duration(r.Size>>30)*20*time.Second
	if _, err := l.cli.waitEvent(l.id, "preserved", 0, l.timeout); err != nil {
		l.close()
		return nil, err
	}
	return l, nil
}

// close removes the sandbox.
func (l *lsRun) close() {
	l.cli.run("kill", l.id)
	l.cli.run("delete", "--force", l.id)
	os.RemoveAll(l.root)
}

// restart waits the row's idle gap, restarts the sandbox (its gen-th
// restart), records the blackout and the time to data, and waits until
// the relaunched guest has verified every byte and preserved the next
// generation.
func (l *lsRun) restart(gen uint64) error {
	c, r, cli, id := l.c, l.r, l.cli, l.id
	time.Sleep(r.IdleGap)
	if c.Quiet {
		if waited, err := waitQuiet(quietIdle, quietWindow, quietMax); err != nil {
			return err
		} else if waited >= quietMax {
			c.Logf("%s %s: restart %d after %v without the machine going quiet", sizeLabel(r.Size), folioLabel(r.Folio), gen, waited)
		}
	}
	out, err := cli.run("restart", "--format=json", "--mode="+r.Method, id)
	if err != nil {
		return err
	}
	var t handover.Timing
	if err := json.Unmarshal([]byte(out), &t); err != nil {
		return fmt.Errorf("restart output %q: %w", out, err)
	}
	v, err := cli.waitEvent(id, "verified", gen, l.timeout)
	if err != nil {
		return err
	}
	if v.DataReadyAt <= t.PausedAt {
		return fmt.Errorf("data ready at %d, before the pause at %d", v.DataReadyAt, t.PausedAt)
	}
	if v.RunAt <= t.PausedAt || v.RunAt > v.DataReadyAt {
		return fmt.Errorf("the relaunched guest ran at %d: not between the pause at %d and its data at %d", v.RunAt, t.PausedAt, v.DataReadyAt)
	}
	r.Pause = append(r.Pause, t.Blackout)
	r.Data = append(r.Data, time.Duration(v.DataReadyAt-t.PausedAt))
	r.Relaunch = append(r.Relaunch, time.Duration(v.RunAt-t.PausedAt))
	c.Logf("%s %s: %s restart %d: blackout %v, time to data %v (freeze %v, finalize %v, send %v, map %v, ingest %v, luo %v, ready %v; the relaunched guest runs at %v, its retrieve and last-byte reads take %.1f ms)",
		sizeLabel(r.Size), folioLabel(r.Folio), r.Method, gen, t.Blackout, r.Data[len(r.Data)-1], t.Freeze, t.Finalize, t.Send, t.Map, t.Ingest, t.LUO, t.Ready, r.Relaunch[len(r.Relaunch)-1], v.RetrieveMS)
	if _, err := cli.waitEvent(id, "preserved", gen, l.timeout); err != nil {
		return err
	}
	return nil
}

// The quiet machine a restart waits for (Config.Quiet): the CPUs idle for
// at least quietIdle of the time over quietWindow, waiting at most
// quietMax.
const (
	quietIdle   = 0.95
	quietWindow = 300 * time.Millisecond
	quietMax    = 10 * time.Second
)

// waitQuiet waits until the machine's CPUs were idle at least idle (a
// fraction) of the time over the last window, or until max has passed,
// and returns how long it waited. The work a restart leaves behind (the
// old sentry's exit and its page tables, the old guests' teardown, the
// new sentry's punching of what the guest freed, the host's reclaim of
// the freed memory) grows with the memory involved and runs for seconds
// at 4 GiB; a restart measured in the middle of it would be charged for
// another's work, and a larger size for more of it.
func waitQuiet(idle float64, window, max time.Duration) (time.Duration, error) {
	start := time.Now()
	const step = 50 * time.Millisecond
	need := int(window / step)
	prevIdle, prevTotal, err := cpuTimes()
	if err != nil {
		return 0, err
	}
	quiet := 0
	for quiet < need && time.Since(start) < max {
		time.Sleep(step)
		i, t, err := cpuTimes()
		if err != nil {
			return 0, err
		}
		if t > prevTotal && float64(i-prevIdle)/float64(t-prevTotal) >= idle {
			quiet++
		} else {
			quiet = 0
		}
		prevIdle, prevTotal = i, t
	}
	return time.Since(start), nil
}

// cpuTimes returns the idle (idle and iowait) and total time of all CPUs,
// in clock ticks, from /proc/stat.
func cpuTimes() (idle, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: first line %q", line)
	}
	for i, v := range f[1:] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/stat: %q: %w", line, err)
		}
		total += n
		if i == 3 || i == 4 { // idle, iowait
			idle += n
		}
	}
	return idle, total, nil
}
