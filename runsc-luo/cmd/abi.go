package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/boot"
)

// ABI prints the ABI strings and versions of this build (an exec-mode
// restart checks the new binary with it before freezing).
type ABI struct{}

func (*ABI) Name() string { return "abi" }
func (*ABI) Synopsis() string {
	return "print, as JSON, the handover formats this build reads and writes"
}
func (*ABI) Usage() string {
	return "abi\n\nPrints, as JSON, the handover formats (KHO, LUO, memfd compatible strings)\nthis build reads and writes: a restart into another build uses, per\nsubsystem, the newest format both know.\n"
}
func (*ABI) SetFlags(*flag.FlagSet) {}
func (*ABI) Execute(_ context.Context, _ *flag.FlagSet, args ...any) subcommands.ExitStatus {
	b, _ := json.Marshal(boot.ThisABI(configOf(args).Version))
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
