package demo

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// Options configures the demo.
type Options struct {
	// Globals are the global flags; Root is replaced by a temporary one.
	Globals sandbox.Globals
	// Size is the number of bytes to preserve.
	Size uint64
	// Mode is the restart mode.
	Mode string
	// Keep keeps the temporary root.
	Keep bool
	// PrintTiming prints a restart's timing table.
	PrintTiming func(w io.Writer, t *handover.Timing)
}

// WaitEvent waits for the guest's JSON line with the given event and
// generation in sandbox id's entrypoint log; a "failed" event of that
// generation is an error.
func WaitEvent(root, id, event string, gen uint64, timeout time.Duration) (*Event, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if e, err := findEvent(sandbox.EntrypointLogPath(root, id), event, gen); e != nil || err != nil {
			return e, err
		}
		if st, err := sandbox.ReadState(root, id); err == nil && st.Status == sandbox.StatusStopped && event != "verified" {
			return nil, fmt.Errorf("sandbox stopped while waiting for %q: %s", event, st.Error)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil, fmt.Errorf("no %q event of generation %d within %v", event, gen, timeout)
}

func findEvent(path, event string, gen uint64) (*Event, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e Event
		if json.Unmarshal(sc.Bytes(), &e) != nil || e.Generation != gen {
			continue
		}
		if e.Event == "failed" {
			return nil, fmt.Errorf("guest generation %d failed: %s", gen, e.Error)
		}
		if e.Event == event {
			return &e, nil
		}
	}
	return nil, nil
}

// Run is the README's main job: a sandbox in a temporary root whose guest
// fills 3 memfds with a verifiable pattern and preserves them in 2 LUO
// sessions; the sentry restarts live; the relaunched guest retrieves the
// memfds, verifies every byte and finishes the sessions. It prints what
// happened to w and removes everything it made.
func Run(w io.Writer, o Options) error {
	root, err := os.MkdirTemp("", "runsc-luo-demo-")
	if err != nil {
		return err
	}
	g := o.Globals
	g.Root = root
	const id = "demo"
	defer func() {
		if st, err := sandbox.ReadState(root, id); err == nil && st.Status == sandbox.StatusRunning {
			container.Kill(root, id, 9)
		}
		if !o.Keep {
			os.RemoveAll(root)
		}
	}()
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	seed := rand.Uint64()
	memory := max(4*o.Size, 256<<20)
	entry := []string{exe, "demo-guest", "--size=" + strconv.FormatUint(o.Size, 10), "--seed=" + strconv.FormatUint(seed, 10)}
	fmt.Fprintf(w, "1. sandbox %q in %s: a sentry with a %d MiB memory file; its guest (the entrypoint): runsc-luo demo-guest\n", id, root, memory>>20)
	// The guest is a Go program speaking the guest protocol itself: it
	// needs no libc shim, and the demo then needs no C compiler.
	if err := container.StartWith(g, id, memory, entry, container.StartOptions{NoShim: true}); err != nil {
		return err
	}
	pre, err := WaitEvent(root, id, "preserved", 0, 5*time.Minute)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "2. the guest wrote %d MiB into %d memfds (%.1f ms) and preserved them in %d LUO sessions (/dev/liveupdate)\n", pre.Bytes>>20, pre.Files, pre.WriteMS, pre.Sessions)
	t, err := container.Restart(root, id, boot.RestartArgs{Mode: o.Mode, Timeout: 30 * time.Second})
	if err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	fmt.Fprintf(w, "3. live restart (%s mode): sentry pid %d -> %d; guests were paused for %.3f ms (the blackout)\n", t.Mode, t.OldPID, t.NewPID, float64(t.Blackout)/1e6)
	if o.PrintTiming != nil {
		o.PrintTiming(w, &t)
	}
	v, err := WaitEvent(root, id, "verified", 1, 5*time.Minute)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "4. the relaunched guest retrieved both sessions, read the last byte %.1f ms after the blackout began, verified all %d bytes (%.1f ms) and finished the sessions\n",
		float64(v.DataReadyAt-t.PausedAt)/1e6, v.Bytes, v.VerifyMS)
	st, err := container.WaitStopped(root, id, time.Minute)
	if err != nil {
		return err
	}
	if st.ExitStatus == nil || *st.ExitStatus != 0 {
		return fmt.Errorf("the guest did not exit cleanly: %+v", st)
	}
	fmt.Fprintf(w, "5. the guest exited 0, the sandbox stopped; removing %s\n", root)
	return nil
}
