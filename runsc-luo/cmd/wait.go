package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
)

// Wait waits for a container to stop.
type Wait struct{}

func (*Wait) Name() string     { return "wait" }
func (*Wait) Synopsis() string { return "wait for a container to stop and print its exit status" }
func (*Wait) Usage() string {
	return "wait ID\n\nWaits until container ID stops (live restarts do not stop it) and prints\n{\"id\": ID, \"exitStatus\": N} with the exit status of its process (128+signal\nif a signal ended it), as runsc does.\n"
}
func (*Wait) SetFlags(*flag.FlagSet) {}

func (*Wait) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		return usage(f, "wait: want exactly one container ID, got %d arguments", f.NArg())
	}
	status, err := container.WaitExit(configOf(args).Root, f.Arg(0))
	if err != nil {
		return fatalf("%v", err)
	}
	b, _ := json.Marshal(struct {
		ID         string `json:"id"`
		ExitStatus int    `json:"exitStatus"`
	}{f.Arg(0), status})
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}
