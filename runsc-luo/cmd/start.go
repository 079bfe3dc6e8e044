package cmd

import (
	"context"
	"flag"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
)

// Start starts a created container.
type Start struct{}

func (*Start) Name() string     { return "start" }
func (*Start) Synopsis() string { return "start a created container's process" }
func (*Start) Usage() string {
	return "start ID\n\nLets the process of container ID, made by \"create\", run: the container goes\nfrom created to running. It works once.\n"
}
func (*Start) SetFlags(*flag.FlagSet) {}

func (*Start) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		return usage(f, "start: want exactly one container ID, got %d arguments", f.NArg())
	}
	if err := container.StartContainer(configOf(args).Root, f.Arg(0)); err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
