package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// A restart before the relaunched guest has retrieved its incoming
// sessions is refused, naming them, with the rollback exit status (3),
// until they are retrieved or --force is given; --force hands them over
// again as they came (they are carried), so a guest that retrieves them
// after the second restart verifies every byte.
func TestARestartBeforeTheGuestRetrievedIsRefused(t *testing.T) {
	c := newCLI(t)
	const id = "refuse"
	// The guest relaunched by the first restart never retrieves
	// anything: it just sleeps. The one after the second retrieves what
	// generation 0 preserved, handed over twice.
	entry := "case \"$LIVESENTRY_LIVEUPDATE_NUMBER\" in 0) exec " + strings.Join(guestArgs("1M", 5, false), " ") + ";; 1) exec sleep 600;; *) LIVESENTRY_LIVEUPDATE_NUMBER=1 exec " + strings.Join(guestArgs("1M", 5, false), " ") + ";; esac"
	c.must("run", "--detach", "--memory=64M", id, "--", "sh", "-c", entry)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	c.restart(id)
	before := c.state(id)
	_, errOut, code := c.run("restart", id)
	if code != 3 || !strings.Contains(errOut, `incoming sessions ["demo-session-0" "demo-session-1"]`) || !strings.Contains(errOut, "--force") {
		t.Fatalf("restart with unretrieved sessions: exit %d, %s", code, errOut)
	}
	if st := c.state(id); st.PID != before.PID || st.LiveupdateNumber != before.LiveupdateNumber {
		t.Fatalf("the refused restart changed the sandbox: %+v, before %+v", st, before)
	}
	c.restart(id, "--force")
	if st := c.state(id); st.LiveupdateNumber != before.LiveupdateNumber+1 {
		t.Fatalf("restart --force: %+v", st)
	}
	c.waitEvent(id, "verified", 1, 30*time.Second)
	// That guest exits after verifying, and the sandbox with it.
	if st := c.waitStopped(id, 30*time.Second); st.ExitStatus == nil || *st.ExitStatus != 0 {
		t.Fatalf("the sandbox after the guest verified: %+v", st)
	}
	c.must("delete", id)
}

// Of two restarts started at once, exactly one proceeds; the other is
// refused with the rollback exit status (the sandbox is restarting, or,
// once the first is done, its incoming sessions are not retrieved yet),
// and the guest's data survives.
func TestOfTwoConcurrentRestartsExactlyOneProceeds(t *testing.T) {
	c := newCLI(t)
	const id = "twice"
	// The relaunched entrypoint retrieves only once told to (a file
	// appears): until then a second restart would drop its sessions.
	goFile := filepath.Join(c.root, "go")
	entry := "if [ \"$LIVESENTRY_LIVEUPDATE_NUMBER\" = 0 ]; then exec " + strings.Join(guestArgs("4M", 9, false), " ") +
		"; else while [ ! -e " + goFile + " ]; do sleep 0.02; done; exec " + strings.Join(guestArgs("4M", 9, false), " ") + "; fi"
	c.must("run", "--detach", "--memory=64M", id, "--", "sh", "-c", entry)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	var wg sync.WaitGroup
	codes := make([]int, 2)
	outs := make([]string, 2)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(runsc, "--root="+c.root, "restart", "--timeout=30s", id)
			b, err := cmd.CombinedOutput()
			outs[i] = string(b)
			if ee, ok := err.(*exec.ExitError); ok {
				codes[i] = ee.ExitCode()
			}
		}()
	}
	wg.Wait()
	if !(codes[0] == 0 && codes[1] == 3 || codes[0] == 3 && codes[1] == 0) {
		t.Fatalf("exit statuses %v, want one 0 and one 3:\n%s\n%s", codes, outs[0], outs[1])
	}
	// The guest of generation 1 verifies every byte.
	os.WriteFile(goFile, nil, 0o600)
	c.waitEvent(id, "verified", 1, 30*time.Second)
	// The guest exits after verifying, and the sandbox with it.
	if st := c.waitStopped(id, 30*time.Second); st.ExitStatus == nil || *st.ExitStatus != 0 {
		t.Fatalf("the sandbox after the guest verified: %+v", st)
	}
}

// kill sends SIGTERM to the guests and gives them time to exit: an
// entrypoint that handles it and exits 0 leaves exit status 0; one that
// ignores it is SIGKILLed after the grace period (137).
func TestKillGivesGuestsTimeAndRecordsTheTrueExitStatus(t *testing.T) {
	tests := []struct {
		name  string
		entry string
		want  int
	}{
		{"an entrypoint that exits 0 on SIGTERM", `trap 'echo got-term; exit 0' TERM; while :; do sleep 0.05; done`, 0},
		{"an entrypoint that ignores SIGTERM", `trap '' TERM; while :; do sleep 0.05; done`, 137},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCLI(t)
			id := "term" + string(rune('a'+i))
			c.must("run", "--detach", "--memory=64M", id, "--", "sh", "-c", tc.entry)
			time.Sleep(200 * time.Millisecond)
			c.must("kill", id)
			st := c.state(id)
			if st.Status != "stopped" || st.ExitStatus == nil || *st.ExitStatus != tc.want {
				t.Fatalf("after kill: %+v, want exit status %d", st, tc.want)
			}
			c.must("delete", id)
		})
	}
}

// No fd leaks across restarts: every relaunched entrypoint holds only its
// stdio, and the sentry's own fd count stays flat, in both modes.
func TestRestartsLeakNoFDs(t *testing.T) {
	c := newCLI(t)
	const id = "fdleak"
	entry := `printf 'fds:'; for f in /proc/$$/fd/*; do printf ' %s' "${f##*/}"; done; echo; exec sleep 600`
	c.must("run", "--detach", "--memory=64M", id, "--", "sh", "-c", entry)
	count := func(pid int) int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	// The fd count of the sentry after each restart, by mode.
	counts := map[string][]int{}
	for _, mode := range []string{"transfer", "exec", "transfer", "exec", "transfer", "exec"} {
		c.restart(id, "--mode="+mode)
		st := c.state(id)
		time.Sleep(100 * time.Millisecond)
		counts[mode] = append(counts[mode], count(st.PID))
	}
	for mode, ns := range counts {
		if ns[len(ns)-1] > ns[0] {
			t.Errorf("the sentry's fds after %s-mode restarts: %v, growing", mode, ns)
		}
	}
	time.Sleep(200 * time.Millisecond)
	b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 7 {
		t.Fatalf("entrypoint log: %q", b)
	}
	for i, l := range lines {
		if l != "fds: 0 1 2" {
			t.Errorf("launch %d of the entrypoint: %q, want only its stdio", i, l)
		}
	}
	c.must("kill", id)
}
