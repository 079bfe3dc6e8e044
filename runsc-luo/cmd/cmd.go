// Package cmd holds runsc-luo's subcommands, one file each: their flags,
// usage and output. The work is done by packages container (the client
// side), boot (the sentry process) and demo.
package cmd

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

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

// errorLog is where errors go besides stderr: the --log file, in the
// --log-format, as runc writes them (a container manager such as
// containerd reports the last "error" line of it).
var errorLog struct {
	path, format string
}

// LogErrorsTo makes every error a command prints also go to path (if not
// empty) in format ("text" or "json").
func LogErrorsTo(path, format string) {
	errorLog.path, errorLog.format = path, format
}

// printError prints an error once on stderr and appends it to the --log
// file.
func printError(msg string) {
	fmt.Fprintf(os.Stderr, "runsc-luo: %s\n", msg)
	if errorLog.path == "" {
		return
	}
	f, err := os.OpenFile(errorLog.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	now := time.Now().UTC()
	if errorLog.format == "json" {
		b, _ := json.Marshal(struct {
			Level string    `json:"level"`
			Msg   string    `json:"msg"`
			Time  time.Time `json:"time"`
		}{"error", msg, now})
		f.Write(append(b, '\n'))
		return
	}
	fmt.Fprintf(f, "E%s runsc-luo: %s\n", now.Format("0102 15:04:05.000000"), msg)
}

// fatalf prints an error and returns the failure status (1).
func fatalf(format string, args ...any) subcommands.ExitStatus {
	printError(fmt.Sprintf(format, args...))
	return subcommands.ExitFailure
}

// usagef prints a usage error and returns the usage status (2).
func usagef(format string, args ...any) subcommands.ExitStatus {
	printError(fmt.Sprintf(format, args...))
	return subcommands.ExitUsageError
}

// usage prints the command's usage after an error about its arguments and
// returns the usage status (2).
func usage(f *flag.FlagSet, format string, args ...any) subcommands.ExitStatus {
	printError(fmt.Sprintf(format, args...))
	f.Usage()
	return subcommands.ExitUsageError
}
