package cmd

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"golang.org/x/sys/unix"
)

// Kill signals a sandbox's guests; a terminating signal stops it.
type Kill struct{}

func (*Kill) Name() string     { return "kill" }
func (*Kill) Synopsis() string { return "send a signal to a sandbox's guests (SIGTERM stops it)" }
func (*Kill) Usage() string {
	return `kill ID [SIGNAL]

Sends SIGNAL (default SIGTERM; a name like KILL or SIGUSR1, or a number) to
every guest process of the sandbox. SIGTERM, SIGINT and SIGKILL also stop the
sandbox: guests and sentry exit, sockets are removed, the state file says
"stopped" until delete.
`
}
func (*Kill) SetFlags(*flag.FlagSet) {}

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

func (*Kill) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() < 1 || f.NArg() > 2 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	sig := unix.SIGTERM
	if f.NArg() == 2 {
		var err error
		if sig, err = parseSignal(f.Arg(1)); err != nil {
			return fatalf("%v", err)
		}
	}
	if err := container.Kill(configOf(args).Root, f.Arg(0), sig); err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
