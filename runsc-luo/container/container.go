// Package container is the client side of runsc-luo's commands: it starts
// a sandbox's sentry, asks it to restart, signal, exec and report, and
// cleans up after a sentry that died, using package sandbox for the state
// file and control calls and package boot's method names and argument
// types. It holds no sentry logic.
package container

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/urpc"
)

// StartOptions are the choices of Start beyond the sandbox's identity.
type StartOptions struct {
	// NoShim launches the entrypoint (at every launch, across restarts)
	// without the libc shim.
	NoShim bool
	// Prepare, if set, runs once the sandbox's directory exists and
	// before its supervisor starts (it writes what the entrypoint reads).
	Prepare func(dir string) error
	// Attach gives the supervisor this process's stdout and stderr: it
	// copies the entrypoint's output (every launch of it) there, as a
	// container manager expects of "create".
	Attach bool
}

// Start creates sandbox id under g.Root, starts its supervisor (this
// binary's "supervise" command) as a daemon, which starts the sentry with
// a memory file of size bytes and entry as its entrypoint, and returns once
// the sentry serves. The entrypoint runs under the libc shim.
func Start(g sandbox.Globals, id string, size uint64, entry []string) error {
	return StartWith(g, id, size, entry, StartOptions{})
}

// StartWith is Start with options.
func StartWith(g sandbox.Globals, id string, size uint64, entry []string, opts StartOptions) error {
	_, err := startSupervised(g, id, size, entry, opts)
	return err
}

