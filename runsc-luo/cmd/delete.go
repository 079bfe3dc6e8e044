package cmd

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
)

// Delete removes a stopped sandbox.
type Delete struct {
	force bool
}

func (*Delete) Name() string     { return "delete" }
func (*Delete) Synopsis() string { return "remove a stopped sandbox's state" }
func (*Delete) Usage() string {
	return "delete [--force] ID\n\nRemoves the sandbox's state, sockets and logs. A running sandbox needs --force, which kills it first.\n"
}
func (d *Delete) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&d.force, "force", false, "kill a running sandbox first")
}

func (d *Delete) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if f.NArg() != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	if err := container.Delete(cfg.Root, f.Arg(0), d.force); err != nil {
		return fatalf("%v", err)
	}
	if cfg.Debug {
		fmt.Fprintf(os.Stderr, "deleted %s\n", f.Arg(0))
	}
	return subcommands.ExitSuccess
}
