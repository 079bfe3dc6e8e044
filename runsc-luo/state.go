package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
)

// stateCmd prints a sandbox's state as JSON.
type stateCmd struct{}

func (*stateCmd) Name() string           { return "state" }
func (*stateCmd) Synopsis() string       { return "print the state of a sandbox as JSON" }
func (*stateCmd) Usage() string          { return "state ID\n" }
func (*stateCmd) SetFlags(*flag.FlagSet) {}

func (*stateCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	st, err := readState(*rootDir, f.Arg(0))
	if err != nil {
		return fatalf("%v", err)
	}
	b, _ := json.MarshalIndent(st, "", "  ")
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
