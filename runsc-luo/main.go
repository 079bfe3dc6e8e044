// Command runsc-luo is the livesentry runtime: it starts sandboxes (a
// sentry process with its memory file, KHO and LUO, and guest programs),
// restarts their sentry live with guest memory preserved, and inspects
// them. It follows runsc's conventions: global flags before a subcommand,
// state under --root, a control socket per sandbox.
//
// Usage:
//
//	runsc-luo [--root DIR] [--debug] [--log-format text|json] COMMAND [flags] ARGS
//
// Commands: run, exec, restart, state, list, kill, delete, kho dump,
// luo status, demo. "boot", "abi" and "demo-guest" are internal.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/subcommands"
	"gvisor.dev/gvisor/pkg/log"
)

// version is this build's version string; a build can set it with
// -ldflags "-X main.version=...".
var version = "livesentry-dev"

// Global flags.
var (
	rootDir   = flag.String("root", defaultRoot(), "directory holding sandbox state and sockets")
	debug     = flag.Bool("debug", false, "log debug messages")
	logFormat = flag.String("log-format", "text", "log format: text or json")
)

// defaultRoot is $XDG_RUNTIME_DIR/runsc-luo, else /var/run/runsc-luo.
func defaultRoot() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "runsc-luo")
	}
	return "/var/run/runsc-luo"
}

// globalArgs returns the global flags to pass to a child runsc-luo.
func globalArgs() []string {
	return []string{"--root=" + *rootDir, fmt.Sprintf("--debug=%t", *debug), "--log-format=" + *logFormat}
}

// setupLog directs gVisor's log (used by urpc) to stderr in the chosen
// format, at Debug with --debug and at Warning otherwise.
func setupLog() error {
	w := &log.Writer{Next: os.Stderr}
	switch *logFormat {
	case "text":
		log.SetTarget(log.GoogleEmitter{Writer: w})
	case "json":
		log.SetTarget(log.JSONEmitter{Writer: w})
	default:
		return fmt.Errorf("--log-format %q: must be text or json", *logFormat)
	}
	if *debug {
		log.SetLevel(log.Debug)
	} else {
		log.SetLevel(log.Warning)
	}
	return nil
}

func main() {
	subcommands.Register(subcommands.HelpCommand(), "")
	subcommands.Register(subcommands.FlagsCommand(), "")
	subcommands.Register(new(runCmd), "")
	subcommands.Register(new(execCmd), "")
	subcommands.Register(new(restartCmd), "")
	subcommands.Register(new(stateCmd), "")
	subcommands.Register(new(listCmd), "")
	subcommands.Register(new(killCmd), "")
	subcommands.Register(new(deleteCmd), "")
	subcommands.Register(new(khoCmd), "")
	subcommands.Register(new(luoCmd), "")
	subcommands.Register(new(demoCmd), "")
	subcommands.Register(new(versionCmd), "")
	subcommands.Register(new(bootCmd), "internal")
	subcommands.Register(new(abiCmd), "internal")
	subcommands.Register(new(demoGuestCmd), "internal")
	flag.Parse()
	if err := setupLog(); err != nil {
		fmt.Fprintln(os.Stderr, "runsc-luo:", err)
		os.Exit(int(subcommands.ExitUsageError))
	}
	os.Exit(int(subcommands.Execute(context.Background())))
}

// fatalf prints an error and returns the failure status.
func fatalf(format string, args ...any) subcommands.ExitStatus {
	fmt.Fprintf(os.Stderr, "runsc-luo: "+format+"\n", args...)
	return subcommands.ExitFailure
}

// versionCmd prints the version.
type versionCmd struct{}

func (*versionCmd) Name() string           { return "version" }
func (*versionCmd) Synopsis() string       { return "print the version string" }
func (*versionCmd) Usage() string          { return "version\n" }
func (*versionCmd) SetFlags(*flag.FlagSet) {}
func (*versionCmd) Execute(context.Context, *flag.FlagSet, ...any) subcommands.ExitStatus {
	fmt.Println(version)
	return subcommands.ExitSuccess
}
