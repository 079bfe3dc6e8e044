package boot

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/urpc"
)

// The control methods a sentry serves (urpc), by name.
const (
	// MethodState returns the sandbox's state (sandbox.State).
	MethodState = "controller.State"
	// MethodRestart restarts the sentry live (RestartArgs, handover.Timing).
	MethodRestart = "controller.Restart"
	// MethodLastRestart returns the outcome of the restart this sentry
	// came out of (sandbox.RestartRecord).
	MethodLastRestart = "controller.LastRestart"
	// MethodExec starts another guest (ExecArgs, PIDResult).
	MethodExec = "controller.Exec"
	// MethodWaitPID waits for a guest (PIDResult, WaitResult).
	MethodWaitPID = "controller.WaitPID"
	// MethodSignal signals every guest (SignalArgs).
	MethodSignal = "controller.Signal"
	// MethodKHODump returns a KHO root FDT (KHODumpArgs, KHODumpResult).
	MethodKHODump = "controller.KHODump"
	// MethodLUOStatus returns LUO's sessions and files (LUOStatusResult).
	MethodLUOStatus = "controller.LUOStatus"
)

// RestartArgs are the arguments of MethodRestart.
type RestartArgs struct {
	// Mode is handover.ModeTransfer or handover.ModeExec.
	Mode string `json:"mode"`
	// Binary is the sentry binary to restart into; empty: this one.
	Binary string `json:"binary"`
	// Timeout bounds the restart until the new sentry acknowledged;
	// 0 means DefaultRestartTimeout.
	Timeout time.Duration `json:"timeout"`
	// Force restarts even though incoming sessions have not been
	// retrieved: they are handed over again as they came if this sentry
	// carried them (luo.LUO.Carried), dropped with their memory if not.
	Force bool `json:"force,omitempty"`
	// TestOnlyCommitDelay makes the new sentry of a transfer-mode
	// restart sleep this long once booted, before it takes the decision
	// word (handover.AcceptBooted), as if it were descheduled there: a
	// window in the middle of a restart, and, past the restart's
	// timeout, a new sentry that decides too late. For tests.
	TestOnlyCommitDelay time.Duration `json:"testonly_commit_delay,omitempty"`
	// TestOnlyCrashAt makes a process of the restart stop at once, as
	// SIGKILL does, at a named point of either side (see ParseCrashAt),
	// for tests.
	TestOnlyCrashAt string `json:"testonly_crash_at,omitempty"`
}

// ErrRefused marks a restart refused before it started: nothing changed.
var ErrRefused = errors.New("restart refused")

// DefaultRestartTimeout is a restart's timeout when none is given.
const DefaultRestartTimeout = 10 * time.Second

// ExecArgs are the arguments of MethodExec: argv, extra environment, and
// stdin, stdout, stderr as files.
type ExecArgs struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env"`
	// NoShim starts the program without the libc shim.
	NoShim bool `json:"no_shim,omitempty"`
	urpc.FilePayload
}

// PIDResult is a host pid.
type PIDResult struct {
	PID int `json:"pid"`
}

// WaitResult is how a guest process ended.
type WaitResult struct {
	ExitStatus int    `json:"exit_status"`
	Signal     string `json:"signal,omitempty"`
}

// SignalArgs are the arguments of MethodSignal.
type SignalArgs struct {
	Signal int `json:"signal"`
}

// KHODumpArgs are the arguments of MethodKHODump.
type KHODumpArgs struct {
	// In asks for the root this sentry received instead of the one it
	// will hand over.
	In bool `json:"in"`
}

// KHODumpResult is a KHO root FDT blob.
type KHODumpResult struct {
	Blob []byte `json:"blob"`
}

// LUOStatusResult is LUO's status.
type LUOStatusResult struct {
	luo.Status
}

// Empty is an empty argument or result.
type Empty struct{}

// controller is the control interface of a sandbox: its methods are the
// Method* names.
type controller struct {
	s *Sentry
}

// State returns the sandbox's state.
func (c *controller) State(_ *Empty, out *sandbox.State) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	*out = *c.s.stateLocked()
	return nil
}

