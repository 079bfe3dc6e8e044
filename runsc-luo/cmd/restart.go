package cmd

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/container"
)

// Restart restarts a sandbox's sentry live.
type Restart struct {
	mode    string
	binary  string
	timeout time.Duration
	format  string
	// commitDelay is --TESTONLY-commit-delay (see boot.RestartArgs).
	commitDelay time.Duration
	crashAt     string // --TESTONLY-crash-at (boot.ParseCrashAt)
	force       bool
}

func (*Restart) Name() string { return "restart" }
func (*Restart) Synopsis() string {
	return "restart a sandbox's sentry live, guest memory preserved"
}
func (*Restart) Usage() string {
	return `restart [--mode transfer|exec] [--binary PATH] [--timeout DURATION] [--format table|json] ID

transfer (default): a new sentry process (PATH, default this binary) starts
next to the old one, takes the memory file over and acknowledges; if it
fails, the old sentry rolls back and keeps serving. exec: the sentry execve's
PATH with the memory file inherited; rollback is possible only until execve.

Prints the timing breakdown, one phase a line:
  freeze     LUO serialize in the old sentry: preserved files frozen, records written
  finalize   KHO finalize in the old sentry: the preserved-memory map written
  send       the memory file and descriptor crossing to the new sentry (or execve)
  map        the new sentry mapping the memory file
  ingest     the new sentry reading the KHO map and adopting the preserved memory
  luo        the new sentry reading LUO's sessions and files
  ready      the rest until the new sentry serves guests (the decision)
  blackout   all of the above: guests paused until the new sentry serves them

A restart refuses (nothing changes) while incoming sessions of the last
restart have not been retrieved by the guests. --force restarts anyway:
the sessions are handed over again as they came (a sentry that booted from
an older sentry's kho-v1 handover drops them instead). Of two restarts at once, one proceeds and the other is
refused.

Exit status:
  0  the new sentry serves the sandbox
  1  the restart did not reach the sandbox (no such sandbox, not running, ...)
  2  usage error
  3  refused or rolled back: the old sentry still serves, nothing was lost
  4  a sentry died during the restart and the sandbox was recovered from its
     memory file (see docs/crash.md for what a crash may lose)
  5  the sandbox is lost: no sentry serves it
`
}
func (r *Restart) SetFlags(f *flag.FlagSet) {
	f.StringVar(&r.mode, "mode", handover.ModeTransfer, "transfer or exec")
	f.StringVar(&r.binary, "binary", "", "sentry binary to restart into (default: the running one)")
	f.DurationVar(&r.timeout, "timeout", boot.DefaultRestartTimeout, "how long the new sentry may take")
	f.StringVar(&r.format, "format", "table", "output format: table or json")
	f.BoolVar(&r.force, "force", false, "restart even though incoming sessions have not been retrieved (they are handed over again as they came)")
	f.DurationVar(&r.commitDelay, "TESTONLY-commit-delay", 0, "for tests: the new sentry (transfer mode) sleeps this long once booted, before it takes the decision")
	f.StringVar(&r.crashAt, "TESTONLY-crash-at", "", "for tests: WHO@POINT[+DELAY], a process of the restart SIGKILLed at a handover point")
}

func (r *Restart) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if f.NArg() != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	if r.mode != handover.ModeTransfer && r.mode != handover.ModeExec {
		return usagef("--mode %q: must be %s or %s", r.mode, handover.ModeTransfer, handover.ModeExec)
	}
	if r.format != "table" && r.format != "json" {
		return usagef("--format %q: must be table or json", r.format)
	}
	if r.timeout <= 0 {
		return usagef("--timeout %v: must be positive", r.timeout)
	}
	t, err := container.Restart(cfg.Root, f.Arg(0), boot.RestartArgs{Mode: r.mode, Binary: r.binary, Timeout: r.timeout, Force: r.force, TestOnlyCommitDelay: r.commitDelay, TestOnlyCrashAt: r.crashAt})
	var re *container.RestartError
	if errors.As(err, &re) {
		fatalf("restart of %q failed: %v", f.Arg(0), err)
		return restartExitStatus[re.Outcome]
	}
	if err != nil {
		return fatalf("restart of %q failed: %v", f.Arg(0), err)
	}
	if r.format == "json" {
		b, _ := json.MarshalIndent(t, "", "  ")
		fmt.Println(string(b))
		return subcommands.ExitSuccess
	}
	PrintTiming(os.Stdout, &t)
	return subcommands.ExitSuccess
}

// restartExitStatus is restart's exit status for each outcome of a failed
// restart (see Usage).
var restartExitStatus = map[container.Outcome]subcommands.ExitStatus{
	container.RolledBack: 3,
	container.Recovered:  4,
	container.Lost:       5,
}

// PrintTiming prints a restart's timing breakdown as a table.
func PrintTiming(w io.Writer, t *handover.Timing) {
	fmt.Fprintf(w, "restart (%s mode): sentry pid %d (%s) -> pid %d (%s), liveupdate number %d\n", t.Mode, t.OldPID, t.OldVersion, t.NewPID, t.NewVersion, t.LiveupdateNumber)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "phase\tms\t")
	for _, p := range t.Phases() {
		fmt.Fprintf(tw, "%s\t%.3f\t\n", p.Name, float64(p.Duration)/1e6)
	}
	tw.Flush()
	if t.ReadAhead {
		fmt.Fprintln(w, "the new sentry mapped the memory file and read the KHO tree before the pause")
	}
}
