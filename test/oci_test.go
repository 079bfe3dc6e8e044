package test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/container"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ociBins are the static programs the OCI tests put in root filesystems:
// the example guest of docs/guests.md in two versions, and the probe.
var ociBins struct {
	once                      sync.Once
	counter, counterV2, probe string
	err                       error
}

func ociBinaries(t testing.TB) (counter, counterV2, probe string) {
	t.Helper()
	ociBins.once.Do(func() {
		b := &ociBins
		b.counter = filepath.Join(binDir, "counter")
		b.counterV2 = filepath.Join(binDir, "counter-v2")
		b.probe = filepath.Join(binDir, "oci_probe")
		for _, p := range []struct{ out, pkg, ldflags string }{
			{b.counter, "./runsc-luo/example/counter", ""},
			{b.counterV2, "./runsc-luo/example/counter", "-X main.version=2"},
			{b.probe, "./test/oci_probe", ""},
		} {
			cmd := exec.Command("go", "build", "-o", p.out, "-ldflags", p.ldflags, "github.com/livesentry/livesentry/"+strings.TrimPrefix(p.pkg, "./"))
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				b.err = fmt.Errorf("building %s: %v\n%s", p.pkg, err, out)
				return
			}
		}
	})
	if ociBins.err != nil {
		t.Fatal(ociBins.err)
	}
	return ociBins.counter, ociBins.counterV2, ociBins.probe
}

// ociBundle makes a bundle whose rootfs holds prog as /bin/NAME and whose
// config.json is "spec"'s, running /bin/NAME args.
func (c *cli) ociBundle(prog string, args ...string) string {
	c.t.Helper()
	bundle := c.t.TempDir()
	bin := filepath.Join(bundle, "rootfs", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		c.t.Fatal(err)
	}
	b, err := os.ReadFile(prog)
	if err != nil {
		c.t.Fatal(err)
	}
	name := filepath.Base(prog)
	if err := os.WriteFile(filepath.Join(bin, name), b, 0o755); err != nil {
		c.t.Fatal(err)
	}
	c.must(append([]string{"spec", "--bundle", bundle, "--", "/bin/" + name}, args...)...)
	return bundle
}

// editSpec changes a bundle's config.json.
func editSpec(t testing.TB, bundle string, change func(*specs.Spec)) {
	t.Helper()
	p := filepath.Join(bundle, "config.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	change(&s)
	if b, err = json.Marshal(&s); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// create runs "create" with its stdout and stderr in files, as a container
// manager gives them (the supervisor keeps them: a pipe would never see
// EOF). It returns the stdout file's path, stderr and the exit code.
func (c *cli) create(id, bundle string, extra ...string) (stdout, stderr string, code int) {
	c.t.Helper()
	dir := c.t.TempDir()
	outPath := filepath.Join(dir, "stdout")
	out, err := os.Create(outPath)
	if err != nil {
		c.t.Fatal(err)
	}
	defer out.Close()
	errf, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		c.t.Fatal(err)
	}
	defer errf.Close()
	cmd := exec.Command(runsc, append(append([]string{"--root=" + c.root, "create", "--bundle", bundle}, extra...), id)...)
	cmd.Stdout, cmd.Stderr = out, errf
	err = cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatal(err)
	}
	b, _ := os.ReadFile(errf.Name())
	return outPath, string(b), code
}

// ociState is "state" as the runtime spec has it.
func (c *cli) ociState(id string) container.OCIState {
	c.t.Helper()
	var st container.OCIState
	if err := json.Unmarshal([]byte(c.must("state", id)), &st); err != nil {
		c.t.Fatalf("state of %s: %v", id, err)
	}
	return st
}

