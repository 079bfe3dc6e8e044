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
)

// containerd is a private containerd for one test: its own root, state
// and socket under a temporary directory.
type containerd struct {
	t    *testing.T
	dir  string
	sock string
	cmd  *exec.Cmd
}

// startContainerd starts a private containerd, or skips the test saying
// why it cannot run here.
func startContainerd(t *testing.T) *containerd {
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root: run the test as root")
	}
	for _, bin := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s is not on PATH: install the Debian package containerd", bin)
		}
	}
	// A short directory: Unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "ctd-")
	if err != nil {
		t.Fatal(err)
	}
	d := &containerd{t: t, dir: dir, sock: filepath.Join(dir, "c.sock")}
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), d.sock, d.sock+".ttrpc", filepath.Join(dir, "debug.sock"))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Skipf("containerd cannot start here: %v", err)
	}
	logf.Close()
	t.Cleanup(d.stop)
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, _, err := d.ctr("version"); err == nil {
			return d
		}
		if time.Now().After(deadline) || d.cmd.ProcessState != nil {
			b, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Skipf("containerd does not serve here within 15s; its log:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ctr runs ctr against this containerd.
func (d *containerd) ctr(args ...string) (string, string, error) {
	cmd := exec.Command("ctr", append([]string{"--address", d.sock}, args...)...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	// Bounded: a stuck runtime must fail the test, not hang it.
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

func (d *containerd) mustCtr(args ...string) string {
	d.t.Helper()
	out, errOut, err := d.ctr(args...)
	if err != nil {
		d.t.Fatalf("ctr %v: %v\n%s%s", args, err, out, errOut)
	}
	return out
}

// task returns the pid and status "ctr task ls" shows for id.
func (d *containerd) task(id string) (pid, status string) {
	d.t.Helper()
	for _, line := range strings.Split(d.mustCtr("task", "ls"), "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == id {
			return f[1], f[2]
		}
	}
	return "", ""
}

// stop removes what the test left and stops containerd.
func (d *containerd) stop() {
	out, _, _ := d.ctr("task", "ls", "-q")
	for _, id := range strings.Fields(out) {
		d.ctr("task", "kill", "-s", "SIGKILL", id)
		d.ctr("task", "rm", "-f", id)
	}
	out, _, _ = d.ctr("containers", "ls", "-q")
	for _, id := range strings.Fields(out) {
		d.ctr("containers", "rm", id)
	}
	if d.t.Failed() {
		b, _ := os.ReadFile(filepath.Join(d.dir, "containerd.log"))
		d.t.Logf("containerd.log:\n%s", b)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-done
	}
	os.RemoveAll(d.dir)
}

// containerd runs a livesentry container through its runc shim
// (io.containerd.runc.v2 with runsc-luo as the runc binary) from a
// directory root filesystem; a live restart of it with "runsc-luo restart"
// keeps containerd seeing it running with the same pid, and the guest's
// preserved memfd survives (the counter goes on); kill and delete through
// ctr leave nothing behind.
func TestContainerdRunsAndRestartsALivesentryContainer(t *testing.T) {
	counter, _, _ := ociBinaries(t)
	d := startContainerd(t)
	rootfs := filepath.Join(d.dir, "rootfs")
	if err := os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(counter)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "counter"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	runcRoot := filepath.Join(d.dir, "r")
	// The shim runs runsc-luo with --root RUNC_ROOT/NAMESPACE.
	root := filepath.Join(runcRoot, "default")
	d.mustCtr("run", "-d", "--runtime", "io.containerd.runc.v2", "--runc-binary", runsc, "--runc-root", runcRoot,
		"--rootfs", rootfs, "ls1", "/bin/counter")
	log := filepath.Join(root, "ls1", "entrypoint.log")
	waitFor(t, log, "generation 0 count 1", 15*time.Second)
	pid, status := d.task("ls1")
	if status != "RUNNING" || pid == "" {
		t.Fatalf("ctr task ls: pid %q status %q", pid, status)
	}
	if out := d.mustCtr("task", "ps", "ls1"); len(strings.Fields(out)) < 3 {
		t.Errorf("ctr task ps shows no process:\n%s", out)
	}

	c := &cli{t: t, root: root}
	c.restart("ls1")
	waitFor(t, log, "generation 1 count 2", 15*time.Second)
	if pid2, status2 := d.task("ls1"); pid2 != pid || status2 != "RUNNING" {
		t.Fatalf("after the live restart ctr sees pid %q status %q, want %s RUNNING", pid2, status2, pid)
	}

	d.mustCtr("task", "kill", "-s", "SIGKILL", "ls1")
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, st := d.task("ls1"); st == "STOPPED" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the task is not STOPPED 15s after SIGKILL")
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.mustCtr("task", "rm", "ls1")
	d.mustCtr("containers", "rm", "ls1")
	if _, err := os.Stat(filepath.Join(root, "ls1")); !os.IsNotExist(err) {
		t.Errorf("the runtime's state of ls1 is left: %v", err)
	}
	if pids := processesMentioning(root); len(pids) > 0 {
		t.Errorf("processes left: %v", pids)
	}
}
