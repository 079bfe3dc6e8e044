package guest

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// gate gives this process a start gate, as a sentry that starts a program
// early does, and returns the sentry's end.
func gate(t *testing.T) *os.File {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(abiguest.EnvStartFD, strconv.Itoa(fds[1]))
	sentry := os.NewFile(uintptr(fds[0]), "sentry")
	t.Cleanup(func() { sentry.Close() })
	return sentry
}

// waitAsync runs waitAtStartGate and returns its result on a channel.
func waitAsync() chan error {
	c := make(chan error, 1)
	go func() { c <- waitAtStartGate() }()
	return c
}

func TestTheStartGateHoldsTheProgramUntilTheSentryOpensIt(t *testing.T) {
	sentry := gate(t)
	done := waitAsync()
	var b [1]byte
	if _, err := sentry.Read(b[:]); err != nil || b[0] != abiguest.StartGateWaiting {
		t.Fatalf("the program's first byte at the gate: %q, %v", b, err)
	}
	select {
	case err := <-done:
		t.Fatalf("the program went through a closed gate: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	sentry.Write([]byte{abiguest.StartGateOpen})
	if err := <-done; err != nil {
		t.Fatalf("through the open gate: %v", err)
	}
	if _, ok := os.LookupEnv(abiguest.EnvStartFD); ok {
		t.Errorf("%s is still set: the program's children would look for the gate", abiguest.EnvStartFD)
	}
	// The program's end is closed: the sentry reads its end.
	if n, err := sentry.Read(b[:]); n != 0 {
		t.Errorf("after the gate opened the sentry read %d bytes, %v; want the end", n, err)
	}
}

func TestAStartGateClosedWithoutOpeningEndsTheProgram(t *testing.T) {
	sentry := gate(t)
	done := waitAsync()
	var b [1]byte
	sentry.Read(b[:])
	sentry.Close()
	if err := <-done; !errors.Is(err, errGateClosed) {
		t.Fatalf("a gate closed without opening: %v, want %v", err, errGateClosed)
	}
}

func TestAStartGateThatIsNotAnFDIsAnError(t *testing.T) {
	for _, v := range []string{"", "x", "-1"} {
		t.Setenv(abiguest.EnvStartFD, v)
		if err := waitAtStartGate(); err == nil || !strings.Contains(err.Error(), "is not an fd") {
			t.Errorf("%s=%q: %v", abiguest.EnvStartFD, v, err)
		}
	}
	os.Unsetenv(abiguest.EnvStartFD)
	if err := waitAtStartGate(); err != nil {
		t.Errorf("without a gate: %v", err)
	}
}

func TestAStartGateSayingAnythingButOpenIsAnError(t *testing.T) {
	sentry := gate(t)
	done := waitAsync()
	var b [1]byte
	sentry.Read(b[:])
	sentry.Write([]byte{'x'})
	if err := <-done; err == nil || !strings.Contains(err.Error(), "want 0x67") {
		t.Fatalf("a gate that sent 'x': %v", err)
	}
}
