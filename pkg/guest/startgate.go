package guest

import (
	"fmt"
	"os"
	"strconv"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// A transfer restart's new sentry may start the entrypoint's next life
// before the pause, so that its process start-up (for a Go program, the
// runtime and the package initialisation: milliseconds) is not paid after
// the restart. Such a process is given a start gate (EnvStartFD) and must
// not run the program's own code until the sentry opens it, once the
// previous life's guests are gone. This package's initialisation waits
// there, so that every program that imports it honours the gate (and says
// so in its Hello); only the packages it does not depend on initialise
// before. Without the variable nothing happens.
func init() {
	if err := waitAtStartGate(); err != nil {
		fmt.Fprintf(os.Stderr, "livesentry guest: %v: exiting\n", err)
		os.Exit(1)
	}
}

// errGateClosed is the start gate's end without the sentry opening it:
// the restart this process was started for did not happen.
var errGateClosed = fmt.Errorf("the sentry closed the start gate without opening it (the restart did not complete)")

// waitAtStartGate waits at the start gate named by EnvStartFD, if any,
// and closes it; the variable is removed, so that the program's own
// children do not look for it.
func waitAtStartGate() error {
	v, ok := os.LookupEnv(abiguest.EnvStartFD)
	if !ok {
		return nil
	}
	os.Unsetenv(abiguest.EnvStartFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 0 {
		return fmt.Errorf("%s=%q is not an fd", abiguest.EnvStartFD, v)
	}
	defer unix.Close(fd)
	if err := writeFull(fd, []byte{abiguest.StartGateWaiting}); err != nil {
		return fmt.Errorf("start gate: %w", err)
	}
	var b [1]byte
	for {
		n, err := unix.Read(fd, b[:])
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return fmt.Errorf("start gate: %w", err)
		case n == 0:
			return errGateClosed
		case b[0] != abiguest.StartGateOpen:
			return fmt.Errorf("start gate: the sentry sent %#x, want %#x", b[0], abiguest.StartGateOpen)
		}
		return nil
	}
}

// writeFull writes b to fd, retrying short writes and EINTR.
func writeFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}
