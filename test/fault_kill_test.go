package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// kill during an exec-mode restart stops the sandbox, whatever phase the
// restart is in when it arrives (checking the new binary, paused, after
// execve): kill exits 0 only once no guest, no sentry and no socket of the
// sandbox is left, and the state says stopped.
func TestFaultKillDuringAnExecModeRestartStopsTheSandbox(t *testing.T) {
	for _, delay := range []time.Duration{5 * time.Millisecond, 30 * time.Millisecond, 80 * time.Millisecond} {
		t.Run(fmt.Sprintf("kill %v into the restart", delay), func(t *testing.T) {
			c := newCLI(t)
			id := fmt.Sprintf("killexec%d", delay.Milliseconds())
			c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("1M", 7, true)...)...)
			c.waitEvent(id, "preserved", 0, 30*time.Second)
			st := c.state(id)
			restart := exec.Command(runsc, "--root="+c.root, "restart", "--mode=exec", id)
			if err := restart.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(delay)
			_, errOut, code := c.run("kill", id)
			restart.Wait()
			if code != 0 {
				t.Logf("kill exited %d: %s", code, errOut)
			}
			after := c.state(id)
			if after.Status != "stopped" {
				t.Errorf("after kill (exit %d): %+v", code, after)
			}
			// Nothing of the sandbox runs, even before delete.
			for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				left := withoutSupervisors(processesOf(c.root))
				if len(left) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("kill exited %d leaving processes %v (the guest was %d)", code, left, st.EntrypointPID)
					break
				}
			}
			for _, p := range []string{st.GuestSocket, st.ControlSocket} {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("kill exited %d leaving %s", code, p)
				}
			}
			c.must("delete", id)
			// (The supervisor exits on its own once the sandbox stopped,
			// within milliseconds; delete does not wait for it.)
			for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				left := processesOf(c.root)
				if len(left) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("after delete: %v", left)
					break
				}
			}
		})
	}
}

// An old sentry that dies after it committed a transfer-mode restart but
// before it killed its guests leaves them to nobody: they are killed at
// once (not after the new sentry's grace period), and the entrypoint is
// relaunched only once the old one has been reaped.
func TestFaultOldGuestsOfACrashAfterTheCommitAreReapedBeforeTheRelaunch(t *testing.T) {
	c := newCLI(t)
	const id = "oldguests"
	pidFile := filepath.Join(c.root, "entry.pid")
	// Each entrypoint says whether the previous one still exists (even as
	// a zombie), then records itself.
	entry := fmt.Sprintf(`f=%s; if [ -e "$f" ]; then o=$(cat "$f"); if [ -e /proc/$o ]; then echo "overlap: $o still exists"; else echo "alone"; fi; fi; echo $$ > "$f"; exec sleep 600`, pidFile)
	c.must("run", "--detach", "--memory=64M", id, "--", "sh", "-c", entry)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(pidFile); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the entrypoint did not start")
		}
	}
	before := c.state(id)
	start := time.Now()
	out, errOut, code := c.run("restart", "--TESTONLY-crash-at=old@offer/committed", id)
	if code != 0 {
		t.Fatalf("restart: exit %d\n%s%s", code, out, errOut)
	}
	// The relaunched entrypoint reports.
	log := filepath.Join(c.root, id, "entrypoint.log")
	var lines []string
	for deadline := time.Now().Add(10 * time.Second); len(lines) == 0; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(log)
		lines = strings.Fields(strings.TrimSpace(string(b)))
		if time.Now().After(deadline) {
			t.Fatal("the entrypoint was not relaunched within 10 s")
		}
	}
	// (The new sentry's grace period for the old guests is 5 s.)
	if el := time.Since(start); el > 4500*time.Millisecond {
		t.Errorf("the entrypoint was relaunched %v after the restart began: the old guests were waited for, not killed", el)
	}
	b, _ := os.ReadFile(log)
	if strings.TrimSpace(string(b)) != "alone" {
		t.Errorf("the relaunched entrypoint: %q", b)
	}
	if processAlive(before.EntrypointPID) {
		t.Errorf("the old entrypoint %d still runs", before.EntrypointPID)
	}
	// Ten more restarts, each relaunch alone.
	for i := 2; i <= 11; i++ {
		c.restart(id)
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			b, _ := os.ReadFile(log)
			if len(strings.Split(strings.TrimSpace(string(b)), "\n")) >= i {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("relaunch %d did not report within 10 s", i)
			}
		}
	}
	b, _ = os.ReadFile(log)
	if strings.Count(string(b), "alone") != 11 || strings.Contains(string(b), "overlap") {
		t.Errorf("entrypoint log after 11 restarts:\n%s", b)
	}
	c.must("kill", id)
	c.must("delete", id)
}

// The children a guest started go with it when a restart stops it (each
// guest leads its own process group), in both modes and when the old
// sentry dies between the commit and the kill of its guests: they never
// pile up behind the relaunched entrypoint.
func TestFaultGuestChildrenDoNotOutliveARestart(t *testing.T) {
	c := newCLI(t)
	const id = "guestkids"
	nap := fmt.Sprintf("600.%d", time.Now().UnixNano()%1e9)
	c.must("run", "--detach", "--memory=64M", id, "--", "sh", "-c", "sleep "+nap+" & wait")
	count := func() []int {
		var pids []int
		for _, pid := range processesMentioning("sleep\x00" + nap) {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if strings.TrimSpace(string(b)) == "sleep" {
				pids = append(pids, pid)
			}
		}
		return pids
	}
	for i, args := range [][]string{{"--mode=transfer"}, {"--mode=exec"}, {"--TESTONLY-crash-at=old@offer/committed"}, {"--mode=transfer"}} {
		out, errOut, code := c.run(append([]string{"restart"}, append(args, id)...)...)
		if code != 0 {
			t.Fatalf("restart %v: exit %d\n%s%s", args, code, out, errOut)
		}
		// The relaunched entrypoint's child, and no other.
		var got []int
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if got = count(); len(got) == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after restart %d (%v): the guests' children %v, want one", i+1, args, got)
			}
		}
	}
	c.must("kill", id)
	// (A killed child takes a moment to die.)
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		got := count()
		if len(got) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("after kill: the guests' children %v", got)
			break
		}
	}
	c.must("delete", id)
}
