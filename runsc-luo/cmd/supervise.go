package cmd

import (
	"context"
	"flag"
	"os"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"golang.org/x/sys/unix"
)

// Supervise is a sandbox's supervisor (internal): it starts the first
// sentry and recovers the sandbox when a sentry dies (package supervisor).
type Supervise struct {
	id      string
	memory  uint64
	readyFD int
}

func (*Supervise) Name() string     { return "supervise" }
func (*Supervise) Synopsis() string { return "supervise a sandbox's sentries (internal)" }
func (*Supervise) Usage() string {
	return "supervise --id ID --memory BYTES --ready-fd FD [-- ENTRYPOINT ARGS]\n"
}
func (s *Supervise) SetFlags(f *flag.FlagSet) {
	f.StringVar(&s.id, "id", "", "sandbox ID")
	f.Uint64Var(&s.memory, "memory", 0, "memory file size in bytes")
	f.IntVar(&s.readyFD, "ready-fd", -1, "fd the first sentry reports its boot on")
}

func (s *Supervise) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if s.readyFD < 0 {
		return usagef("supervise: --ready-fd is required")
	}
	unix.CloseOnExec(s.readyFD)
	exe, err := os.Executable()
	if err != nil {
		return fatalf("%v", err)
	}
	err = supervisor.Run(supervisor.Options{
		Globals: cfg.Globals,
		Config:  sandbox.Config{ID: s.id, Root: cfg.Root, MemorySize: s.memory, Entrypoint: f.Args(), Created: time.Now().UTC()},
		Exe:     exe,
		Ready:   os.NewFile(uintptr(s.readyFD), "ready"),
	})
	if err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
