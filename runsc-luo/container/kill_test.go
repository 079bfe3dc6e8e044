package container

import (
	"os"
	"os/exec"
	"testing"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// A supervisor is recognised by its pid and its command line: a process
// that took the pid of an exited supervisor is not waited for.
func TestSupervisorRunsOnlyForTheSandboxsSupervisor(t *testing.T) {
	root := t.TempDir()
	const id = "s"
	if err := os.Mkdir(sandbox.Dir(root, id), 0o700); err != nil {
		t.Fatal(err)
	}
	record := func(pid int) {
		t.Helper()
		if err := writeJSON(sandbox.OCIPath(root, id), &OCIRecord{PID: pid}); err != nil {
			t.Fatal(err)
		}
	}
	start := func(args ...string) *exec.Cmd {
		t.Helper()
		cmd := exec.Command("/bin/sh", append([]string{"-c", "sleep 30; :"}, args...)...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	if supervisorRuns(root, id) {
		t.Fatal("a sandbox without an OCI record has a running supervisor")
	}
	sup := start("supervise", "--id="+id, "--memory=1")
	record(sup.Process.Pid)
	if !supervisorRuns(root, id) {
		t.Fatalf("the supervisor (pid %d) is not seen running", sup.Process.Pid)
	}
	other := start("supervise", "--id=other")
	record(other.Process.Pid)
	if supervisorRuns(root, id) {
		t.Fatal("another sandbox's supervisor is taken for this one's")
	}
	record(os.Getpid())
	if supervisorRuns(root, id) {
		t.Fatal("a process that is no supervisor is taken for one")
	}
	sup.Process.Kill()
	sup.Wait()
	record(sup.Process.Pid)
	if supervisorRuns(root, id) {
		t.Fatal("an exited supervisor is taken for a running one")
	}
}
