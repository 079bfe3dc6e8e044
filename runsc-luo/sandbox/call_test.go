package sandbox

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

// echo is a control server's one method for the test below.
type echo struct{}

// Echo answers with its argument.
func (echo) Echo(in *int, out *int) error {
	*out = *in
	return nil
}

// openFDs returns the number of fds open in this process.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// envEchoServer makes the test binary serve echo at the control socket
// of the sandbox it names (root/id), for TestACallLeavesNoFDOpenWhenItReturns.
const envEchoServer = "SANDBOX_TEST_ECHO_SERVER"

// TestHelperEchoServer is not a test: run with envEchoServer set, it
// serves echo until killed, in a process of its own.
func TestHelperEchoServer(t *testing.T) {
	dir := os.Getenv(envEchoServer)
	if dir == "" {
		t.Skip("a helper process, not a test")
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: ControlPath(filepath.Dir(dir), filepath.Base(dir)), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	srv := urpc.NewServer()
	srv.Register(echo{})
	os.WriteFile(filepath.Join(dir, "ready"), nil, 0o600)
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			t.Fatal(err)
		}
		f, err := c.File()
		c.Close()
		if err != nil {
			continue
		}
		s, err := unet.NewSocket(int(f.Fd()))
		if err != nil {
			f.Close()
			continue
		}
		srv.StartHandling(s)
	}
}

// A control call has closed its connection (the socket and unet's
// eventfd, which is not close-on-exec) by the time it returns: a caller
// that then closes every fd it did not mark close-on-exec, as a sentry
// booting in the same process does, closes none of them under the
// client's own Close still to come.
func TestACallLeavesNoFDOpenWhenItReturns(t *testing.T) {
	root := t.TempDir()
	const id = "s"
	dir := Dir(root, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	server := exec.Command(os.Args[0], "-test.run=^TestHelperEchoServer$")
	server.Env = append(os.Environ(), envEchoServer+"="+dir)
	if err := server.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { server.Process.Kill(); server.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the echo server did not start")
		}
	}
	for i := range 50 {
		before := openFDs(t)
		out := -1
		if err := Call(root, id, "echo.Echo", &i, &out); err != nil || out != i {
			t.Fatalf("Echo(%d) = %d, %v", i, out, err)
		}
		if after := openFDs(t); after != before {
			t.Fatalf("call %d: %d fds open when it returned, %d before", i, after, before)
		}
	}
}
