package main

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
	"gvisor.dev/gvisor/pkg/urpc"
)

// restartCmd restarts a sandbox's sentry live.
type restartCmd struct {
	mode    string
	binary  string
	timeout time.Duration
	format  string
}

func (*restartCmd) Name() string { return "restart" }
func (*restartCmd) Synopsis() string {
	return "restart a sandbox's sentry live, guest memory preserved"
}
func (*restartCmd) Usage() string {
	return `restart [--mode transfer|exec] [--binary PATH] [--timeout DURATION] [--format table|json] ID

transfer (default): a new sentry process (PATH, default this binary) starts
next to the old one, takes the memory file over and acknowledges; if it
fails, the old sentry rolls back and keeps serving. exec: the sentry execve's
PATH with the memory file inherited; rollback is possible only until execve.
Prints the timing breakdown. Exits non-zero if the restart was refused.
`
}
func (r *restartCmd) SetFlags(f *flag.FlagSet) {
	f.StringVar(&r.mode, "mode", handover.ModeTransfer, "transfer or exec")
	f.StringVar(&r.binary, "binary", "", "sentry binary to restart into (default: the running one)")
	f.DurationVar(&r.timeout, "timeout", 10*time.Second, "how long the new sentry may take")
	f.StringVar(&r.format, "format", "table", "output format: table or json")
}

func (r *restartCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	if r.mode != handover.ModeTransfer && r.mode != handover.ModeExec {
		return fatalf("--mode %q: must be %s or %s", r.mode, handover.ModeTransfer, handover.ModeExec)
	}
	if r.format != "table" && r.format != "json" {
		return fatalf("--format %q: must be table or json", r.format)
	}
	t, err := restart(f.Arg(0), RestartArgs{Mode: r.mode, Binary: r.binary, Timeout: r.timeout})
	if err != nil {
		return fatalf("restart of %q failed: %v", f.Arg(0), err)
	}
	printTiming(os.Stdout, &t, r.format)
	return subcommands.ExitSuccess
}

// restart restarts sandbox id and returns the timing.
func restart(id string, a RestartArgs) (handover.Timing, error) {
	var t handover.Timing
	if a.Binary != "" {
		if _, err := os.Stat(a.Binary); err != nil {
			return t, fmt.Errorf("--binary: %w", err)
		}
	}
	st, err := readState(*rootDir, id)
	if err != nil {
		return t, err
	}
	if st.Status != statusRunning {
		return t, fmt.Errorf("sandbox %q is %s", id, st.Status)
	}
	timeout := a.Timeout
	if timeout <= 0 {
		timeout = defaultRestartTimeout
	}
	err = callWithin(*rootDir, id, "Restart", &a, &t, timeout+controlTimeout)
	var re urpc.RemoteError
	switch {
	case err == nil:
		return t, nil
	case errors.As(err, &re):
		return t, errors.New(re.Message)
	case a.Mode != handover.ModeExec:
		return t, err
	}
	// exec mode: the connection ended with the execve; the new image
	// reports through LastRestart.
	want := st.LiveupdateNumber + 1
	deadline := time.Now().Add(a.Timeout + 5*time.Second)
	for time.Now().Before(deadline) {
		var rec RestartRecord
		if err := call(*rootDir, id, "LastRestart", &Empty{}, &rec); err == nil && rec.Generation >= want {
			if rec.Error != "" {
				return rec.Timing, errors.New(rec.Error)
			}
			return rec.Timing, nil
		}
		if st, err := readState(*rootDir, id); err == nil {
			// The relaunched entrypoint may already have finished and
			// stopped the sandbox: the state file keeps the outcome.
			if rec := st.LastRestart; rec != nil && rec.Generation >= want {
				return rec.Timing, nil
			}
			if st.Status == statusStopped {
				return t, fmt.Errorf("the sandbox stopped during the exec-mode restart: %s", st.Error)
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return t, fmt.Errorf("no answer from the exec'd sentry within %v", a.Timeout+5*time.Second)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3f", float64(d)/1e6) }

// printTiming prints a restart's timing breakdown.
func printTiming(w io.Writer, t *handover.Timing, format string) {
	if format == "json" {
		b, _ := json.MarshalIndent(t, "", "  ")
		fmt.Fprintln(w, string(b))
		return
	}
	fmt.Fprintf(w, "restart (%s mode): sentry pid %d (%s) -> pid %d (%s), liveupdate number %d\n", t.Mode, t.OldPID, t.OldVersion, t.NewPID, t.NewVersion, t.LiveupdateNumber)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "phase\tms\t")
	for _, p := range []struct {
		name string
		d    time.Duration
	}{{"freeze", t.Freeze}, {"finalize", t.Finalize}, {"send", t.Send}, {"map", t.Map}, {"ingest+adopt", t.Ingest}, {"LUO", t.LUO}, {"ready", t.Ready}, {"blackout", t.Blackout}} {
		fmt.Fprintf(tw, "%s\t%s\t\n", p.name, ms(p.d))
	}
	tw.Flush()
}
