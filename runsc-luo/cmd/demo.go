package cmd

import (
	"context"
	"flag"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/demo"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// Demo runs the README's main job on defaults.
type Demo struct {
	size string
	mode string
	keep bool
}

func (*Demo) Name() string     { return "demo" }
func (*Demo) Synopsis() string { return "preserve memfds across a live restart, end to end" }
func (*Demo) Usage() string {
	return `demo [--size SIZE] [--mode transfer|exec]

Starts a sandbox in a temporary root. Its guest fills 3 memfds (SIZE in
total) with a verifiable pattern and preserves them in 2 LUO sessions; the
sentry restarts live; the relaunched guest retrieves the memfds, verifies
every byte and finishes the sessions. Prints what happened and the timing
(the phases are defined in "runsc-luo help restart"), and removes everything
it made.

Words: a sentry is the livesentry kernel process, replaced by a restart; LUO
(Live Update Orchestrator, /dev/liveupdate) is how the guest names what must
survive it: files preserved in named sessions, retrieved and finished after
it; the blackout is the time guests are paused; ingest (and adopt) is the new
sentry reading which pages are preserved and taking them over; ready is the
new sentry serving. docs/guests.md has the full list.
`
}
func (d *Demo) SetFlags(f *flag.FlagSet) {
	f.StringVar(&d.size, "size", "64M", "bytes to preserve")
	f.StringVar(&d.mode, "mode", handover.ModeTransfer, "restart mode: transfer or exec")
	f.BoolVar(&d.keep, "keep", false, "keep the temporary root (for debugging)")
}

func (d *Demo) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	size, err := sandbox.ParseSize(d.size)
	if err != nil {
		return fatalf("--size: %v", err)
	}
	if d.mode != handover.ModeTransfer && d.mode != handover.ModeExec {
		return fatalf("--mode %q: must be %s or %s", d.mode, handover.ModeTransfer, handover.ModeExec)
	}
	err = demo.Run(os.Stdout, demo.Options{Globals: configOf(args).Globals, Size: size, Mode: d.mode, Keep: d.keep, PrintTiming: PrintTiming})
	if err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
