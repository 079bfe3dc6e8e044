package sandbox

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

// ControlTimeout bounds a control call (connecting included) unless the
// caller gives another: a stuck sentry must not hang the CLI.
const ControlTimeout = 30 * time.Second

// Connect opens a control connection to a sandbox.
func Connect(root, id string) (*urpc.Client, error) {
	s, err := unet.Connect(ControlPath(root, id), false)
	if err != nil {
		return nil, fmt.Errorf("connecting to sandbox %q: %w", id, err)
	}
	return urpc.NewClient(s), nil
}

// Call makes one control call to a sandbox within ControlTimeout.
func Call(root, id, method string, arg, result any) error {
	return CallWithin(root, id, method, arg, result, ControlTimeout)
}

// CallWithin makes one control call to a sandbox; timeout > 0 bounds it.
// On a timeout the call is abandoned (its connection shut down) and the
// error wraps ETIMEDOUT.
func CallWithin(root, id, method string, arg, result any, timeout time.Duration) error {
	conn := make(chan *urpc.Client, 1)
	done := make(chan error, 1)
	go func() {
		c, err := Connect(root, id)
		if err != nil {
			done <- err
			return
		}
		conn <- c
		err = c.Call(method, arg, result)
		// Closed before the caller hears the answer: the client's
		// eventfd is not close-on-exec, and a caller that goes on to
		// close the fds it did not mark (a sentry booting in the same
		// process, as in tests) must not close it under a Close still
		// to come.
		c.Close()
		done <- err
	}()
	if timeout <= 0 {
		return <-done
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-timer.C:
		select {
		case c := <-conn:
			c.Socket.Shutdown()
		default:
		}
		return fmt.Errorf("sandbox %q: no answer to %s within %v: %w", id, method, timeout, unix.ETIMEDOUT)
	}
}
