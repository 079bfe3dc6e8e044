package container

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/urpc"
)

// signalTimeout bounds the Signal call: past it, Kill signals the sentry
// process itself and, if it does not stop either, SIGKILLs it.
const signalTimeout = 5 * time.Second

// killGuestsOf SIGKILLs the recorded guests of a sandbox whose sentry is
// gone, each only if its pid still names the same process; it returns how
// many it killed.
func killGuestsOf(st *sandbox.State) int {
	n := 0
	for _, g := range st.Guests {
		if g.PID > 1 && sandbox.Is(g.PID, g.Start) {
			if unix.Kill(g.PID, unix.SIGKILL) == nil {
				n++
			}
		}
	}
	return n
}

// stillGone re-checks a state whose sentry looked gone: a live restart may
// have handed the sandbox to a new sentry that has not written the state
// file yet. If a sentry answers on the control socket, its state is
// returned and gone is false.
func stillGone(st *sandbox.State) (_ *sandbox.State, gone bool) {
	var live sandbox.State
	if err := sandbox.CallWithin(st.Root, st.ID, boot.MethodState, &boot.Empty{}, &live, time.Second); err == nil && sandbox.Alive(live.PID) {
		return &live, false
	}
	return st, true
}

// cleanupGone finishes a sandbox whose sentry died without stopping it:
// its recorded guests are killed, its sockets removed, and its state file
// says stopped. It returns how many guests it killed.
func cleanupGone(st *sandbox.State) int {
	n := killGuestsOf(st)
	os.Remove(sandbox.GuestPath(st.Root, st.ID))
	os.Remove(sandbox.ControlPath(st.Root, st.ID))
	st.Status = sandbox.StatusStopped
	st.Guests = nil
	st.Gone = false
	if err := sandbox.WriteState(st); err != nil {
		fmt.Fprintf(os.Stderr, "runsc-luo: %v\n", err)
	}
	return n
}

// settleTimeout bounds how long a command waits for a live supervisor to
// act on its sentry's death (see readSettled). Its longest step is the wait for
// a restart's new sentry to register (10 s).
const settleTimeout = 15 * time.Second

// readSettled is sandbox.ReadState, except that while the state says the
// sentry is gone and the sandbox's supervisor runs, it reads again until
// the supervisor has acted on the death (for at most settleTimeout): the
// supervisor finishes a stop that was asked for, recovers the sandbox, or
// hands it to a restart's new sentry, and writes the state itself. A
// command that acted on the gone sentry meanwhile (killing the guests,
// writing "stopped" without an exit status) would race it.
func readSettled(root, id string) (*sandbox.State, error) {
	st, err := sandbox.ReadState(root, id)
	if err != nil || !st.Gone || !st.Supervised {
		return st, err
	}
	for deadline := time.Now().Add(settleTimeout); st.Gone && supervisorRuns(root, id) && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
		if st, err = sandbox.ReadState(root, id); err != nil {
			return nil, err
		}
	}
	return st, nil
}

// supervisorRuns reports whether the supervisor of sandbox id (the pid in
// its OCI record) still runs: alive, and still "supervise --id=ID", not a
// process that took its pid since.
func supervisorRuns(root, id string) bool {
	rec, err := readOCI(root, id)
	if err != nil || rec.PID <= 0 || !sandbox.Alive(rec.PID) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", rec.PID))
	return err == nil && bytes.Contains(b, []byte("\x00supervise\x00--id="+id+"\x00"))
}

// readLive reads a sandbox's state; a sentry that looks gone is re-checked
// and, if it is gone indeed and no supervisor acts on it, the sandbox is
// cleaned up (n guests killed).
func readLive(root, id string) (st *sandbox.State, cleaned bool, n int, err error) {
	if st, err = readSettled(root, id); err != nil {
		return nil, false, 0, err
	}
	if st.Gone {
		if live, gone := stillGone(st); !gone {
			return live, false, 0, nil
		}
		// The sentry died without stopping its guests: stop them.
		return st, true, cleanupGone(st), nil
	}
	return st, false, 0, nil
}

// Kill signals sandbox id's guests and, for a terminating signal, waits
// until its sentry has exited.
func Kill(root, id string, sig unix.Signal) error {
	if err := checkSignal(sig); err != nil {
		return err
	}
	st, cleaned, n, err := readLive(root, id)
	if err != nil {
		return err
	}
	if cleaned {
		fmt.Fprintf(os.Stderr, "runsc-luo: the sentry of %q was gone; killed %d guest processes it left\n", id, n)
		return nil
	}
	if st.Status != sandbox.StatusRunning {
		return fmt.Errorf("sandbox %q: container not running (%s); \"runsc-luo delete %s\" removes it", id, st.Status, id)
	}
	err = sandbox.CallWithin(root, id, boot.MethodSignal, &boot.SignalArgs{Signal: int(sig)}, &boot.Empty{}, signalTimeout)
	var re urpc.RemoteError
	if errors.As(err, &re) && strings.Contains(re.Message, "handed over") {
		// A restart handed the sandbox to a new sentry while the call
		// waited: signal that one.
		if st, err = sandbox.ReadState(root, id); err != nil {
			return err
		}
		err = sandbox.CallWithin(root, id, boot.MethodSignal, &boot.SignalArgs{Signal: int(sig)}, &boot.Empty{}, signalTimeout)
	}
	stops := supervisor.StopsSandbox(sig)
	if err != nil {
		// The sentry does not answer: signal it directly (a terminating
		// signal during a restart is applied after its outcome). If
		// the signal ends the process (SIGKILL, or SIGTERM to an
		// exec-mode restart's new image before it handles signals),
		// the supervisor must know that this is a stop, not a crash.
		if stops && st.Supervised {
			req := supervisor.StopRequest{ExitStatus: 128 + int(sig), Reason: "killed by " + unix.SignalName(sig)}
			if serr := supervisor.AskStop(root, id, req, time.Second); serr != nil {
				fmt.Fprintf(os.Stderr, "runsc-luo: %v\n", serr)
			}
		}
		if kerr := unix.Kill(st.PID, sig); kerr != nil {
			return fmt.Errorf("signalling sandbox %q: %v; and its sentry (pid %d): %v", id, err, st.PID, kerr)
		}
	}
	if !stops {
		return nil
	}
	if _, err := WaitStopped(root, id, 10*time.Second); err != nil {
		// Last resort: the sentry is stuck. Its guests are in their own
		// process groups and would outlive it.
		unix.Kill(st.PID, unix.SIGKILL)
		killGuestsOf(st)
		return err
	}
	return nil
}

// Delete removes sandbox id's state, sockets and logs; a running sandbox
// needs force, which kills it first.
func Delete(root, id string, force bool) error {
	st, _, _, err := readLive(root, id)
	if err != nil {
		return err
	}
	if st.Status == sandbox.StatusRunning {
		// A created container is deleted without --force, as runc does.
		if !force && !isCreated(root, id) {
			return fmt.Errorf("sandbox %q is running; kill it first or use --force", id)
		}
		if err := Kill(root, id, unix.SIGKILL); err != nil {
			return err
		}
	}
	return Remove(root, id)
}
