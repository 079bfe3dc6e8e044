package cmd

import (
	"context"
	"encoding/json"
	"flag"

	"os"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// Events prints a container's events as JSON lines.
type Events struct {
	stats    bool
	interval time.Duration
}

func (*Events) Name() string { return "events" }
func (*Events) Synopsis() string {
	return "print a container's events (restarts, recoveries, exit) as JSON lines"
}
func (*Events) Usage() string {
	return `events [--stats] [--interval DURATION] ID

Prints one JSON object a line, {"type": T, "id": ID, "data": {...}}, until the
container stops:
  state     the status changed (created, running, stopped)
  restart   a live restart made with "restart": mode, outcome (restarted,
            rolled back, recovered, lost), phases in ms, the full timing
  recovery  the supervisor recovered the sandbox after its sentry died
  stats     every --interval: processes, memory file size, liveupdate number
  exit      the container stopped: its exit status
With --stats, prints one stats event and exits.
`
}
func (e *Events) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&e.stats, "stats", false, "print the container's stats once and exit")
	f.DurationVar(&e.interval, "interval", 5*time.Second, "interval between stats events")
}

// event is one line of "events".
type event struct {
	Type string `json:"type"`
	ID   string `json:"id"`
	Data any    `json:"data"`
}

// stats are the data of a stats event.
type stats struct {
	Status           string `json:"status"`
	Processes        int    `json:"processes"`
	SentryPID        int    `json:"sentry_pid,omitempty"`
	MemoryFileBytes  uint64 `json:"memory_file_bytes"`
	LiveupdateNumber uint64 `json:"liveupdate_number"`
	Sessions         int    `json:"luo_sessions"`
	PreservedFiles   int    `json:"luo_files"`
	Recoveries       uint64 `json:"recoveries"`
}

func (e *Events) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		return usage(f, "events: want exactly one container ID, got %d arguments", f.NArg())
	}
	if e.interval <= 0 {
		return usagef("--interval %v: must be positive", e.interval)
	}
	root, id := configOf(args).Root, f.Arg(0)
	enc := json.NewEncoder(os.Stdout)
	emit := func(typ string, data any) { enc.Encode(event{typ, id, data}) }
	st, err := container.ReadOCIState(root, id)
	if err != nil {
		return fatalf("%v", err)
	}
	if e.stats {
		emit("stats", statsOf(root, id, st))
		return subcommands.ExitSuccess
	}
	status := ""
	restarts := len(st.Livesentry.Restarts)
	var lastAt time.Time
	if restarts > 0 {
		lastAt = st.Livesentry.Restarts[restarts-1].At
	}
	recoveries := st.Livesentry.Recoveries
	nextStats := time.Now()
	for {
		// Restarts and recoveries happen only while the container
		// runs: one first seen in the same poll as a change of state
		// (the stop, when a poll was late) came before it.
		for _, r := range st.Livesentry.Restarts {
			if r.At.After(lastAt) {
				emit("restart", r)
				lastAt = r.At
			}
		}
		if st.Livesentry.Recoveries > recoveries {
			recoveries = st.Livesentry.Recoveries
			emit("recovery", map[string]any{"recoveries": recoveries, "last": st.Livesentry.LastRecovery})
		}
		if string(st.Status) != status {
			status = string(st.Status)
			emit("state", map[string]string{"status": status})
		}
		if status == container.StatusStopped {
			code := -1
			if st.Livesentry.ExitStatus != nil {
				code = *st.Livesentry.ExitStatus
			}
			emit("exit", map[string]any{"exitStatus": code, "error": st.Livesentry.Error})
			return subcommands.ExitSuccess
		}
		if !time.Now().Before(nextStats) {
			emit("stats", statsOf(root, id, st))
			nextStats = time.Now().Add(e.interval)
		}
		time.Sleep(50 * time.Millisecond)
		if st, err = container.ReadOCIState(root, id); err != nil {
			return fatalf("%v", err)
		}
	}
}

// statsOf gathers a stats event's data.
func statsOf(root, id string, st *container.OCIState) stats {
	s := stats{Status: string(st.Status), MemoryFileBytes: st.Livesentry.MemorySize,
		LiveupdateNumber: st.Livesentry.LiveupdateNumber, Recoveries: st.Livesentry.Recoveries, SentryPID: st.Livesentry.PID}
	if pids, err := container.Processes(root, id); err == nil {
		s.Processes = len(pids)
	}
	var res boot.LUOStatusResult
	if string(st.Status) != container.StatusStopped && sandbox.CallWithin(root, id, boot.MethodLUOStatus, &boot.Empty{}, &res, 2*time.Second) == nil {
		s.Sessions = len(res.Sessions)
		for _, ss := range res.Sessions {
			s.PreservedFiles += len(ss.Files)
		}
	}
	return s
}
