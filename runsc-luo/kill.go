package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/subcommands"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/urpc"
)

// killCmd signals a sandbox's guests; a terminating signal stops it.
type killCmd struct{}

func (*killCmd) Name() string     { return "kill" }
func (*killCmd) Synopsis() string { return "send a signal to a sandbox's guests (SIGTERM stops it)" }
func (*killCmd) Usage() string {
	return `kill ID [SIGNAL]

Sends SIGNAL (default SIGTERM; a name like KILL or SIGUSR1, or a number) to
every guest process of the sandbox. SIGTERM, SIGINT and SIGKILL also stop the
sandbox: guests and sentry exit, sockets are removed, the state file says
"stopped" until delete.
`
}
func (*killCmd) SetFlags(*flag.FlagSet) {}

// parseSignal parses a signal name or number.
func parseSignal(s string) (unix.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %d out of range", n)
		}
		return unix.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

func (*killCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	if f.NArg() < 1 || f.NArg() > 2 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id := f.Arg(0)
	sig := unix.SIGTERM
	if f.NArg() == 2 {
		var err error
		if sig, err = parseSignal(f.Arg(1)); err != nil {
			return fatalf("%v", err)
		}
	}
	if err := killSandbox(id, sig); err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}

// signalTimeout bounds the Signal call: past it, kill signals the sentry
// process itself and, if it does not stop either, SIGKILLs it.
const signalTimeout = 5 * time.Second

// killSandbox signals sandbox id and, for a terminating signal, waits until
// its sentry has exited.
func killSandbox(id string, sig unix.Signal) error {
	st, err := readState(*rootDir, id)
	if err != nil {
		return err
	}
	if st.gone {
		if live, gone := stillGone(st); !gone {
			st = live
		}
	}
	if st.gone {
		// The sentry died without stopping the sandbox (say, an
		// exec-mode restart into a binary that failed after execve): its
		// guests may still run.
		n := cleanupGone(st)
		fmt.Fprintf(os.Stderr, "runsc-luo: the sentry of %q was gone; killed %d guest processes it left\n", id, n)
		return nil
	}
	if st.Status != statusRunning {
		return fmt.Errorf("sandbox %q is not running (%s)", id, st.Status)
	}
	err = callWithin(*rootDir, id, "Signal", &SignalArgs{Signal: int(sig)}, &Empty{}, signalTimeout)
	var re urpc.RemoteError
	if errors.As(err, &re) && strings.Contains(re.Message, "handed over") {
		// A restart handed the sandbox to a new sentry while the call
		// waited: signal that one.
		if st, err = readState(*rootDir, id); err != nil {
			return err
		}
		err = callWithin(*rootDir, id, "Signal", &SignalArgs{Signal: int(sig)}, &Empty{}, signalTimeout)
	}
	if err != nil {
		// The sentry does not answer: signal it directly (a terminating
		// signal during a restart is applied after its outcome).
		if kerr := unix.Kill(st.PID, sig); kerr != nil {
			return fmt.Errorf("signalling sandbox %q: %v; and its sentry (pid %d): %v", id, err, st.PID, kerr)
		}
	}
	if sig != unix.SIGTERM && sig != unix.SIGINT && sig != unix.SIGKILL {
		return nil
	}
	if _, err := waitStopped(id, 10*time.Second); err != nil {
		// Last resort: the sentry is stuck. Its guests are in their own
		// process groups and would outlive it.
		unix.Kill(st.PID, unix.SIGKILL)
		killGuestsOf(st)
		return err
	}
	return nil
}
