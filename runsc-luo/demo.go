package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
)

// demoCmd runs the README's main job on defaults.
type demoCmd struct {
	size string
	mode string
	keep bool
}

func (*demoCmd) Name() string     { return "demo" }
func (*demoCmd) Synopsis() string { return "preserve memfds across a live restart, end to end" }
func (*demoCmd) Usage() string {
	return `demo [--size SIZE] [--mode transfer|exec]

Starts a sandbox in a temporary root. Its guest fills 3 memfds (SIZE in
total) with a verifiable pattern and preserves them in 2 LUO sessions; the
sentry restarts live; the relaunched guest retrieves the memfds, verifies
every byte and finishes the sessions. Prints what happened and the timing,
and removes everything it made.
`
}
func (d *demoCmd) SetFlags(f *flag.FlagSet) {
	f.StringVar(&d.size, "size", "64M", "bytes to preserve")
	f.StringVar(&d.mode, "mode", handover.ModeTransfer, "restart mode: transfer or exec")
	f.BoolVar(&d.keep, "keep", false, "keep the temporary root (for debugging)")
}

// waitEvent waits for the guest's JSON line with the given event and
// generation in the entrypoint log.
func waitEvent(id, event string, gen uint64, timeout time.Duration) (*guestEvent, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if f, err := os.Open(entrypointLogPath(*rootDir, id)); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var e guestEvent
				if json.Unmarshal(sc.Bytes(), &e) != nil {
					continue
				}
				if e.Event == "failed" && e.Generation == gen {
					f.Close()
					return nil, fmt.Errorf("guest generation %d failed: %s", gen, e.Error)
				}
				if e.Event == event && e.Generation == gen {
					f.Close()
					return &e, nil
				}
			}
			f.Close()
		}
		if st, err := readState(*rootDir, id); err == nil && st.Status == statusStopped && event != "verified" {
			return nil, fmt.Errorf("sandbox stopped while waiting for %q: %s", event, st.Error)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil, fmt.Errorf("no %q event of generation %d within %v", event, gen, timeout)
}

func (d *demoCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	size, err := parseSize(d.size)
	if err != nil {
		return fatalf("--size: %v", err)
	}
	root, err := os.MkdirTemp("", "runsc-luo-demo-")
	if err != nil {
		return fatalf("%v", err)
	}
	*rootDir = root
	const id = "demo"
	cleanup := func() {
		if st, err := readState(root, id); err == nil && st.Status == statusRunning {
			killSandbox(id, 9)
		}
		if !d.keep {
			os.RemoveAll(root)
		}
	}
	defer cleanup()
	exe, err := os.Executable()
	if err != nil {
		return fatalf("%v", err)
	}
	seed := rand.Uint64()
	memory := max(4*size, 256<<20)
	entry := []string{exe, "demo-guest", "--size=" + strconv.FormatUint(size, 10), "--seed=" + strconv.FormatUint(seed, 10)}
	fmt.Printf("1. sandbox %q in %s: sentry with a %d MiB memory file; guest: %s\n", id, root, memory>>20, "runsc-luo demo-guest")
	if err := startSandbox(id, memory, entry); err != nil {
		return fatalf("%v", err)
	}
	pre, err := waitEvent(id, "preserved", 0, 5*time.Minute)
	if err != nil {
		return fatalf("%v", err)
	}
	fmt.Printf("2. the guest wrote %d MiB into %d memfds (%.1f ms) and preserved them in %d LUO sessions\n", pre.Bytes>>20, pre.Files, pre.WriteMS, pre.Sessions)
	t, err := restart(id, RestartArgs{Mode: d.mode, Timeout: 30 * time.Second})
	if err != nil {
		return fatalf("restart: %v", err)
	}
	fmt.Printf("3. live restart (%s mode): sentry pid %d -> %d, blackout %s ms\n", t.Mode, t.OldPID, t.NewPID, ms(t.Blackout))
	printTiming(os.Stdout, &t, "table")
	v, err := waitEvent(id, "verified", 1, 5*time.Minute)
	if err != nil {
		return fatalf("%v", err)
	}
	fmt.Printf("4. the relaunched guest retrieved both sessions, read the last byte %.1f ms after the blackout began, verified all %d bytes (%.1f ms) and finished the sessions\n",
		float64(v.DataReadyAt-t.PausedAt)/1e6, v.Bytes, v.VerifyMS)
	st, err := waitStopped(id, time.Minute)
	if err != nil {
		return fatalf("%v", err)
	}
	if st.ExitStatus == nil || *st.ExitStatus != 0 {
		return fatalf("the guest did not exit cleanly: %+v", st)
	}
	fmt.Printf("5. the guest exited 0, the sandbox stopped; removing %s\n", root)
	return subcommands.ExitSuccess
}
