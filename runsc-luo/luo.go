package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
)

// luoCmd is "luo status".
type luoCmd struct{}

func (*luoCmd) Name() string     { return "luo" }
func (*luoCmd) Synopsis() string { return "show a sandbox's LUO sessions and files (luo status)" }
func (*luoCmd) Usage() string {
	return "luo status ID\n\nPrints, as JSON, the liveupdate number, the registered file handlers, and every\nsession (incoming or outgoing, retrieved) with its files' tokens, compatible\nstrings and states.\n"
}
func (*luoCmd) SetFlags(*flag.FlagSet) {}

func (*luoCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	if f.NArg() != 2 || f.Arg(0) != "status" {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id := f.Arg(1)
	if _, err := readState(*rootDir, id); err != nil {
		return fatalf("%v", err)
	}
	var res LUOStatusResult
	if err := call(*rootDir, id, "LUOStatus", &Empty{}, &res); err != nil {
		return fatalf("luo status of %q: %v", id, err)
	}
	b, _ := json.MarshalIndent(res.Status, "", "  ")
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
