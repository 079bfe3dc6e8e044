package test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
)

// The C selftests (test/selftests) are plain programs that use only the
// Linux uapi: /dev/liveupdate ioctls, memfd_create, mmap. They run
// unmodified as sandbox entrypoints under the libc shim, print TAP, and
// the two-stage ones cross a real live restart. Run them alone with
//
//	go test ./test -run Selftests -v

// compileC builds the C program src (relative to this directory) into
// binDir and returns its path.
func compileC(t *testing.T, src string, extra ...string) string {
	t.Helper()
	return compileCAs(t, src, strings.TrimSuffix(filepath.Base(src), ".c"), extra...)
}

// compileCAs is compileC into binDir/name.
func compileCAs(t *testing.T, src, name string, extra ...string) string {
	t.Helper()
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("the C tests need gcc, which .ci/run installs: %v", err)
		}
		t.Skipf("gcc not installed (apt-get install gcc); .ci/run installs it: %v", err)
	}
	out := filepath.Join(binDir, name)
	if _, err := os.Stat(out); err == nil {
		return out
	}
	args := append([]string{"-O2", "-Wall", "-Wextra", "-Werror", "-o", out, src}, extra...)
	if b, err := exec.Command(gcc, args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %s: %v\n%s", src, err, b)
	}
	return out
}

// checkTAP fails the test on a "not ok" line, and unless every plan of
// output ("1..N") was followed by N "ok" lines in total.
func checkTAP(t *testing.T, output string) {
	t.Helper()
	planned, ok := 0, 0
	for _, line := range strings.Split(output, "\n") {
		var n int
		switch {
		case strings.HasPrefix(line, "not ok"):
			t.Errorf("%s", line)
		case strings.HasPrefix(line, "ok "):
			ok++
		case strings.HasPrefix(line, "1.."):
			if _, err := fmt.Sscanf(line, "1..%d", &n); err == nil {
				planned += n
			}
		}
	}
	if planned == 0 || ok != planned {
		t.Errorf("%d of %d planned cases ok", ok, planned)
	}
	if t.Failed() {
		t.Logf("output:\n%s", output)
	}
}

func TestSelftestsWithinOneLife(t *testing.T) {
	for _, name := range []string{"liveupdate", "memfd_preserve"} {
		t.Run(name, func(t *testing.T) {
			prog := compileC(t, "selftests/"+name+".c")
			c := newCLI(t)
			out, errOut, code := c.run("run", "--memory=256M", name, "--", prog)
			if code != 0 {
				t.Errorf("%s exited %d; stderr: %s", name, code, errOut)
			}
			checkTAP(t, out)
		})
	}
}

// runTwoStages runs prog as the entrypoint of a new sandbox, waits for its
// first stage, restarts the sandbox live in mode, and returns what both
// lives printed once the relaunched program has exited (with status 0, or
// the test fails).
//
// The sandbox runs detached: a foreground "run" removes the sandbox's
// directory as soon as the entrypoint exits, and a second life that ends
// within moments of an exec-mode restart would take with it the state file
// from which "restart" learns the outcome.
func runTwoStages(t *testing.T, c *cli, id, prog, mode string) string {
	t.Helper()
	c.must("run", "--detach", "--memory=256M", id, "--", prog)
	log := filepath.Join(c.root, id, "entrypoint.log")
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(log)
		if bytes.Contains(b, []byte("stage 1 done")) {
			break
		}
		if bytes.Contains(b, []byte("not ok")) || time.Now().After(deadline) {
			t.Fatalf("stage 1 did not finish:\n%s", b)
		}
	}
	tm := c.restart(id, "--mode="+mode)
	if tm.LiveupdateNumber != 1 {
		t.Errorf("liveupdate number %d after the restart, want 1", tm.LiveupdateNumber)
	}
	st := c.waitStopped(id, 120*time.Second)
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitStatus == nil || *st.ExitStatus != 0 {
		t.Errorf("the second life ended with exit status %v, want 0; state: %+v", st.ExitStatus, st)
	}
	return string(b)
}

func TestSelftestsAcrossALiveRestart(t *testing.T) {
	for _, name := range []string{"kexec_simple", "multi_session"} {
		for _, mode := range []string{handover.ModeTransfer, handover.ModeExec} {
			t.Run(name+" in "+mode+" mode", func(t *testing.T) {
				prog := compileC(t, "selftests/"+name+".c")
				out := runTwoStages(t, newCLI(t), name, prog, mode)
				checkTAP(t, out)
				for stage := 1; stage <= 2; stage++ {
					if want := fmt.Sprintf("ok 1 %s stage %d", name, stage); !strings.Contains(out, want+"\n") {
						t.Errorf("no %q in the output:\n%s", want, out)
					}
				}
			})
		}
	}
}

// An unmodified C program fills a memfd through mmap and preserves it
// through the /dev/liveupdate uapi; after a live restart its next life
// retrieves the memfd, maps it and finds every byte.
func TestSelftestsAnUnmodifiedProgramKeepsItsMappedMemfdAcrossARestart(t *testing.T) {
	prog := compileC(t, "selftests/mmap_restart.c")
	for _, mode := range []string{handover.ModeTransfer, handover.ModeExec} {
		t.Run(mode+" mode", func(t *testing.T) {
			c := newCLI(t)
			out := runTwoStages(t, c, "mmap-restart", prog, mode)
			checkTAP(t, out)
			// The shim waits at a start gate: a transfer restart
			// started the second life before the pause.
			if lr := c.state("mmap-restart").LastRestart; lr == nil || lr.EntrypointStartedEarly != (mode == handover.ModeTransfer) {
				t.Errorf("last restart %+v: want the entrypoint started early: %v", lr, mode == handover.ModeTransfer)
			}
			if !strings.Contains(out, "ok 1 mmap_restart stage 2\n") || !strings.Contains(out, "# verified 4194304 bytes through the mapping") {
				t.Errorf("the second life did not verify the mapping:\n%s", out)
			}
		})
	}
}
