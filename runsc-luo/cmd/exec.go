package cmd

import (
	"context"
	"flag"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
)

// Exec runs a host program as another guest of a sandbox.
type Exec struct {
	shim bool
}

func (*Exec) Name() string     { return "exec" }
func (*Exec) Synopsis() string { return "run a host program as another guest of a sandbox" }
func (*Exec) Usage() string {
	return `exec [--shim=false] ID -- CMD ARGS

The sentry launches CMD with this terminal's stdin, stdout and stderr and
LIVESENTRY_GUEST_SOCKET set; exec waits for it and exits with its status. A
live restart stops it (exit status 137). CMD runs under the libc shim unless
--shim=false.
`
}
func (e *Exec) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&e.shim, "shim", true, "run CMD under the libc shim")
}

func (e *Exec) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	a := f.Args()
	if len(a) < 2 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id, argv := a[0], a[1:]
	if argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	status, err := container.Exec(cfg.Root, id, argv, !e.shim)
	if err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitStatus(status)
}
