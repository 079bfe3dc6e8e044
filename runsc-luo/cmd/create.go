package cmd

import (
	"context"
	"flag"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// Create creates a container from an OCI bundle without starting it.
type Create struct {
	bundle        string
	pidFile       string
	consoleSocket string
	memory        string
}

func (*Create) Name() string     { return "create" }
func (*Create) Synopsis() string { return "create a container from an OCI bundle (start runs it)" }
func (*Create) Usage() string {
	return `create [--bundle DIR] [--pid-file FILE] [--memory SIZE] ID

Creates container ID from the bundle DIR (default: the current directory):
its supervisor and sentry start, and its process (config.json's process) is
prepared in its namespaces and root filesystem, then waits: the container is
"created" until "runsc-luo start ID". --pid-file receives the pid of the
process a container manager waits on: the sandbox's supervisor, which
outlives every live restart of the sentry and exits with the container's
exit status. The process's output goes to this command's stdout and stderr
(the supervisor keeps them), and to entrypoint.log under --root.

Terminals are not supported: config.json's process.terminal must be false,
and --console-socket is refused.
`
}
func (c *Create) SetFlags(f *flag.FlagSet) {
	f.StringVar(&c.bundle, "bundle", ".", "bundle directory (holding config.json)")
	f.StringVar(&c.pidFile, "pid-file", "", "file to write the container's pid to")
	f.StringVar(&c.consoleSocket, "console-socket", "", "not supported: livesentry guests have no terminal")
	f.StringVar(&c.memory, "memory", "", "size of the memory file (default: the bundle's, else 1G)")
}

func (c *Create) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	o, status := createOptions(f, c.bundle, c.pidFile, c.consoleSocket, c.memory)
	if status != subcommands.ExitSuccess {
		return status
	}
	o.Attach = true
	if _, err := container.Create(cfg.Globals, f.Arg(0), o); err != nil {
		return fatalf("creating %q: %v", f.Arg(0), err)
	}
	return subcommands.ExitSuccess
}

// createOptions checks create's and run's common arguments: one ID, a
// bundle, no console socket, a valid size.
func createOptions(f *flag.FlagSet, bundle, pidFile, consoleSocket, memory string) (container.CreateOptions, subcommands.ExitStatus) {
	var o container.CreateOptions
	if f.NArg() != 1 {
		return o, usage(f, "%s: want exactly one container ID, got %d arguments", f.Name(), f.NArg())
	}
	if err := sandbox.CheckID(f.Arg(0)); err != nil {
		return o, usagef("%v", err)
	}
	if consoleSocket != "" {
		return o, usagef("--console-socket: terminals are not supported by livesentry; run without one (process.terminal false)")
	}
	if memory != "" {
		n, err := sandbox.ParseSize(memory)
		if err != nil {
			return o, usagef("--memory: %v", err)
		}
		o.MemorySize = n
	}
	o.Bundle, o.PIDFile = bundle, pidFile
	return o, subcommands.ExitSuccess
}
