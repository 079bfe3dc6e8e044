package cmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
)

// Boot is the sentry process (internal): a cold boot for "run", or the
// incoming side of a live restart.
type Boot struct {
	id         string
	memory     uint64
	readyFD    int
	handoverFD int
	// metadataChunks is boot.Options.MetadataChunks.
	metadataChunks int
	spareFD        int
	shim           bool
}

func (*Boot) Name() string     { return "boot" }
func (*Boot) Synopsis() string { return "run a sentry (internal)" }
func (*Boot) Usage() string {
	return "boot --id ID [--memory BYTES] [--ready-fd FD] [--shim=false] [-- ENTRYPOINT ARGS] | boot --handover-fd FD [--metadata-chunks N] | boot --spare-fd FD\n"
}
func (b *Boot) SetFlags(f *flag.FlagSet) {
	f.StringVar(&b.id, "id", "", "sandbox ID (cold boot)")
	f.Uint64Var(&b.memory, "memory", 0, "memory file size in bytes (cold boot)")
	f.IntVar(&b.readyFD, "ready-fd", -1, "fd to report readiness on (cold boot)")
	f.IntVar(&b.handoverFD, "handover-fd", -1, "fd of the transfer-mode handover socket")
	f.IntVar(&b.metadataChunks, "metadata-chunks", 0, "page-metadata chunks to fault in before a transfer-mode restart's pause (the old sentry's count)")
	f.IntVar(&b.spareFD, "spare-fd", -1, "fd of a spare sentry's channel to its supervisor, which sends a recovery on it")
	f.BoolVar(&b.shim, "shim", true, "start the entrypoint under the libc shim (cold boot)")
}

func (b *Boot) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	opts := boot.Options{Globals: cfg.Globals, Version: cfg.Version}
	switch {
	case b.spareFD >= 0:
		s, err := boot.NewSpare(b.spareFD, opts)
		if errors.Is(err, boot.ErrNoRecovery) {
			return subcommands.ExitSuccess
		}
		return serveBooted(s, err)
	case b.handoverFD >= 0 || boot.HandoverInEnv():
		// (An exec-mode restart re-enters here with the descriptor in
		// the environment.)
		opts.MetadataChunks = b.metadataChunks
		return serveBooted(boot.NewFromHandover(b.handoverFD, opts))
	}
	return b.coldBoot(sandbox.Config{ID: b.id, Root: cfg.Root, MemorySize: b.memory, Entrypoint: f.Args(), NoShim: !b.shim}, opts)
}

// serveBooted relaunches the entrypoint of a sentry that booted from a
// restart or a recovery (s, or the error that stopped it) and serves until
// the sandbox stops.
func serveBooted(s *boot.Sentry, err error) subcommands.ExitStatus {
	if err != nil {
		return fatalf("%v", err)
	}
	if err := s.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "runsc-luo: relaunching the entrypoint: %v\n", err)
	}
	s.Wait()
	return subcommands.ExitSuccess
}

// coldBoot starts a new sandbox and reports on the ready fd whether it
// serves.
func (b *Boot) coldBoot(c sandbox.Config, opts boot.Options) subcommands.ExitStatus {
	var ready *os.File
	if b.readyFD >= 0 {
		// Guests must not inherit it: "run" waits for its last writer.
		unix.CloseOnExec(b.readyFD)
		ready = os.NewFile(uintptr(b.readyFD), "ready")
	}
	report := func(err error) {
		if ready == nil {
			return
		}
		if err != nil {
			fmt.Fprintf(ready, "error: %v", err)
		} else {
			fmt.Fprint(ready, "ok")
		}
		ready.Close()
	}
	s, err := boot.New(c, opts)
	if err != nil {
		report(err)
		return fatalf("%v", err)
	}
	if err := s.Run(); err != nil {
		s.Stop(127, err.Error())
		report(err)
		return fatalf("%v", err)
	}
	report(nil)
	s.Wait()
	return subcommands.ExitSuccess
}
