package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
)

// A stop asked for while a restart is in progress — the sentry gets
// SIGTERM, or its entrypoint exits — waits for the restart's outcome: it
// is applied after a rollback and dropped after a handoff. The restart
// makes the old sentry sleep 1.5 s before it reads the ack, which leaves a
// window in the middle of the handover; --timeout=1s makes that restart
// roll back, the default timeout lets it hand over.
func TestStopRequestsDuringARestartWaitForItsOutcome(t *testing.T) {
	tests := []struct {
		name       string
		entrypoint []string
		sigterm    bool
		rollback   bool
	}{
		{"SIGTERM during a restart that rolls back stops the sandbox afterwards", nil, true, true},
		{"SIGTERM during a restart that hands over is dropped", nil, true, false},
		{"the entrypoint exiting during a restart that rolls back stops the sandbox afterwards", []string{"exit"}, false, true},
		{"the entrypoint exiting during a restart that hands over is dropped", []string{"exit"}, false, false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCLI(t)
			id := fmt.Sprintf("stopdr%d", i)
			// The entrypoint runs until the file "go" exists (the
			// relaunched one then exits at once).
			goFile := filepath.Join(c.root, "go")
			entry := []string{"sh", "-c", "while [ ! -e " + goFile + " ]; do sleep 0.02; done"}
			if tc.entrypoint == nil {
				entry = []string{"sleep", "600"}
			}
			if out, errOut, code := c.runBinary(runsc, append([]string{"run", "--detach", "--memory=64M", id, "--"}, entry...)...); code != 0 {
				t.Fatalf("run: exit %d\n%s\n%s", code, out, errOut)
			}
			before := c.state(id)
			args := []string{"--root=" + c.root, "restart", "--TESTONLY-commit-delay=1500ms", "--binary=" + runsc}
			if tc.rollback {
				args = append(args, "--timeout=1s")
			}
			cmd := exec.Command(runsc, append(args, id)...)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waitRestartInProgress(t, c)
			if tc.sigterm {
				syscall.Kill(before.PID, syscall.SIGTERM)
			} else {
				os.WriteFile(goFile, nil, 0o600)
			}
			err := cmd.Wait()
			if tc.rollback {
				if err == nil || !strings.Contains(stderr.String(), "rolled back and is still serving") {
					t.Fatalf("restart: %v, %q; want a rollback reported", err, stderr.String())
				}
				// Then the stop is applied.
				st := c.waitStopped(id, 10*time.Second)
				if st.LastPID != before.PID || st.LiveupdateNumber != 0 {
					t.Fatalf("stopped: %+v, before: %+v", st, before)
				}
				for _, p := range []string{st.GuestSocket, st.ControlSocket} {
					if _, err := os.Stat(p); !os.IsNotExist(err) {
						t.Errorf("%s still exists after the stop (%v)", p, err)
					}
				}
				// The supervisor exits once it has seen the stop (it
				// looks every 20 ms), after the sentry.
				left := processesMentioning(c.root)
				for deadline := time.Now().Add(2 * time.Second); len(left) != 0 && time.Now().Before(deadline); left = processesMentioning(c.root) {
					time.Sleep(10 * time.Millisecond)
				}
				if len(left) != 0 {
					t.Errorf("processes of the sandbox 2 s after the stop: %v", left)
				}
				return
			}
			if err != nil {
				t.Fatalf("restart: %v, %q; want a handoff", err, stderr.String())
			}
			st := c.state(id)
			if st.LiveupdateNumber != 1 || st.PID == before.PID {
				t.Fatalf("after the handoff: %+v, before: %+v", st, before)
			}
			if processAlive(before.PID) {
				time.Sleep(500 * time.Millisecond)
				if processAlive(before.PID) {
					t.Errorf("the old sentry %d is still alive", before.PID)
				}
			}
			if tc.sigterm {
				// The new sentry serves, on the sockets the sandbox names.
				if st.Status != "running" {
					t.Fatalf("after the handoff: %+v", st)
				}
				g, err := guest.Dial(st.GuestSocket)
				if err != nil {
					t.Fatalf("dialing the new sentry: %v", err)
				}
				if _, err := g.MemfdCreate("after", 0); err != nil {
					t.Fatalf("a call to the new sentry: %v", err)
				}
				g.Disconnect()
				c.must("kill", id)
			} else {
				// The new sentry relaunched the entrypoint, whose exit
				// stops the sandbox normally.
				st := c.waitStopped(id, 10*time.Second)
				if st.LiveupdateNumber != 1 || st.ExitStatus == nil || *st.ExitStatus != 0 {
					t.Fatalf("stopped: %+v", st)
				}
			}
			c.must("delete", id)
		})
	}
}

// waitRestartInProgress waits until a restart of c's sandbox has started
// its new sentry, then a little longer: with --TESTONLY-commit-delay, that
// is inside the 1.5 s the new sentry sleeps before it decides, the old one
// paused.
func waitRestartInProgress(t *testing.T, c *cli) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		for _, pid := range processesMentioning("--handover-fd=3") {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if strings.Contains(string(b), "--root="+c.root+"\x00") {
				time.Sleep(200 * time.Millisecond)
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the restart did not start its new sentry within 10 s")
		}
	}
}
