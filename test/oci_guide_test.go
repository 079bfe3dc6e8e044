package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The example of docs/guests.md as a user runs it: the counter guest
// (runsc-luo/example/counter) in a container counts on across live
// restarts, then both the guest and the sentry are upgraded live: a new
// build of the guest replaces the old one in the root filesystem and
// "restart --binary" moves the sandbox to a new runsc-luo, and the count
// survives both. --debug reaches every sentry, the restarted ones too.
func TestOCIGuideCounterUpgradesLive(t *testing.T) {
	counter, counterV2, _ := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(counter)
	debugLog := filepath.Join(t.TempDir(), "debug.log")
	c.must("--debug", "--debug-log", debugLog, "run", "--detach", "--bundle", bundle, "guide")
	log := filepath.Join(c.root, "guide", "entrypoint.log")
	waitFor(t, log, "counter 1: generation 0 count 1", 10*time.Second)
	c.restart("guide")
	waitFor(t, log, "counter 1: generation 1 count 2", 10*time.Second)

	// A new guest: replace the program atomically; the restart relaunches
	// the new one.
	b, err := os.ReadFile(counterV2)
	if err != nil {
		t.Fatal(err)
	}
	prog := filepath.Join(bundle, "rootfs", "bin", "counter")
	if err := os.WriteFile(prog+".new", b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(prog+".new", prog); err != nil {
		t.Fatal(err)
	}
	tm := c.restart("guide", "--binary", runscV2)
	if tm.NewVersion != "livesentry-v2" {
		t.Errorf("restart --binary: new version %q", tm.NewVersion)
	}
	waitFor(t, log, "counter 2: generation 2 count 3", 10*time.Second)

	st := c.state("guide")
	if st.Version != "livesentry-v2" {
		t.Errorf("the sentry's version after the upgrade: %q", st.Version)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.PID))
	if !strings.Contains(string(cmdline), "--debug=true") {
		t.Errorf("the restarted sentry runs without --debug: %q", strings.ReplaceAll(string(cmdline), "\x00", " "))
	}
	if b, _ := os.ReadFile(filepath.Join(c.root, "guide", "sentry.log")); !strings.Contains(string(b), "\nD") && !strings.HasPrefix(string(b), "D") {
		t.Errorf("no debug line in sentry.log:\n%s", b)
	}
	// Every sentry logs to --debug-log: the first one and the two a
	// restart started (the supervisor too); debug lines are there.
	b, _ = os.ReadFile(debugLog)
	pids := map[string]bool{}
	debug := false
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 3 {
			pids[f[2]] = true
			debug = debug || strings.HasPrefix(f[0], "D")
		}
	}
	if st := c.state("guide"); !debug || !pids[fmt.Sprint(st.PID)] || len(pids) < 4 {
		t.Errorf("--debug-log has lines of processes %v (debug lines: %v); want the serving sentry %d among at least 4\n%s", pids, debug, st.PID, b)
	}
	c.must("kill", "guide", "KILL")
	c.must("delete", "guide")
}