// startSupervised is StartWith; it returns the supervisor's pid, which it
// records in the sandbox's oci.json.
func startSupervised(g sandbox.Globals, id string, size uint64, entry []string, opts StartOptions) (int, error) {
	if err := sandbox.CheckID(id); err != nil {
		return 0, err
	}
	dir := sandbox.Dir(g.Root, id)
	if err := os.MkdirAll(g.Root, 0o711); err != nil {
		return 0, fmt.Errorf("creating root %s: %w", g.Root, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		if os.IsExist(err) {
			return 0, fmt.Errorf("sandbox %q already exists in %s: pick another ID, or delete it first", id, g.Root)
		}
		return 0, err
	}
	fail := func(err error) (int, error) {
		os.RemoveAll(dir)
		return 0, err
	}
	if opts.Prepare != nil {
		if err := opts.Prepare(dir); err != nil {
			return fail(err)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return fail(err)
	}
	logf, err := os.OpenFile(sandbox.SentryLogPath(g.Root, id), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fail(err)
	}
	defer logf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	defer pr.Close()
	// The supervisor starts the sentry, which reports its boot on the
	// ready pipe; the supervisor outlives every sentry of the sandbox.
	args := append(g.Args(), "supervise", "--id="+id, fmt.Sprintf("--memory=%d", size), "--ready-fd=3", fmt.Sprintf("--shim=%t", !opts.NoShim), fmt.Sprintf("--attach=%t", opts.Attach), "--")
	cmd := exec.Command(exe, append(args, entry...)...)
	cmd.ExtraFiles = []*os.File{pw}
	cmd.Stdout, cmd.Stderr = logf, logf
	if opts.Attach {
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return fail(fmt.Errorf("starting the sentry: %w", err))
	}
	pw.Close()
	msg, _ := io.ReadAll(pr)
	if string(msg) != "ok" {
		cmd.Wait()
		reason := strings.TrimPrefix(string(msg), "error: ")
		if reason == "" {
			reason = "it exited without saying why"
		}
		// The log holds the same error as the ready pipe; anything else
		// in it (a crash) is shown too.
		if log, _ := os.ReadFile(sandbox.SentryLogPath(g.Root, id)); len(log) > 0 && !strings.Contains(string(log), reason) {
			reason += "\n" + strings.TrimSpace(string(log))
		}
		return fail(fmt.Errorf("the sentry of %q failed to start: %s", id, reason))
	}
	pid := cmd.Process.Pid
	// The supervisor is a daemon now; do not wait for it (a container
	// manager that is a child subreaper adopts and reaps it).
	cmd.Process.Release()
	if err := updateOCI(g.Root, id, func(r *OCIRecord) { r.PID = pid }); err != nil {
		return pid, err
	}
	return pid, nil
}

// WaitStopped polls the state of sandbox id until it is stopped, for at
// most timeout (0: forever).
func WaitStopped(root, id string, timeout time.Duration) (*sandbox.State, error) {
	start := time.Now()
	for {
		st, err := readSettled(root, id)
		if err != nil {
			return nil, err
		}
		if st.Status == sandbox.StatusStopped && !sandbox.Alive(st.PID) {
			return st, nil
		}
		if timeout > 0 && time.Since(start) > timeout {
			return st, fmt.Errorf("sandbox %q did not stop within %v", id, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Outcome is how a restart that did not succeed left the sandbox.
type Outcome int

const (
	// RolledBack: the restart was refused or rolled back; the old sentry
	// still serves the sandbox and nothing was lost.
	RolledBack Outcome = iota + 1
	// Recovered: a sentry died during the restart and the sandbox was
	// recovered from its memory file; what a crash may lose is lost.
	Recovered
	// Lost: no sentry serves the sandbox any more.
	Lost
	// HandedOver: the new sentry serves the sandbox, although the old one
	// could not confirm it (its answer was lost).
	HandedOver
)

func (o Outcome) String() string {
	switch o {
	case RolledBack:
		return "the old sentry rolled back and is still serving"
	case Recovered:
		return "the sandbox was recovered after a sentry crash"
	case Lost:
		return "the sandbox is lost: no sentry serves it"
	case HandedOver:
		return "the new sentry serves the sandbox"
	}
	return fmt.Sprintf("outcome %d", int(o))
}

// RestartError is the error of a restart that did not succeed, with how it
// left the sandbox.
type RestartError struct {
	Outcome Outcome
	Err     error
}

func (e *RestartError) Error() string { return fmt.Sprintf("%v (%v)", e.Err, e.Outcome) }
func (e *RestartError) Unwrap() error { return e.Err }

// Restart restarts sandbox id live and returns the timing. An error that
// reached the sandbox is a *RestartError saying how the sandbox was left;
// it is judged from the sandbox's state afterwards, never assumed. The
// outcome is kept in the sandbox's restarts.json.
func Restart(root, id string, a boot.RestartArgs) (handover.Timing, error) {
	t, err := restart(root, id, a)
	recordRestart(root, id, a.Mode, t, err)
	return t, err
}

func restart(root, id string, a boot.RestartArgs) (handover.Timing, error) {
	var t handover.Timing
	if a.Binary != "" {
		if _, err := os.Stat(a.Binary); err != nil {
			return t, fmt.Errorf("--binary: %w", err)
		}
	}
	st, err := sandbox.ReadState(root, id)
	if err != nil {
		return t, err
	}
	if st.Status != sandbox.StatusRunning {
		return t, fmt.Errorf("sandbox %q is %s: only a running sandbox restarts", id, st.Status)
	}
	if isCreated(root, id) {
		return t, fmt.Errorf("container %q is created but not started: start it first (runsc-luo start %s)", id, id)
	}
	timeout := a.Timeout
	if timeout <= 0 {
		timeout = boot.DefaultRestartTimeout
	}
	err = sandbox.CallWithin(root, id, boot.MethodRestart, &a, &t, timeout+sandbox.ControlTimeout)
	var re urpc.RemoteError
	switch {
	case err == nil:
		return t, nil
	case errors.As(err, &re):
		err = errors.New(re.Message)
		// A refusal changed nothing: judging it from the state could take
		// another restart's handoff, running at the same time, for its
		// own. (urpc carries only the message.)
		if strings.Contains(re.Message, boot.ErrRefused.Error()) || strings.Contains(re.Message, refusedBusy) {
			return t, &RestartError{Outcome: RolledBack, Err: err}
		}
	case a.Mode == handover.ModeExec:
		// The connection ended with the execve; the new image reports
		// through LastRestart.
		if t, err = awaitExecRestart(root, id, st.LiveupdateNumber+1, st.Recoveries, timeout+5*time.Second); err == nil {
			return t, nil
		}
	}
	o, rec := outcome(root, id, st)
	if o == HandedOver {
		fmt.Fprintf(os.Stderr, "runsc-luo: warning: %v; but the new sentry served the sandbox\n", err)
		if rec != nil {
			t = rec.Timing
		}
		return t, nil
	}
	return t, &RestartError{Outcome: o, Err: err}
}

// refusedBusy is how the sentry refuses a restart while another one (or a
// stop) is in progress (boot's controller.Restart).
const refusedBusy = "already restarting or stopping"

// awaitExecRestart waits for the exec'd image to report restart number
// gen.
func awaitExecRestart(root, id string, gen, recoveries uint64, timeout time.Duration) (handover.Timing, error) {
	var t handover.Timing
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		var rec sandbox.RestartRecord
		if err := sandbox.Call(root, id, boot.MethodLastRestart, &boot.Empty{}, &rec); err == nil && rec.Generation >= gen {
			if rec.Error != "" {
				return rec.Timing, errors.New(rec.Error)
			}
			return rec.Timing, nil
		}
		if st, err := sandbox.ReadState(root, id); err == nil {
			// The relaunched entrypoint may already have finished and
			// stopped the sandbox: the state file keeps the outcome.
			if rec := st.LastRestart; rec != nil && rec.Generation >= gen {
				return rec.Timing, nil
			}
			if st.Status == sandbox.StatusStopped {
				return t, fmt.Errorf("the sandbox stopped during the exec-mode restart: %s", st.Error)
			}
			if st.Recoveries > recoveries {
				return t, errors.New("the sentry died during the exec-mode restart")
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return t, fmt.Errorf("no answer from the exec'd sentry within %v", timeout)
}

// outcome judges how a failed restart left the sandbox whose state before
// it was before, from its state now: the same sentry serving with the same
// liveupdate number is a rollback; a sentry serving after a recovery is a
// recovery; a newer restart record, or a sentry serving a newer liveupdate
// number, is the handoff (whose record is returned if the state has it);
// anything else is a loss. A state in flux (a sentry starting) is waited
// for, a few seconds at most.
//
// The record matters when the relaunched entrypoint finished at once: the
// new sentry then stops the sandbox, and the supervisor's end of it can
// take the old sentry with it before it answered the restart.
func outcome(root, id string, before *sandbox.State) (Outcome, *sandbox.RestartRecord) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := sandbox.ReadState(root, id)
		if rec := handedOverIn(st, err, before); rec != nil {
			return HandedOver, rec
		}
		if err == nil && st.Status == sandbox.StatusRunning && sandbox.Alive(st.PID) {
			var live sandbox.State
			if cerr := sandbox.CallWithin(root, id, boot.MethodState, &boot.Empty{}, &live, time.Second); cerr == nil {
				switch {
				case live.Recoveries > before.Recoveries:
					return Recovered, nil
				case live.PID == before.PID && live.LiveupdateNumber == before.LiveupdateNumber:
					return RolledBack, nil
				case live.LiveupdateNumber > before.LiveupdateNumber:
					return HandedOver, live.LastRestart
				}
			}
		}
		// (A supervised sentry that is gone is being recovered.)
		if err == nil && st.Status == sandbox.StatusStopped && !sandbox.Alive(st.PID) && !(st.Gone && st.Supervised) || time.Now().After(deadline) {
			return Lost, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// handedOverIn returns the record, in the state st (read with err), of a
// successful restart newer than the state before: the restart handed over,
// whatever happened to the sandbox since. Nil if there is none.
func handedOverIn(st *sandbox.State, err error, before *sandbox.State) *sandbox.RestartRecord {
	if err != nil || st.LastRestart == nil || st.LastRestart.Error != "" || st.LastRestart.Generation <= before.LiveupdateNumber || st.Recoveries > before.Recoveries {
		return nil
	}
	return st.LastRestart
}

// Exec runs argv as another guest of sandbox id with this process's stdio
// and returns its wait status. A guest stopped by a restart or kill of the
// sentry gives 137. With noShim, argv runs without the libc shim.
func Exec(root, id string, argv []string, noShim bool) (int, error) {
	if _, err := sandbox.ReadState(root, id); err != nil {
		return 0, err
	}
	var pid boot.PIDResult
	arg := boot.ExecArgs{Argv: argv, NoShim: noShim, FilePayload: urpc.FilePayload{Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}}}
	if err := sandbox.Call(root, id, boot.MethodExec, &arg, &pid); err != nil {
		return 0, fmt.Errorf("exec in %q: %w", id, err)
	}
	var res boot.WaitResult
	if err := sandbox.CallWithin(root, id, boot.MethodWaitPID, &pid, &res, 0); err != nil {
		var re urpc.RemoteError
		if errors.As(err, &re) {
			return 0, fmt.Errorf("waiting for guest %d: %w", pid.PID, err)
		}
		// The sentry that launched it is gone: a restart or a kill
		// stopped every guest.
		fmt.Fprintf(os.Stderr, "runsc-luo: guest %d was stopped by a restart or kill of the sentry\n", pid.PID)
		return 137, nil
	}
	return res.ExitStatus, nil
}

// checkSignal refuses a signal number outside 1-64.
func checkSignal(sig unix.Signal) error {
	if sig <= 0 || sig > 64 {
		return fmt.Errorf("signal %d out of range", int(sig))
	}
	return nil
}
