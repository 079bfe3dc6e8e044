// Package cmd holds runsc-luo's subcommands, one file each: their flags,
// usage and output. The work is done by packages container (the client
// side), boot (the sentry process) and demo.
package cmd

import (
	"fmt"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// Config is what main hands every command: the global flags and this
// build's version.
type Config struct {
	sandbox.Globals
	// Version is this build's version string.
	Version string
}

// configOf returns the Config main passed to subcommands.Execute.
func configOf(args []any) *Config {
	return args[0].(*Config)
}

// fatalf prints an error and returns the failure status.
func fatalf(format string, args ...any) subcommands.ExitStatus {
	fmt.Fprintf(os.Stderr, "runsc-luo: "+format+"\n", args...)
	return subcommands.ExitFailure
}

// usagef prints a usage error and returns the usage status (2).
func usagef(format string, args ...any) subcommands.ExitStatus {
	fmt.Fprintf(os.Stderr, "runsc-luo: "+format+"\n", args...)
	return subcommands.ExitUsageError
}
