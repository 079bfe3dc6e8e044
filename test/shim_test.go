package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
)

// The libc shim seen from plain C programs (test/shimtests): fork, exec
// with and without FD_CLOEXEC, close_range, dup2 onto a placeholder,
// threads.
func TestShimRunsPlainCPrograms(t *testing.T) {
	prog := compileC(t, "shimtests/shim.c", "-lpthread")
	c := newCLI(t)
	t.Run("as the entrypoint", func(t *testing.T) {
		out, errOut, code := c.run("run", "--memory=128M", "shim-entry", "--", prog)
		if code != 0 {
			t.Errorf("exit %d; stderr: %s", code, errOut)
		}
		checkTAP(t, out)
	})
	t.Run("built with _FORTIFY_SOURCE", func(t *testing.T) {
		// As distributions build programs: pread goes through
		// __pread_chk.
		fortified := compileCAs(t, "shimtests/shim.c", "shim_fortified", "-D_FORTIFY_SOURCE=2", "-lpthread")
		if b, err := exec.Command("nm", "-D", fortified).Output(); err != nil || !bytes.Contains(b, []byte("__pread_chk")) {
			t.Fatalf("%s does not call __pread_chk (nm: %v): the case would test nothing", fortified, err)
		}
		out, errOut, code := c.run("run", "--memory=128M", "shim-fortified", "--", fortified)
		if code != 0 {
			t.Errorf("exit %d; stderr: %s", code, errOut)
		}
		checkTAP(t, out)
	})
	c.must("run", "--detach", "--memory=128M", "shim-exec", "--", "sleep", "600")
	t.Run("started with exec", func(t *testing.T) {
		out, errOut, code := c.run("exec", "shim-exec", "--", prog)
		if code != 0 {
			t.Errorf("exit %d; stderr: %s", code, errOut)
		}
		checkTAP(t, out)
	})
	t.Run("exec --shim=false leaves the program on its own", func(t *testing.T) {
		// Without the shim, /dev/liveupdate is the host's (absent) and
		// memfds are host memfds: the cases that need the sentry fail.
		out, _, code := c.run("exec", "--shim=false", "shim-exec", "--", prog)
		if code == 0 || !strings.Contains(out, "not ok") {
			t.Errorf("exit %d without the shim; output:\n%s", code, out)
		}
	})
}

var preloadRE = regexp.MustCompile(`gen=(\d) preload=\[([^\]]*)\]`)

// The shim choice crosses restarts: the relaunched entrypoint gets the
// shim exactly when the first launch did.
func TestShimChoiceCrossesARestart(t *testing.T) {
	script := `echo "gen=$LIVESENTRY_LIVEUPDATE_NUMBER preload=[$LD_PRELOAD]"; exec sleep 600`
	for _, tc := range []struct {
		name     string
		flags    []string
		withShim bool
	}{
		{name: "the default keeps the shim", withShim: true},
		{name: "--shim=false keeps it off", flags: []string{"--shim=false"}, withShim: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCLI(t)
			const id = "shimchoice"
			args := append(append([]string{"run", "--detach", "--memory=64M"}, tc.flags...), id, "--", "/bin/sh", "-c", script)
			c.must(args...)
			c.waitLine(id, "gen=0 ")
			c.restart(id, "--mode="+handover.ModeExec)
			log := c.waitLine(id, "gen=1 ")
			lines := preloadRE.FindAllStringSubmatch(log, -1)
			if len(lines) != 2 {
				t.Fatalf("want the lines of generations 0 and 1, got:\n%s", log)
			}
			for _, m := range lines {
				if got := strings.Contains(m[2], "libshim-"); got != tc.withShim {
					t.Errorf("generation %s: LD_PRELOAD=%q, shim %v, want %v", m[1], m[2], got, tc.withShim)
				}
			}
			c.must("delete", "--force", id)
		})
	}
}

// Without a C compiler to build the shim, the entrypoint starts without it
// and its stderr says so.
func TestShimWithoutACompilerTheEntrypointRunsWithoutIt(t *testing.T) {
	c := newCLI(t)
	run := exec.Command(runsc, "--root="+c.root, "run", "--memory=64M", "nocc", "--", "/bin/sh", "-c", `echo "preload=[$LD_PRELOAD]"`)
	run.Env = append(os.Environ(), "PATH="+t.TempDir(), "LIVESENTRY_SHIM_CACHE="+t.TempDir())
	out, err := run.CombinedOutput()
	if err != nil {
		t.Fatalf("run without a compiler: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "runs without the libc shim: building the livesentry libc shim: no C compiler") || !strings.Contains(string(out), "preload=[]") {
		t.Errorf("output:\n%s", out)
	}
}

// waitLine waits until the entrypoint log of id has a line containing s
// and returns the log.
func (c *cli) waitLine(id, s string) string {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log"))
		if strings.Contains(string(b), s) {
			return string(b)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no %q in the entrypoint log of %s within 30s:\n%s", s, id, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A transfer restart starts the entrypoint's next life before the pause
// only if the running entrypoint said in its Hello that it waits at a start
// gate: a shell that never called the sentry did not, and is relaunched
// after the restart.
func TestAnEntrypointThatNeverSaidItWaitsAtTheGateIsNotStartedEarly(t *testing.T) {
	c := newCLI(t)
	const id = "notearly"
	c.must("run", "--detach", "--memory=64M", id, "--", "/bin/sh", "-c", `echo "gen=$LIVESENTRY_LIVEUPDATE_NUMBER"; exec sleep 600`)
	c.waitLine(id, "gen=0")
	c.restart(id)
	c.waitLine(id, "gen=1")
	if lr := c.state(id).LastRestart; lr == nil || lr.EntrypointStartedEarly {
		t.Errorf("last restart %+v: want the entrypoint relaunched after the restart", lr)
	}
	c.must("delete", "--force", id)
}

// Two lives of the entrypoint never run their own code at once: a life
// started before the pause waits at its start gate until the life before
// has been reaped. Each life holds 128 MiB it touched, so that its
// teardown takes a while, and checks at its start that the life before is
// gone (not even a zombie).
func TestTwoLivesOfTheEntrypointNeverRunAtOnce(t *testing.T) {
	prog := compileC(t, "shimtests/lives.c")
	c := newCLI(t)
	const id = "lives"
	pidFile := filepath.Join(t.TempDir(), "pid")
	c.must("run", "--detach", "--memory=64M", id, "--", prog, pidFile)
	c.waitLine(id, "holding: life 0")
	for gen := 1; gen <= 5; gen++ {
		c.restart(id)
		log := c.waitLine(id, "holding: life "+strconv.Itoa(gen)+"\n")
		if strings.Contains(log, "not ok") {
			t.Fatalf("restart %d:\n%s", gen, log)
		}
		if !strings.Contains(log, "ok: life "+strconv.Itoa(gen)+", the life before") {
			t.Fatalf("restart %d: the life did not check the one before:\n%s", gen, log)
		}
		if lr := c.state(id).LastRestart; lr == nil || !lr.EntrypointStartedEarly {
			t.Fatalf("restart %d: %+v, want the entrypoint started before the pause", gen, lr)
		}
	}
	c.must("delete", "--force", id)
}
