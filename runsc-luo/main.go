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
// luo status, abi, demo, version. "boot", "supervise" and "demo-guest" are
// internal.
//
// The commands live in package cmd (flags and output), the sentry process
// in package boot, the client side in packages container and sandbox.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/cmd"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"gvisor.dev/gvisor/pkg/log"
)

// version is this build's version string; a build can set it with
// -ldflags "-X main.version=...".
var version = "livesentry-dev"

// setupLog directs gVisor's log (used by urpc and the sentry) to stderr in
// the chosen format, at Debug with --debug and at Warning otherwise.
func setupLog(g *sandbox.Globals) error {
	w := &log.Writer{Next: os.Stderr}
	switch g.LogFormat {
	case "text":
		log.SetTarget(log.GoogleEmitter{Writer: w})
	case "json":
		log.SetTarget(log.JSONEmitter{Writer: w})
	default:
		return fmt.Errorf("--log-format %q: must be text or json", g.LogFormat)
	}
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

	subcommands.Register(subcommands.HelpCommand(), "")
	subcommands.Register(subcommands.FlagsCommand(), "")
	for _, sc := range []subcommands.Command{
		new(cmd.Run), new(cmd.Exec), new(cmd.Restart), new(cmd.State), new(cmd.List),
		new(cmd.Kill), new(cmd.Delete), new(cmd.KHO), new(cmd.LUO), new(cmd.ABI), new(cmd.Demo), new(cmd.Version),
	} {
		subcommands.Register(sc, "")
	}
	for _, sc := range []subcommands.Command{new(cmd.Boot), new(cmd.Supervise), new(cmd.DemoGuest)} {
		subcommands.Register(sc, "internal")
	}
	flag.Parse()
	if err := setupLog(&c.Globals); err != nil {
		fmt.Fprintln(os.Stderr, "runsc-luo:", err)
		os.Exit(int(subcommands.ExitUsageError))
	}
	os.Exit(int(subcommands.Execute(context.Background(), c)))
}
