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
	shim    bool
	attach  bool
}

func (*Supervise) Name() string     { return "supervise" }
func (*Supervise) Synopsis() string { return "supervise a sandbox's sentries (internal)" }
func (*Supervise) Usage() string {
	return "supervise --id ID --memory BYTES --ready-fd FD [--attach] [-- ENTRYPOINT ARGS]\n\nExits with the sandbox's exit status once it stopped.\n"
}
func (s *Supervise) SetFlags(f *flag.FlagSet) {
	f.StringVar(&s.id, "id", "", "sandbox ID")
	f.Uint64Var(&s.memory, "memory", 0, "memory file size in bytes")
	f.IntVar(&s.readyFD, "ready-fd", -1, "fd the first sentry reports its boot on")
	f.BoolVar(&s.shim, "shim", true, "start the entrypoint under the libc shim")
	f.BoolVar(&s.attach, "attach", false, "copy the entrypoint's output to this process's stdout; log to sentry.log")
}

func (s *Supervise) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if s.readyFD < 0 {
		return usagef("supervise: --ready-fd is required")
	}
	unix.CloseOnExec(s.readyFD)
	// A daemon: what its caller leaked into it (a pipe the caller reads
	// to its end, say) must not stay open for the sandbox's life, nor
	// reach the sentries.
	sandbox.CloseInherited()
	exe, err := os.Executable()
	if err != nil {
		return fatalf("%v", err)
	}
	var stopFollow func()
	if s.attach {
		if stopFollow, err = attach(cfg.Root, s.id); err != nil {
			return fatalf("%v", err)
		}
	}
	err = supervisor.Run(supervisor.Options{
		Globals: cfg.Globals,
		Config:  sandbox.Config{ID: s.id, Root: cfg.Root, MemorySize: s.memory, Entrypoint: f.Args(), NoShim: !s.shim, Created: time.Now().UTC()},
		Exe:     exe,
		Ready:   os.NewFile(uintptr(s.readyFD), "ready"),
	})
	if stopFollow != nil {
		stopFollow()
	}
	if err != nil {
		return fatalf("%v", err)
	}
	// A container manager waits on this process: its exit status is the
	// container's.
	st, err := sandbox.ReadState(cfg.Root, s.id)
	if err != nil || st.ExitStatus == nil {
		return subcommands.ExitFailure
	}
	return subcommands.ExitStatus(*st.ExitStatus)
}

// attach keeps this process's stdout for the entrypoint's output (every
// launch of it, copied from entrypoint.log) and sends its own stdout and
// stderr, which the sentries inherit, to sentry.log. The returned func
// copies what is left and stops.
func attach(root, id string) (func(), error) {
	out, err := unix.Dup(1)
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(out)
	logf, err := os.OpenFile(sandbox.SentryLogPath(root, id), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	for _, fd := range []int{1, 2} {
		if err := unix.Dup2(int(logf.Fd()), fd); err != nil {
			return nil, err
		}
	}
	w := os.NewFile(uintptr(out), "stdout")
	done := make(chan struct{})
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		follow(sandbox.EntrypointLogPath(root, id), w, done)
	}()
	return func() {
		close(done)
		<-copied
		w.Close()
	}, nil
}
