package cmd

import (
	"context"
	"flag"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/guestinit"
)

// Init is a container's init (internal): the entrypoint guest of a
// sandbox made by "create", which becomes config.json's process (package
// guestinit).
type Init struct {
	id     string
	bundle string
	stage2 bool
}

func (*Init) Name() string     { return "init" }
func (*Init) Synopsis() string { return "a container's init (internal)" }
func (*Init) Usage() string    { return "init --id ID --bundle DIR | init --stage2 --bundle DIR\n" }
func (i *Init) SetFlags(f *flag.FlagSet) {
	f.StringVar(&i.id, "id", "", "container ID")
	f.StringVar(&i.bundle, "bundle", "", "bundle directory")
	f.BoolVar(&i.stage2, "stage2", false, "run the second stage, inside the container's namespaces")
}

func (i *Init) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if i.bundle == "" {
		return usagef("init: --bundle is required")
	}
	if i.stage2 {
		err := guestinit.Stage2(i.bundle)
		printError(err.Error())
		os.Exit(127)
	}
	if i.id == "" {
		return usagef("init: --id is required")
	}
	os.Exit(guestinit.Stage1(guestinit.Stage1Options{Globals: configOf(args).Globals, ID: i.id, Bundle: i.bundle}))
	return subcommands.ExitSuccess
}
