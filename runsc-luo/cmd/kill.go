package cmd

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"golang.org/x/sys/unix"
)

// Kill signals a container's process or all its guests; a terminating
// signal stops it.
type Kill struct {
	all bool
}

func (*Kill) Name() string { return "kill" }
func (*Kill) Synopsis() string {
	return "send a signal to a container's process (--all: every guest; SIGTERM stops it)"
}
func (*Kill) Usage() string {
	return `kill [--all] ID [SIGNAL]

Sends SIGNAL (default SIGTERM; a name like KILL or SIGUSR1, or a number 1-64)
to the container's process, or with --all to every guest process of the
sandbox. SIGTERM, SIGINT and SIGKILL stop the sandbox whether or not --all is
given: every guest gets the signal, guests still running 5s after SIGTERM or
SIGINT are killed, then the sentry exits, its sockets are removed, and the
state says "stopped" until delete. kill returns once the sandbox stopped.
`
}
func (k *Kill) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&k.all, "all", false, "send the signal to every guest process, not only the container's")
	f.BoolVar(&k.all, "a", false, "same as --all")
}

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

func (k *Kill) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() < 1 || f.NArg() > 2 {
		return usage(f, "kill: want an ID and at most one signal, got %d arguments", f.NArg())
	}
	sig := unix.SIGTERM
	if f.NArg() == 2 {
		var err error
		if sig, err = parseSignal(f.Arg(1)); err != nil {
			return usagef("%v", err)
		}
	}
	root := configOf(args).Root
	stops := supervisor.StopsSandbox(sig)
	var err error
	if k.all || stops {
		err = container.Kill(root, f.Arg(0), sig)
	} else {
		err = container.SignalProcess(root, f.Arg(0), sig)
	}
	if err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
