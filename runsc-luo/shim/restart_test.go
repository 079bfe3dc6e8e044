package shim

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/kernel"
)

// A plain C program's reads and writes, interrupted by a restart's pause
// (one that rolls back), are restarted by the shim: the program sees
// each call once, with all its bytes (testdata/writer.c checks them).
func TestTheShimRestartsCallsAPauseInterrupted(t *testing.T) {
	cc, err := compiler()
	if err != nil {
		t.Skip(err)
	}
	t.Setenv(EnvCacheDir, t.TempDir())
	reset()
	t.Cleanup(reset)
	lib, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	prog := filepath.Join(dir, "writer")
	if out, err := exec.Command(cc, "-O2", "-o", prog, "testdata/writer.c").CombinedOutput(); err != nil {
		t.Fatalf("compiling writer.c: %v\n%s", err, out)
	}
	k, err := kernel.New(kernel.Options{MemorySize: 256 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "guest.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- k.Serve(l) }()
	t.Cleanup(func() { k.Resume(); l.Close(); <-served; k.Shutdown() })

	cmd := exec.Command(prog)
	cmd.Env = append(os.Environ(), "LD_PRELOAD="+lib, "LIVESENTRY_GUEST_SOCKET="+sock)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	pauses := 0
	for done := false; !done; {
		select {
		case err := <-exited:
			if err != nil {
				t.Fatalf("writer: %v\n%s", err, out.String())
			}
			done = true
			continue
		case <-time.After(3 * time.Millisecond):
		}
		if err := k.Pause(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatalf("pause %d: %v", pauses, err)
		}
		pauses++
		time.Sleep(time.Millisecond)
		k.Resume()
	}
	if strings.TrimSpace(out.String()) != "ok" {
		t.Fatalf("writer: %s", out.String())
	}
	t.Logf("%d pauses, %d calls interrupted", pauses, k.Interrupts())
	if k.Interrupts() == 0 {
		t.Fatal("no call was interrupted: the test exercised nothing")
	}
}