// waitFor waits until file path contains s.
func waitFor(t testing.TB, path, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has no %q within %v:\n%s", path, s, timeout, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The whole lifecycle a container manager drives: create leaves the
// container created with its pid in the pid file, start runs it, state and
// ps see it, a live restart keeps it running with the same pid and the
// guest's preserved memfd, events report the restart's phases, kill stops
// it, wait gives the exit status, a stopped container reports no pid, and
// delete removes it.
func TestOCILifecycle(t *testing.T) {
	counter, _, _ := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(counter)
	pidFile := filepath.Join(t.TempDir(), "pid")
	stdout, errOut, code := c.create("life", bundle, "--pid-file", pidFile)
	if code != 0 {
		t.Fatalf("create: exit %d: %s", code, errOut)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(string(b))
	if err != nil || !processAlive(pid) {
		t.Fatalf("pid file %q: not a live process (%v)", b, err)
	}
	st := c.ociState("life")
	if st.Status != specs.StateCreated || st.Pid != pid || st.Bundle != bundle || st.Version != specs.Version || st.ID != "life" {
		t.Fatalf("state after create: %+v", st.State)
	}
	if b, _ := os.ReadFile(filepath.Join(c.root, "life", "entrypoint.log")); strings.Contains(string(b), "counter") {
		t.Fatalf("the process ran before start: %s", b)
	}
	if _, errOut, code := c.run("restart", "life"); code != 1 || !strings.Contains(errOut, "start it first") {
		t.Errorf("restart of a created container: exit %d: %s", code, errOut)
	}

	c.must("start", "life")
	waitFor(t, stdout, "generation 0 count 1", 10*time.Second)
	if st := c.ociState("life"); st.Status != specs.StateRunning || st.Pid != pid {
		t.Fatalf("state after start: %+v", st.State)
	}
	if _, errOut, code := c.run("start", "life"); code != 1 || !strings.Contains(errOut, "already running") {
		t.Errorf("second start: exit %d: %s", code, errOut)
	}
	var pids []int
	if err := json.Unmarshal([]byte(c.must("ps", "--format", "json", "life")), &pids); err != nil || len(pids) < 2 {
		t.Fatalf("ps --format json: %v %v", pids, err)
	}
	if out := c.must("ps", "life"); !strings.Contains(out, "/bin/counter") {
		t.Errorf("ps does not show the process:\n%s", out)
	}

	c.restart("life")
	waitFor(t, stdout, "generation 1 count 2", 10*time.Second)
	st = c.ociState("life")
	if st.Status != specs.StateRunning || st.Pid != pid || len(st.Livesentry.Restarts) != 1 {
		t.Fatalf("state after restart: %+v, restarts %+v", st.State, st.Livesentry.Restarts)
	}
	r := st.Livesentry.Restarts[0]
	var names []string
	for _, p := range r.Phases {
		names = append(names, p.Name)
	}
	if r.Mode != "transfer" || r.Outcome != "restarted" || strings.Join(names, ",") != "freeze,finalize,send,map,ingest,luo,ready,blackout" {
		t.Errorf("restart record: %+v", r)
	}

	var stats struct {
		Type string         `json:"type"`
		ID   string         `json:"id"`
		Data map[string]any `json:"data"`
	}
	if err := json.Unmarshal([]byte(c.must("events", "--stats", "life")), &stats); err != nil || stats.Type != "stats" || stats.ID != "life" || stats.Data["liveupdate_number"] != float64(1) {
		t.Errorf("events --stats: %+v %v", stats, err)
	}
	events := exec.Command(runsc, "--root="+c.root, "events", "--interval=1h", "life")
	evOut, err := events.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := events.Start(); err != nil {
		t.Fatal(err)
	}
	wait := exec.Command(runsc, "--root="+c.root, "wait", "life")
	var waitOut strings.Builder
	wait.Stdout = &waitOut
	if err := wait.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	c.restart("life")
	waitFor(t, stdout, "generation 2 count 3", 10*time.Second)
	c.must("kill", "life", "KILL")
	if err := wait.Wait(); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(waitOut.String()); got != `{"id":"life","exitStatus":137}` {
		t.Errorf("wait printed %q", got)
	}
	var types []string
	dec := json.NewDecoder(evOut)
	for {
		var e struct {
			Type string          `json:"type"`
			Data json.RawMessage `json:"data"`
		}
		if dec.Decode(&e) != nil {
			break
		}
		types = append(types, e.Type)
		if e.Type == "restart" && !strings.Contains(string(e.Data), `"name":"blackout"`) {
			t.Errorf("restart event without its phases: %s", e.Data)
		}
	}
	events.Wait()
	if got := strings.Join(types, ","); got != "state,stats,restart,state,exit" {
		t.Errorf("events: %s", got)
	}

	st = c.ociState("life")
	if st.Status != specs.StateStopped || st.Pid != 0 || st.Livesentry.PID != 0 || st.Livesentry.EntrypointPID != 0 || st.Livesentry.LastPID == 0 {
		t.Errorf("a stopped container reports a pid: %+v", st)
	}
	deadline := time.Now().Add(5 * time.Second)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("the supervisor %d outlives its stopped container", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.must("delete", "life")
	if _, errOut, code := c.run("state", "life"); code != 1 || !strings.Contains(errOut, "does not exist") {
		t.Errorf("state after delete: exit %d: %s", code, errOut)
	}
}
