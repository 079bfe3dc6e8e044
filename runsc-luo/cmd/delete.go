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
func (*Delete) Synopsis() string { return "remove stopped (or created) containers' state" }
func (*Delete) Usage() string {
	return "delete [--force] ID...\n\nRemoves each sandbox's state, sockets and logs. A running sandbox needs\n--force, which kills it first; a created container is deleted without it.\n"
}
func (d *Delete) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&d.force, "force", false, "kill a running sandbox first")
}

func (d *Delete) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if f.NArg() < 1 {
		return usage(f, "delete: want at least one container ID")
	}
	status := subcommands.ExitSuccess
	for _, id := range f.Args() {
		if err := container.Delete(cfg.Root, id, d.force); err != nil {
			status = fatalf("%v", err)
			continue
		}
		if cfg.Debug {
			fmt.Fprintf(os.Stderr, "deleted %s\n", id)
		}
	}
	return status
}
