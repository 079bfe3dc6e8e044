package test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// probeReport is what test/oci_probe prints.
type probeReport struct {
	Args        []string `json:"args"`
	Env         []string `json:"env"`
	Cwd         string   `json:"cwd"`
	UID         int      `json:"uid"`
	GID         int      `json:"gid"`
	Groups      []int    `json:"groups"`
	NofileMax   uint64   `json:"nofile_max"`
	CoreCur     uint64   `json:"core_cur"`
	CoreMax     uint64   `json:"core_max"`
	Hostname    string   `json:"hostname"`
	PID         int      `json:"pid"`
	GuestSocket bool     `json:"guest_socket"`
	RootEntries []string `json:"root_entries"`
}

// probeReports returns the probe's reports in a sandbox's entrypoint log,
// waiting for n of them.
func (c *cli) probeReports(id string, n int) []probeReport {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log"))
		var out []probeReport
		for _, line := range strings.Split(string(b), "\n") {
			var r probeReport
			if json.Unmarshal([]byte(line), &r) == nil && r.Args != nil {
				out = append(out, r)
			}
		}
		if len(out) >= n {
			return out
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%d probe reports, want %d; log:\n%s", len(out), n, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The process runs as config.json says, in its own root filesystem and
// namespaces, with nothing of the host's environment, and again so after a
// live restart relaunched it.
func TestOCIProcessFollowsConfig(t *testing.T) {
	_, _, probe := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(probe, "two words", "--hold")
	if err := os.MkdirAll(filepath.Join(bundle, "rootfs", "work"), 0o755); err != nil {
		t.Fatal(err)
	}
	editSpec(t, bundle, func(s *specs.Spec) {
		s.Process.Env = append(s.Process.Env, "FOO=bar")
		s.Process.Cwd = "/work"
		s.Process.User = specs.User{UID: 1000, GID: 1001, AdditionalGids: []uint32{5, 6}}
		s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 100, Hard: 200}, {Type: "RLIMIT_CORE", Soft: 4096, Hard: 8192}}
		s.Hostname = "probe-host"
	})
	c.must("run", "--detach", "--bundle", bundle, "probe")
	check := func(r probeReport, gen string) {
		t.Helper()
		if !slices.Equal(r.Args, []string{"/bin/oci_probe", "two words", "--hold"}) {
			t.Errorf("args %q", r.Args)
		}
		if !slices.Contains(r.Env, "FOO=bar") || !slices.Contains(r.Env, "LIVESENTRY_GUEST_SOCKET=/dev/.livesentry/guest.sock") ||
			!slices.Contains(r.Env, "LIVESENTRY_LIVEUPDATE_NUMBER="+gen) {
			t.Errorf("env %q", r.Env)
		}
		for _, kv := range r.Env {
			if strings.HasPrefix(kv, "HOME=") || strings.HasPrefix(kv, "GOPATH=") {
				t.Errorf("the host's environment leaked in: %q", kv)
			}
			if v, ok := strings.CutPrefix(kv, "LD_PRELOAD="); ok && v != "/dev/.livesentry/libshim.so" {
				t.Errorf("LD_PRELOAD=%s: want the shim bound into the container", v)
			}
		}
		if r.Cwd != "/work" || r.UID != 1000 || r.GID != 1001 || !slices.Equal(r.Groups, []int{5, 6}) {
			t.Errorf("cwd %q uid %d gid %d groups %v", r.Cwd, r.UID, r.GID, r.Groups)
		}
		if r.NofileMax != 200 || r.CoreCur != 4096 || r.CoreMax != 8192 {
			t.Errorf("RLIMIT_NOFILE hard %d, RLIMIT_CORE %d/%d; want 200, 4096/8192", r.NofileMax, r.CoreCur, r.CoreMax)
		}
		if r.Hostname != "probe-host" || r.PID != 1 || !r.GuestSocket {
			t.Errorf("hostname %q pid %d guest socket %v", r.Hostname, r.PID, r.GuestSocket)
		}
		if slices.Contains(r.RootEntries, "usr") || !slices.Contains(r.RootEntries, "bin") || !slices.Contains(r.RootEntries, "work") {
			t.Errorf("/ is not the bundle's root filesystem: %v", r.RootEntries)
		}
	}
	check(c.probeReports("probe", 1)[0], "0")
	c.restart("probe")
	check(c.probeReports("probe", 2)[1], "1")
	c.must("kill", "probe", "KILL")
	c.must("delete", "probe")
}

// The process's exit status is the container's: wait reports it and the
// supervisor (the pid a container manager waits on) exits with it.
func TestOCIExitStatusIsTheProcesss(t *testing.T) {
	_, _, probe := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(probe, "--exit=7")
	c.must("run", "--detach", "--bundle", bundle, "exit7")
	if out := strings.TrimSpace(c.must("wait", "exit7")); out != `{"id":"exit7","exitStatus":7}` {
		t.Errorf("wait: %s", out)
	}
	st := c.ociState("exit7")
	if st.Status != specs.StateStopped || st.Pid != 0 || st.Livesentry.ExitStatus == nil || *st.Livesentry.ExitStatus != 7 {
		t.Errorf("state: %+v", st)
	}
	c.must("delete", "exit7")
	// Foreground run exits with it too, and deletes the container.
	if _, errOut, code := c.run("run", "--bundle", bundle, "exit7fg"); code != 7 {
		t.Errorf("run: exit %d: %s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(c.root, "exit7fg")); !os.IsNotExist(err) {
		t.Errorf("run left the container behind: %v", err)
	}
}

// SIGTERM (or Ctrl-C) to a foreground run stops the container as kill
// does, and run exits with its status, leaving nothing behind.
func TestOCIForegroundRunStopsOnSIGTERM(t *testing.T) {
	counter, _, _ := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(counter)
	out := filepath.Join(t.TempDir(), "out")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(runsc, "--root="+c.root, "run", "--bundle", bundle, "fg")
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, out, "generation 0 count 1", 10*time.Second)
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		t.Fatal("run did not stop after SIGTERM")
	}
	if cmd.ProcessState.ExitCode() == 0 {
		t.Errorf("run exited 0 after SIGTERM")
	}
	if _, err := os.Stat(filepath.Join(c.root, "fg")); !os.IsNotExist(err) {
		t.Errorf("the container is left behind: %v", err)
	}
	if pids := processesMentioning(c.root); len(pids) > 0 {
		t.Errorf("processes left: %v", pids)
	}
}

// kill without --all signals the container's process (through its init,
// into its pid namespace), which handles it and exits by itself.
func TestOCIKillSignalsTheProcess(t *testing.T) {
	_, _, probe := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(probe, "--trap-usr1")
	c.must("run", "--detach", "--bundle", bundle, "usr1")
	c.probeReports("usr1", 1)
	c.must("kill", "usr1", "USR1")
	if out := strings.TrimSpace(c.must("wait", "usr1")); out != `{"id":"usr1","exitStatus":0}` {
		t.Errorf("wait: %s", out)
	}
	if b, _ := os.ReadFile(filepath.Join(c.root, "usr1", "entrypoint.log")); !strings.Contains(string(b), "got SIGUSR1") {
		t.Errorf("the process did not get SIGUSR1:\n%s", b)
	}
	if _, errOut, code := c.run("kill", "usr1", "USR1"); code != 1 || !strings.Contains(errOut, "container not running") {
		t.Errorf("kill of a stopped container: exit %d: %s", code, errOut)
	}
	c.must("delete", "usr1")
}
