package test

import (
	"encoding/binary"
	"io"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

// A guest stuck in the middle of a call does not hold a restart: the
// pause interrupts the call (ERESTARTSYS), the restart goes through, and
// the stuck guest, like every guest, is cut off at the handoff.
func TestAGuestStuckMidCallDoesNotHoldARestart(t *testing.T) {
	c := newCLI(t)
	const id = "stuckcall"
	c.must("run", "--detach", "--memory=64M", id, "--", "sleep", "600")
	st := c.state(id)
	raw, err := net.Dial("unix", st.GuestSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.Write(hello())
	var hb [abiguest.HelloSize]byte
	if _, err := io.ReadFull(raw, hb[:]); err != nil {
		t.Fatal(err)
	}
	raw.Write(memfdCreate())
	res := make([]byte, abiguest.ResponseHeaderSize)
	if _, err := io.ReadFull(raw, res); err != nil {
		t.Fatal(err)
	}
	// A write promising 1 MiB of which only 4 KiB come.
	w := header(abiguest.OpWrite, 1<<20)
	binary.LittleEndian.PutUint64(w[8:], 0)
	raw.Write(append(w, make([]byte, 4096)...))
	time.Sleep(50 * time.Millisecond)

	// Without the interruption, the pause would wait for the call until
	// the restart's timeout and the restart would roll back.
	out, errOut, code := c.run("restart", "--timeout=20s", id)
	if code != 0 {
		t.Fatalf("restart with a guest stuck mid-call: exit %d\n%s\n%s", code, out, errOut)
	}
	// The old sentry cut the stuck guest off at the handoff.
	raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, raw); err != nil {
		t.Fatalf("the stuck guest's connection after the restart: %v, want EOF", err)
	}
	g, err := guest.Dial(st.GuestSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Disconnect()
	if _, err := g.MemfdCreate("after", 0); err != nil {
		t.Fatalf("a guest after the restart: %v", err)
	}
	c.must("kill", id)
}

// No guest can be launched while a restart is in progress (it would
// survive an exec-mode execve unnoticed): Exec on a control connection
// opened before the restart is refused with EBUSY.
func TestExecDuringARestartIsRefused(t *testing.T) {
	c := newCLI(t)
	const id = "execblackout"
	if out, errOut, code := c.run("run", "--detach", "--memory=64M", id, "--", "sleep", "600"); code != 0 {
		t.Fatalf("run: exit %d\n%s\n%s", code, out, errOut)
	}
	st := c.state(id)
	sock, err := unet.Connect(st.ControlSocket, false)
	if err != nil {
		t.Fatal(err)
	}
	cl := urpc.NewClient(sock)
	defer cl.Close()
	restart := exec.Command(runsc, "--root="+c.root, "restart", "--TESTONLY-commit-delay=1500ms", "--binary="+runsc, id)
	if err := restart.Start(); err != nil {
		t.Fatal(err)
	}
	// Inside the new sentry's 1.5 s sleep before it decides.
	waitRestartInProgress(t, c)
	var pid boot.PIDResult
	err = cl.Call(boot.MethodExec, &boot.ExecArgs{Argv: []string{"sleep", "600"}}, &pid)
	if err == nil || !strings.Contains(err.Error(), "restarting") {
		t.Errorf("Exec during a restart: pid %d, %v; want it refused", pid.PID, err)
	}
	if err := restart.Wait(); err != nil {
		t.Fatalf("the restart: %v", err)
	}
	c.must("kill", id)
}
