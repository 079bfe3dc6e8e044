package cmd

import (
	"context"
	"flag"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/demo"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// DemoGuest is the guest program of "demo" and of the end-to-end tests
// (internal); see demo.Guest.
type DemoGuest struct {
	size string
	g    demo.Guest
}

func (*DemoGuest) Name() string     { return "demo-guest" }
func (*DemoGuest) Synopsis() string { return "the demo's guest program (internal)" }
func (*DemoGuest) Usage() string {
	return "demo-guest [--size SIZE] [--files N] [--sessions N] --seed S [--cycle] [--small-folios]\n"
}
func (d *DemoGuest) SetFlags(f *flag.FlagSet) {
	f.StringVar(&d.size, "size", "64M", "total bytes in the preserved memfds")
	f.IntVar(&d.g.Files, "files", 3, "number of memfds")
	f.IntVar(&d.g.Sessions, "sessions", 2, "number of sessions the memfds are spread over")
	f.Uint64Var(&d.g.Seed, "seed", 1, "seed of the contents")
	f.BoolVar(&d.g.Cycle, "cycle", false, "after verifying, preserve new contents and wait for the next restart")
	f.BoolVar(&d.g.SmallFolios, "small-folios", false, "make the memfds' page cache 4 KiB folios only (touch every 2 MiB range with a 1-byte write first)")
}

func (d *DemoGuest) Execute(context.Context, *flag.FlagSet, ...any) subcommands.ExitStatus {
	size, err := sandbox.ParseSize(d.size)
	if err != nil {
		return fatalf("demo-guest: --size: %v", err)
	}
	d.g.Size = int64(size)
	if err := d.g.Run(); err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
