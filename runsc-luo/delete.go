package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/google/subcommands"
	"golang.org/x/sys/unix"
)

// deleteCmd removes a stopped sandbox.
type deleteCmd struct {
	force bool
}

func (*deleteCmd) Name() string     { return "delete" }
func (*deleteCmd) Synopsis() string { return "remove a stopped sandbox's state" }
func (*deleteCmd) Usage() string {
	return "delete [--force] ID\n\nRemoves the sandbox's state, sockets and logs. A running sandbox needs --force, which kills it first.\n"
}
func (d *deleteCmd) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&d.force, "force", false, "kill a running sandbox first")
}

func (d *deleteCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id := f.Arg(0)
	st, err := readState(*rootDir, id)
	if err != nil {
		return fatalf("%v", err)
	}
	if st.gone {
		if live, gone := stillGone(st); !gone {
			st = live
		}
	}
	if st.gone {
		// The sentry died without stopping its guests: stop them first.
		cleanupGone(st)
	}
	if st.Status == statusRunning {
		if !d.force {
			return fatalf("sandbox %q is running; kill it first or use --force", id)
		}
		if err := killSandbox(id, unix.SIGKILL); err != nil {
			return fatalf("%v", err)
		}
	}
	if err := os.RemoveAll(sandboxDir(*rootDir, id)); err != nil {
		return fatalf("removing %q: %v", id, err)
	}
	if *debug {
		fmt.Fprintf(os.Stderr, "deleted %s\n", id)
	}
	return subcommands.ExitSuccess
}
