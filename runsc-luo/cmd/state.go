package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
)

// State prints a sandbox's state as JSON.
type State struct{}

func (*State) Name() string     { return "state" }
func (*State) Synopsis() string { return "print the state of a container as JSON (runtime spec)" }
func (*State) Usage() string {
	return `state ID

Prints the runtime spec's state: ociVersion, id, status (created, running or
stopped), pid (while not stopped: the supervisor's, the process a container
manager waits on), bundle, annotations, created; and under "livesentry" the
sandbox's own: the sentry's pid, the entrypoint's, the guests, the liveupdate
number, the supervisor, recoveries, the restart the sentry came out of
(last_restart) and the last restarts made with "restart" (restarts: mode,
outcome, phases in ms). A stopped sandbox reports no pid.
`
}
func (*State) SetFlags(*flag.FlagSet) {}

func (*State) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		return usage(f, "state: want exactly one container ID, got %d arguments", f.NArg())
	}
	st, err := container.ReadOCIState(configOf(args).Root, f.Arg(0))
	if err != nil {
		return fatalf("%v", err)
	}
	b, _ := json.MarshalIndent(st, "", "  ")
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
