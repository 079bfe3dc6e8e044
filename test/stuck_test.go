package test

import (
	"bytes"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// A sentry that does not answer (here: stopped with SIGSTOP) must not hang
// kill: its control call times out, and the SIGKILL fallback stops the
// sentry and its entrypoint.
func TestKillOfAStuckSentryReachesItsSIGKILLFallback(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	const id = "stuck"
	c.must("run", "--detach", "--memory=64M", id, "--", "sleep", "600")
	st := c.state(id)
	if err := syscall.Kill(st.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(st.PID, syscall.SIGKILL); syscall.Kill(st.EntrypointPID, syscall.SIGKILL) })
	cmd := exec.Command(runsc, "--root="+c.root, "kill", id)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	start := time.Now()
	select {
	case err := <-done:
		t.Logf("kill of a stuck sentry: %v after %v: %s", err, time.Since(start), stderr.String())
	case <-time.After(40 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("kill of a stuck sentry still running after 40 s")
	}
	for deadline := time.Now().Add(5 * time.Second); processAlive(st.PID) || processAlive(st.EntrypointPID); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after kill: sentry %d alive %v, entrypoint %d alive %v", st.PID, processAlive(st.PID), st.EntrypointPID, processAlive(st.EntrypointPID))
		}
	}
}
