package cmd

import (
	"context"
	"flag"
	"fmt"

	"github.com/google/subcommands"
)

// Version prints the version.
type Version struct{}

func (*Version) Name() string     { return "version" }
func (*Version) Synopsis() string { return "print the version string" }
func (*Version) Usage() string {
	return "version\n\nPrints this build's version string (also: runsc-luo --version).\n"
}
func (*Version) SetFlags(*flag.FlagSet) {}
func (*Version) Execute(_ context.Context, _ *flag.FlagSet, args ...any) subcommands.ExitStatus {
	fmt.Println(configOf(args).Version)
	return subcommands.ExitSuccess
}
