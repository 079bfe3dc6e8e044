// Package cmd holds runsc-luo's subcommands, one file each: their flags,
// usage and output. The work is done by packages container (the client
// side), boot (the sentry process) and demo.
package cmd

import (
	"fmt"
	"os"
	"strconv"
	"strings"

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

// parseSize parses a size such as 4096, 64M, 64MiB, 1G or 4GiB.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "IB"), "B")
	mult := uint64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	v, err := strconv.ParseUint(t, 10, 64)
	if err != nil || v == 0 || v > (1<<50)/mult {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T suffix", s)
	}
	return v * mult, nil
}
