// Package test holds the end-to-end tests of livesentry: real runsc-luo
// processes, real sentries, real live restarts.
//
// TestMain builds the binaries the tests run into a temporary directory:
// runsc-luo itself, a second build with another version string (a new
// binary to restart into), the format-compatibility builds (one that reads
// and writes only the first formats, one only the newest, and one whose
// memfd format is an unknown "memfd-v9"; kernel.formatsBuild). Faults are injected through the restart's options
// (restart --TESTONLY-commit-delay, --TESTONLY-crash-at), not through special builds.
package test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/demo"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

var (
	// runsc is the runsc-luo under test; runscV2 the same code with
	// version "livesentry-v2"; runscV9 with memfd handler "memfd-v9" as
	// its only memfd format; runscFirst the build of the first formats
	// only, runscNewest of the newest only.
	runsc, runscV2, runscV9, runscFirst, runscNewest string
	// binDir holds the binaries and helper scripts.
	binDir string
)

func build(out string, ldflags string) error {
	args := []string{"build", "-o", out}
	if ldflags != "" {
		args = append(args, "-ldflags", ldflags)
	}
	cmd := exec.Command("go", append(args, "github.com/livesentry/livesentry/runsc-luo")...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", out, err, b)
	}
	return nil
}

func TestMain(m *testing.M) {
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "livesentry-e2e-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		binDir = dir
		runsc = filepath.Join(dir, "runsc-luo")
		runscV2 = filepath.Join(dir, "runsc-luo-v2")
		runscV9 = filepath.Join(dir, "runsc-luo-memfd-v9")
		runscFirst = filepath.Join(dir, "runsc-luo-first-formats")
		runscNewest = filepath.Join(dir, "runsc-luo-newest-formats")
		const formats = "-X github.com/livesentry/livesentry/pkg/sentry/kernel.formatsBuild="
		for _, b := range []struct{ out, ldflags string }{
			{runsc, ""},
			{runscV2, "-X main.version=livesentry-v2"},
			{runscV9, "-X main.version=livesentry-memfd-v9 " + formats + "v1 -X github.com/livesentry/livesentry/pkg/sentry/memfd.compatible=memfd-v9"},
			{runscFirst, "-X main.version=livesentry-first-formats " + formats + "v1"},
			{runscNewest, "-X main.version=livesentry-newest-formats " + formats + "newest"},
		} {
			if err := build(b.out, b.ldflags); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
		return m.Run()
	}())
}

// cli runs runsc-luo with a root; it returns stdout, stderr and the exit
// code.
type cli struct {
	t    testing.TB
	root string
}

func newCLI(t testing.TB) *cli {
	t.Helper()
	// A short root: Unix socket paths are limited to 108 bytes.
	root, err := os.MkdirTemp("", "ls-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	c := &cli{t: t, root: root}
	t.Cleanup(func() {
		if t.Failed() {
			for _, name := range []string{"sentry.log", "entrypoint.log"} {
				matches, _ := filepath.Glob(filepath.Join(root, "*", name))
				for _, m := range matches {
					b, _ := os.ReadFile(m)
					t.Logf("%s:\n%s", m, b)
				}
			}
		}
		// Whatever a failed test left running goes, then the root.
		out, _, _ := c.run("list", "-q")
		for _, id := range strings.Fields(out) {
			c.run("delete", "--force", id)
		}
		os.RemoveAll(root)
	})
	return c
}

func (c *cli) run(args ...string) (string, string, int) {
	return c.runBinary(runsc, args...)
}

func (c *cli) runBinary(bin string, args ...string) (string, string, int) {
	cmd := exec.Command(bin, append([]string{"--root=" + c.root}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("running %s %v: %v", bin, args, err)
	}
	return stdout.String(), stderr.String(), code
}

// killAndDelete kills and deletes sandbox id and checks that no process of
// the test's root is left (sentries, spares, supervisors, guests).
func (c *cli) killAndDelete(id string) {
	c.t.Helper()
	c.must("kill", id)
	c.must("delete", id)
	if left := processesMentioning(c.root); len(left) != 0 {
		c.t.Errorf("processes left after kill and delete: %v", left)
	}
}

// must runs runsc-luo and fails the test unless it exits 0.
func (c *cli) must(args ...string) string {
	c.t.Helper()
	out, errOut, code := c.run(args...)
	if code != 0 {
		c.t.Fatalf("runsc-luo %v: exit %d\nstdout: %s\nstderr: %s", args, code, out, errOut)
	}
	return out
}

// sandboxState is livesentry's part of what "runsc-luo state" prints
// (under "livesentry", next to the runtime spec's state).
type sandboxState = sandbox.State

func (c *cli) state(id string) sandboxState {
	c.t.Helper()
	var st struct {
		Livesentry *sandboxState `json:"livesentry"`
	}
	if err := json.Unmarshal([]byte(c.must("state", id)), &st); err != nil || st.Livesentry == nil {
		c.t.Fatalf("state of %s: %v", id, err)
	}
	return *st.Livesentry
}

// timing is "restart --format json": the handover package's Timing.
type timing = handover.Timing

func (c *cli) restartFull(id string, args ...string) timing { return c.restart(id, args...) }

func (c *cli) restart(id string, args ...string) timing {
	c.t.Helper()
	out := c.must(append(append([]string{"restart", "--format=json"}, args...), id)...)
	var t timing
	if err := json.Unmarshal([]byte(out), &t); err != nil {
		c.t.Fatalf("restart output %q: %v", out, err)
	}
	return t
}

// event is one JSON line of demo-guest.
type event = demo.Event

// waitEvent waits for demo-guest's line with event and generation.
func (c *cli) waitEvent(id, ev string, gen uint64, timeout time.Duration) event {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log"))
		for _, line := range strings.Split(string(b), "\n") {
			var e event
			if json.Unmarshal([]byte(line), &e) != nil {
				continue
			}
			if e.Event == "failed" && e.Generation == gen {
				c.t.Fatalf("guest generation %d failed: %s", gen, e.Error)
			}
			if e.Event == ev && e.Generation == gen {
				return e
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no %q event of generation %d within %v; log:\n%s", ev, gen, timeout, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitStopped waits until the sandbox's state says stopped.
func (c *cli) waitStopped(id string, timeout time.Duration) sandboxState {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := c.state(id)
		if st.Status == "stopped" && !processAlive(st.PID) {
			return st
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("sandbox %s still %s after %v", id, st.Status, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// processAlive reports whether pid is a live (non-zombie) process.
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}

// withoutSupervisors drops the sandboxes' supervisors and their spare
// sentries from pids: they name the root (the supervisor the entrypoint
// too) and outlive every sentry.
func withoutSupervisors(pids []int) []int {
	var out []int
	for _, pid := range pids {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if !bytes.Contains(b, []byte("\x00supervise\x00")) && !bytes.Contains(b, []byte("\x00--spare-fd=")) {
			out = append(out, pid)
		}
	}
	return out
}

// processesMentioning returns the pids of live processes whose command
// line contains s.
func processesMentioning(s string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(s)) && processAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// guestArgs returns the entrypoint of a demo guest.
func guestArgs(size string, seed uint64, cycle bool) []string {
	args := []string{runsc, "demo-guest", "--size=" + size, "--files=3", "--sessions=2", fmt.Sprintf("--seed=%d", seed)}
	if cycle {
		args = append(args, "--cycle")
	}
	return args
}
