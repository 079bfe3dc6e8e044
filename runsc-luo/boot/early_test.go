package boot

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/shim"
)

// earlyShell starts "sh -c script" early under the libc shim (sh is
// dynamically linked) in a new sandbox directory, and returns it with its
// entrypoint log's path.
func earlyShell(t *testing.T, script string) (*earlyEntry, string) {
	t.Helper()
	if _, err := shim.Path(); errors.Is(err, shim.ErrNoCompiler) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	os.Mkdir(sandbox.Dir(root, "s"), 0o700)
	e, err := startEarly(root, prestartSpec{ID: "s", Entrypoint: []string{"/bin/sh", "-c", script}, LiveupdateNumber: 1, GateWait: gateWait})
	if err != nil {
		t.Fatalf("startEarly: %v", err)
	}
	return e, sandbox.EntrypointLogPath(root, "s")
}

// logAfter returns the log at path once d has passed.
func logAfter(path string, d time.Duration) string {
	time.Sleep(d)
	b, _ := os.ReadFile(path)
	return string(b)
}

func TestAnEarlyEntrypointRunsOnlyOnceItsGateOpens(t *testing.T) {
	e, log := earlyShell(t, `echo "ran at liveupdate $LIVESENTRY_LIVEUPDATE_NUMBER, gate ${LIVESENTRY_START_FD:-unset}"`)
	if got := logAfter(log, 100*time.Millisecond); got != "" {
		t.Fatalf("the program ran before its gate opened: %q", got)
	}
	e.gate.Write([]byte{'g'})
	e.gate.Close()
	if err := e.cmd.Wait(); err != nil {
		t.Fatalf("the program after its gate opened: %v", err)
	}
	if got, _ := os.ReadFile(log); string(got) != "ran at liveupdate 1, gate unset\n" {
		t.Fatalf("its output: %q", got)
	}
}

func TestAKilledEarlyEntrypointNeverRuns(t *testing.T) {
	e, log := earlyShell(t, "echo ran")
	pid := e.cmd.Process.Pid
	e.kill()
	if got := logAfter(log, 50*time.Millisecond); got != "" {
		t.Fatalf("the killed program ran: %q", got)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
		t.Errorf("pid %d is still there", pid)
	}
}

func TestAnEarlyEntrypointWhoseGateClosesExitsWithoutRunning(t *testing.T) {
	e, log := earlyShell(t, "echo ran")
	// As when the new sentry is killed: its end of the gate closes.
	e.gate.Close()
	err := e.cmd.Wait()
	if err == nil || e.cmd.ProcessState.ExitCode() != 1 {
		t.Fatalf("the program whose gate closed: %v, want exit status 1", err)
	}
	got, _ := os.ReadFile(log)
	if strings.Contains(string(got), "ran\n") || !strings.Contains(string(got), "closed the start gate without opening it") {
		t.Fatalf("its output: %q", got)
	}
}

func TestAProgramThatDoesNotWaitAtTheGateIsKilledAndNotStartedEarly(t *testing.T) {
	root := t.TempDir()
	os.Mkdir(sandbox.Dir(root, "s"), 0o700)
	// Without the shim nothing in sleep knows the gate.
	_, err := startEarly(root, prestartSpec{ID: "s", Entrypoint: []string{"/bin/sleep", "30"}, NoShim: true, LiveupdateNumber: 1, GateWait: 200 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "did not wait at its start gate") {
		t.Fatalf("startEarly of sleep: %v", err)
	}
	for _, pid := range processesRunning("/bin/sleep\x0030") {
		t.Errorf("sleep 30 (pid %d) still runs", pid)
	}
}

// processesRunning returns the pids whose command line is cmdline (its
// arguments separated by NULs).
func processesRunning(cmdline string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, ent := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err == nil && strings.TrimSuffix(string(b), "\x00") == cmdline {
			pid, _ := strconv.Atoi(ent.Name())
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestThePrestartCrossesTheEnvironmentAndMalformedOnesAreRefused(t *testing.T) {
	want := prestartSpec{ID: "box", Entrypoint: []string{"/bin/prog", "--flag"}, NoShim: true, LiveupdateNumber: 3, GateWait: 250 * time.Millisecond}
	kv := want.env()
	name, val, _ := strings.Cut(kv, "=")
	t.Setenv(name, val)
	got, err := prestartFromEnv()
	if err != nil || got == nil || got.ID != want.ID || !slices.Equal(got.Entrypoint, want.Entrypoint) || got.NoShim != want.NoShim || got.LiveupdateNumber != want.LiveupdateNumber || got.GateWait != want.GateWait {
		t.Fatalf("prestartFromEnv() = %+v, %v; want %+v", got, err, want)
	}
	if _, ok := os.LookupEnv(envPrestart); ok {
		t.Errorf("%s is still set: the guests would inherit it", envPrestart)
	}
	if p, err := prestartFromEnv(); p != nil || err != nil {
		t.Errorf("without the variable: %+v, %v", p, err)
	}
	for _, tc := range []struct{ val, want string }{
		{`{`, "unexpected end of JSON input"},
		{`{"entrypoint":["/p"],"liveupdate_number":1,"gate_wait_ns":1}`, "no id"},
		{`{"id":"b","entrypoint":[],"liveupdate_number":1,"gate_wait_ns":1}`, "no entrypoint"},
		{`{"id":"b","entrypoint":["/p"],"gate_wait_ns":1}`, "liveupdate_number 0"},
		{`{"id":"b","entrypoint":["/p"],"liveupdate_number":1}`, "gate_wait_ns 0"},
	} {
		t.Setenv(envPrestart, tc.val)
		if p, err := prestartFromEnv(); p != nil || err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), envPrestart) {
			t.Errorf("%s=%s: %+v, %v; want an error saying %q", envPrestart, tc.val, p, err, tc.want)
		}
	}
}
