package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// LUO is "luo status".
type LUO struct{}

func (*LUO) Name() string     { return "luo" }
func (*LUO) Synopsis() string { return "show a sandbox's LUO sessions and files (luo status)" }
func (*LUO) Usage() string {
	return "luo status ID\n\nPrints, as JSON, the liveupdate number, the registered file handlers, and every\nsession (incoming or outgoing, retrieved) with its files' tokens, compatible\nstrings and states.\n"
}
func (*LUO) SetFlags(*flag.FlagSet) {}

func (*LUO) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	root := configOf(args).Root
	if f.NArg() != 2 || f.Arg(0) != "status" {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id := f.Arg(1)
	if _, err := sandbox.ReadState(root, id); err != nil {
		return fatalf("%v", err)
	}
	var res boot.LUOStatusResult
	if err := sandbox.Call(root, id, boot.MethodLUOStatus, &boot.Empty{}, &res); err != nil {
		return fatalf("luo status of %q: %v", id, err)
	}
	b, _ := json.MarshalIndent(res.Status, "", "  ")
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
