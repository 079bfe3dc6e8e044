package test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// An exec-mode restart that fails after execve cannot roll back, but it
// must not leave the sandbox's guests running unnoticed: a new image that
// refuses the descriptor stops them itself; one that dies before it can
// (not even a sentry) leaves them to kill and delete, which stop the
// guests the state file records.
func TestExecModeRestartFailingAfterExecveLeavesNoGuests(t *testing.T) {
	tests := []struct {
		name string
		// boot is what the script does when asked to boot.
		boot string
		// byItself: the new image stops the old guests itself.
		byItself bool
	}{
		{"a new image that refuses the descriptor stops the old guests", "exec " + runscV9 + ` "$@"`, true},
		{"a new image that dies at once leaves the guests to kill", "echo dying at boot >&2; exit 3", false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCLI(t)
			id := fmt.Sprintf("execfail%d", i)
			// The script passes the ABI probe as runsc-luo, then boots as
			// tc.boot says.
			script := filepath.Join(c.root, "badboot.sh")
			os.WriteFile(script, []byte(fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = abi ]; then exec %s abi; fi\n%s\n", runsc, tc.boot)), 0o755)
			nap := fmt.Sprintf("600.%09d", rand.IntN(1e9))
			// The entrypoint preserves memfds; the descriptor is written
			// in the newest formats runsc-luo reads (the probe's answer),
			// which runscV9, a build of the first formats, refuses.
			c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("1M", 1, false)...)...)
			c.waitEvent(id, "preserved", 0, 30*time.Second)
			before := c.state(id)
			// A second guest through exec.
			ex := command(t, runsc, "--root="+c.root, "exec", id, "--", "sleep", nap+"1")
			if err := ex.Start(); err != nil {
				t.Fatal(err)
			}
			defer ex.Wait()
			var execd []int
			for deadline := time.Now().Add(10 * time.Second); len(execd) == 0; time.Sleep(5 * time.Millisecond) {
				for _, pid := range processesMentioning("sleep\x00" + nap + "1") {
					if pid != ex.Process.Pid {
						execd = append(execd, pid)
					}
				}
				if time.Now().After(deadline) {
					t.Fatal("the exec'd guest did not start")
				}
			}
			_, errOut, code := c.run("restart", "--mode=exec", "--timeout=2s", "--binary="+script, id)
			if code == 0 {
				t.Fatalf("the restart succeeded: %s", errOut)
			}
			t.Logf("restart: %s", strings.TrimSpace(errOut))
			guests := append([]int{before.EntrypointPID}, execd...)
			if tc.byItself {
				st := c.state(id)
				if st.Status != "stopped" || !strings.Contains(st.Error, "after execve") || !strings.Contains(st.Error, `unknown compatible "kho-v2"`) {
					t.Errorf("state after the refused exec: %+v", st)
				}
			} else {
				if out, errOut, code := c.run("kill", id); code != 0 {
					t.Fatalf("kill of the sandbox whose sentry is gone: exit %d, %s %s", code, out, errOut)
				}
			}
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				var alive []int
				for _, pid := range guests {
					if processAlive(pid) {
						alive = append(alive, pid)
					}
				}
				if len(alive) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("guests %v still alive", alive)
				}
			}
			for _, p := range []string{before.GuestSocket, before.ControlSocket} {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("%s still exists (%v)", p, err)
				}
			}
			c.must("delete", id)
		})
	}
}
