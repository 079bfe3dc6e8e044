// Command runsc-luo is the livesentry runtime: it starts sandboxes (a
// sentry process with its memory file, KHO and LUO, and guest programs),
// restarts their sentry live with guest memory preserved, and inspects
// them. It follows runsc's conventions: global flags before a subcommand,
// state under --root, a control socket per sandbox.
//
// Usage:
//
//	runsc-luo [--root DIR] [--log FILE] [--log-format text|json] [--debug] [--debug-log FILE] COMMAND [flags] ARGS
//
// Commands: the OCI lifecycle (spec, create, start, run, state, kill,
// delete, ps, events, wait), exec, restart, list, kho dump, luo status,
// abi, demo, version. "boot", "supervise", "init" and "demo-guest" are
// internal.
//
// The commands live in package cmd (flags and output), the sentry process
// in package boot, the client side in packages container and sandbox.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/cmd"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"gvisor.dev/gvisor/pkg/log"
)

// version is this build's version string; a build can set it with
// -ldflags "-X main.version=...".
var version = "livesentry-dev"

// setupLog directs gVisor's log (used by urpc, the supervisor and the
// sentry) in the chosen format to the --log file (else stderr), at Debug
// with --debug and at Warning otherwise; with --debug and --debug-log,
// everything goes to the debug log as well.
func setupLog(g *sandbox.Globals) error {
	var emit func(w *log.Writer) log.Emitter
	switch g.LogFormat {
	case "text":
		emit = func(w *log.Writer) log.Emitter { return log.GoogleEmitter{Writer: w} }
	case "json":
		emit = func(w *log.Writer) log.Emitter { return log.JSONEmitter{Writer: w} }
	default:
		return fmt.Errorf("--log-format %q: must be text or json", g.LogFormat)
	}
	var out io.Writer = os.Stderr
	if g.Log != "" {
		f, err := os.OpenFile(g.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("--log: %w", err)
		}
		out = f
	}
	target := emit(&log.Writer{Next: out})
	if g.Debug && g.DebugLog != "" {
		f, err := os.OpenFile(g.DebugLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("--debug-log: %w", err)
		}
		target = &log.MultiEmitter{target, emit(&log.Writer{Next: f})}
	}
	log.SetTarget(target)
	if g.Debug {
		log.SetLevel(log.Debug)
	} else {
		log.SetLevel(log.Warning)
	}
	return nil
}

func main() {
	c := &cmd.Config{Version: version}
	flag.StringVar(&c.Root, "root", sandbox.DefaultRoot(), "directory holding sandbox state and sockets")
	flag.BoolVar(&c.Debug, "debug", false, "log debug messages")
	flag.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
	flag.StringVar(&c.Log, "log", "", "file the log and errors are appended to (default: stderr only)")
	flag.StringVar(&c.DebugLog, "debug-log", "", "file debug messages are appended to, with --debug")
	showVersion := flag.Bool("version", false, "print the version and exit")

	subcommands.Register(subcommands.HelpCommand(), "")
	subcommands.Register(subcommands.FlagsCommand(), "")
	for _, sc := range []subcommands.Command{
		new(cmd.Run), new(cmd.Exec), new(cmd.Restart), new(cmd.State), new(cmd.List),
		new(cmd.Kill), new(cmd.Delete), new(cmd.KHO), new(cmd.LUO), new(cmd.ABI), new(cmd.Demo), new(cmd.Version),
		new(cmd.Spec), new(cmd.Create), new(cmd.Start), new(cmd.PS), new(cmd.Events), new(cmd.Wait),
	} {
		subcommands.Register(sc, "")
	}
	for _, sc := range []subcommands.Command{new(cmd.Boot), new(cmd.Supervise), new(cmd.DemoGuest), new(cmd.Init)} {
		subcommands.Register(sc, "internal")
	}
	flag.Parse()
	if *showVersion {
		fmt.Printf("runsc-luo version %s\nspec: %s\n", version, specs.Version)
		os.Exit(0)
	}
	if err := setupLog(&c.Globals); err != nil {
		fmt.Fprintln(os.Stderr, "runsc-luo:", err)
		os.Exit(int(subcommands.ExitUsageError))
	}
	cmd.LogErrorsTo(c.Log, c.LogFormat)
	if flag.NArg() == 0 {
		subcommands.DefaultCommander.Explain(os.Stderr)
		os.Exit(int(subcommands.ExitUsageError))
	}
	// "COMMAND -h" is "help COMMAND": usage on stdout, status 0.
	for _, a := range flag.Args()[1:] {
		if a == "--" {
			break
		}
		if a == "-h" || a == "-help" || a == "--help" {
			flag.CommandLine.Parse([]string{"help", flag.Arg(0)})
			break
		}
	}
	os.Exit(int(subcommands.Execute(context.Background(), c)))
}
