package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// State prints a sandbox's state as JSON.
type State struct{}

func (*State) Name() string           { return "state" }
func (*State) Synopsis() string       { return "print the state of a sandbox as JSON" }
func (*State) Usage() string          { return "state ID\n" }
func (*State) SetFlags(*flag.FlagSet) {}

func (*State) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	st, err := sandbox.ReadState(configOf(args).Root, f.Arg(0))
	if err != nil {
		return fatalf("%v", err)
	}
	b, _ := json.MarshalIndent(st, "", "  ")
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