// Restart restarts the sentry live. In transfer mode it returns the timing
// once the new sentry took over, or an error after rolling back. In exec
// mode it returns only on failure (rolled back); on success the connection
// ends with the execve and LastRestart has the outcome.
func (c *controller) Restart(a *RestartArgs, out *handover.Timing) error {
	s := c.s
	if !s.beginRestart() {
		return fmt.Errorf("the sandbox is already restarting or stopping: %w", unix.EBUSY)
	}
	defer s.endRestart()
	if names := s.k.UnretrievedSessions(); len(names) > 0 && !a.Force {
		what := "restarting now would drop them and their memory (retrieve or finish them first, or use --force)"
		if s.k.LUO().Carried() {
			what = "restarting now would relaunch the guests before they have taken them over (retrieve or finish them first, or use --force, which hands them over again as they came)"
		}
		return fmt.Errorf("%w: incoming sessions %q have not been retrieved since the last restart; %s: %w", ErrRefused, names, what, unix.EBUSY)
	}
	binary := a.Binary
	if binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		binary = exe
	}
	timeout := a.Timeout
	if timeout <= 0 {
		timeout = DefaultRestartTimeout
	}
	var crash *CrashAt
	if a.TestOnlyCrashAt != "" {
		var err error
		if crash, err = ParseCrashAt(a.TestOnlyCrashAt); err != nil {
			return fmt.Errorf("%w: %w", ErrRefused, err)
		}
		crash.Old, crash.Guests, crash.Supervisor = os.Getpid(), s.guestPIDs(), s.supervisorPID()
	}
	// The messages this sentry sends and reads inside the blackout.
	handover.WarmCodecs(&supervisor.Notice{Frozen: make([]byte, pgalloc.PageSize), Stop: &supervisor.StopRequest{}})
	switch a.Mode {
	case "", handover.ModeTransfer:
		t, err := s.restartTransfer(binary, timeout, a.TestOnlyCommitDelay, crash)
		if err != nil && !s.isHandedOver() {
			log.Warningf("transfer-mode restart failed, still serving: %v", err)
			return fmt.Errorf("%w; the old sentry (pid %d) rolled back and is still serving", err, os.Getpid())
		}
		go s.exitAfterHandoff()
		if err != nil {
			log.Warningf("transfer-mode restart: %v", err)
			return err
		}
		*out = t
		return nil
	case handover.ModeExec:
		err := s.restartExec(binary, timeout, crash)
		log.Warningf("exec-mode restart failed, still serving: %v", err)
		return fmt.Errorf("%w; the old sentry (pid %d) rolled back and is still serving", err, os.Getpid())
	}
	return fmt.Errorf("restart mode %q: must be %q or %q", a.Mode, handover.ModeTransfer, handover.ModeExec)
}

// LastRestart returns the outcome of the restart this sentry came out of.
func (c *controller) LastRestart(_ *Empty, out *sandbox.RestartRecord) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	*out = c.s.last
	return nil
}

// Exec starts a host program as another guest, with the given stdio.
func (c *controller) Exec(a *ExecArgs, out *PIDResult) error {
	var stdio [3]*os.File
	copy(stdio[:], a.Files)
	// urpc closes the received files after the call; the child has its
	// own copies by then.
	p, err := c.s.launch(a.Argv, a.Env, stdio, false, !a.NoShim)
	if err != nil {
		return err
	}
	// Record it, so that kill can stop it even if this sentry dies.
	if err := c.s.writeState(""); err != nil {
		log.Warningf("%v", err)
	}
	out.PID = p.pid
	return nil
}

// WaitPID waits for a guest process the sentry launched to exit.
func (c *controller) WaitPID(a *PIDResult, out *WaitResult) error {
	res, err := c.s.waitGuest(a.PID)
	if err != nil {
		return err
	}
	*out = res
	return nil
}

// Signal sends a signal to every guest process; SIGTERM, SIGINT and
// SIGKILL also stop the sandbox.
func (c *controller) Signal(a *SignalArgs, _ *Empty) error {
	if a.Signal <= 0 || a.Signal > 64 {
		return fmt.Errorf("signal %d: %w", a.Signal, unix.EINVAL)
	}
	return c.s.signal(unix.Signal(a.Signal))
}

// KHODump returns the outgoing (or incoming) KHO root FDT.
func (c *controller) KHODump(a *KHODumpArgs, out *KHODumpResult) error {
	o, i := c.s.k.KHO().Dump()
	out.Blob = o
	if a.In {
		if i == nil {
			return fmt.Errorf("no incoming KHO root: the sandbox booted cold: %w", unix.ENOENT)
		}
		out.Blob = i
	}
	return nil
}

// LUOStatus returns LUO's sessions and files.
func (c *controller) LUOStatus(_ *Empty, out *LUOStatusResult) error {
	out.Status = c.s.k.LUO().Status()
	return nil
}
