package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/google/subcommands"
	"gvisor.dev/gvisor/pkg/urpc"
)

// execCmd runs a host program as another guest of a sandbox.
type execCmd struct{}

func (*execCmd) Name() string     { return "exec" }
func (*execCmd) Synopsis() string { return "run a host program as another guest of a sandbox" }
func (*execCmd) Usage() string {
	return `exec ID -- CMD ARGS

The sentry launches CMD with this terminal's stdin, stdout and stderr and
LIVESENTRY_GUEST_SOCKET set; exec waits for it and exits with its status. A
live restart stops it (exit status 137).
`
}
func (*execCmd) SetFlags(*flag.FlagSet) {}

func (*execCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	args := f.Args()
	if len(args) < 2 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id, argv := args[0], args[1:]
	if argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	if _, err := readState(*rootDir, id); err != nil {
		return fatalf("%v", err)
	}
	var pid PIDResult
	arg := ExecArgs{Argv: argv, FilePayload: urpc.FilePayload{Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}}}
	if err := call(*rootDir, id, "Exec", &arg, &pid); err != nil {
		return fatalf("exec in %q: %v", id, err)
	}
	var res WaitResult
	if err := callWithin(*rootDir, id, "WaitPID", &pid, &res, 0); err != nil {
		var re urpc.RemoteError
		if errors.As(err, &re) {
			return fatalf("waiting for guest %d: %v", pid.PID, err)
		}
		// The sentry that launched it is gone: a restart or a kill
		// stopped every guest.
		fmt.Fprintf(os.Stderr, "runsc-luo: guest %d was stopped by a restart or kill of the sentry\n", pid.PID)
		return subcommands.ExitStatus(137)
	}
	return subcommands.ExitStatus(res.ExitStatus)
}
