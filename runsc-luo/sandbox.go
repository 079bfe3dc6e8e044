package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

// Sandbox statuses, as runsc names container statuses.
const (
	statusCreating = "creating"
	statusRunning  = "running"
	statusStopped  = "stopped"
)

// config is a sandbox's configuration; it crosses every restart inside the
// handover descriptor.
type config struct {
	ID         string    `json:"id"`
	Root       string    `json:"root"`
	MemorySize uint64    `json:"memory_size"`
	Entrypoint []string  `json:"entrypoint,omitempty"`
	Created    time.Time `json:"created"`
}

// dir is the sandbox's directory.
func (c *config) dir() string { return sandboxDir(c.Root, c.ID) }

func sandboxDir(root, id string) string { return filepath.Join(root, id) }
func statePath(root, id string) string  { return filepath.Join(sandboxDir(root, id), "state.json") }
func controlPath(root, id string) string {
	return filepath.Join(sandboxDir(root, id), "control.sock")
}
func guestPath(root, id string) string { return filepath.Join(sandboxDir(root, id), "guest.sock") }
func sentryLogPath(root, id string) string {
	return filepath.Join(sandboxDir(root, id), "sentry.log")
}
func entrypointLogPath(root, id string) string {
	return filepath.Join(sandboxDir(root, id), "entrypoint.log")
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// checkID validates a sandbox ID as runsc does (no path separators).
func checkID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("sandbox ID %q: must be 1-64 characters of [A-Za-z0-9_.-], not starting with a punctuation mark", id)
	}
	return nil
}

// state is the state file, and what "state" prints.
type state struct {
	ID               string    `json:"id"`
	Status           string    `json:"status"`
	PID              int       `json:"pid"`
	Version          string    `json:"version"`
	Created          time.Time `json:"created"`
	Root             string    `json:"root"`
	GuestSocket      string    `json:"guest_socket"`
	ControlSocket    string    `json:"control_socket"`
	MemorySize       uint64    `json:"memory_size"`
	Entrypoint       []string  `json:"entrypoint,omitempty"`
	EntrypointPID    int       `json:"entrypoint_pid,omitempty"`
	LiveupdateNumber uint64    `json:"liveupdate_number"`
	ExitStatus       *int      `json:"exit_status,omitempty"`
	// LastRestart is the outcome of the live restart the running sentry
	// came out of, if any.
	LastRestart *RestartRecord `json:"last_restart,omitempty"`
	Error       string         `json:"error,omitempty"`
	// Guests are the guest processes the sentry launched, so that kill
	// and delete can stop them if the sentry died without doing so.
	Guests []guestRecord `json:"guests,omitempty"`

	// gone is set by readState: the file says running, but the sentry
	// process is gone (it died without stopping its guests).
	gone bool
}

// guestRecord names a guest process: its pid and, so that a reused pid
// is never mistaken for it, its start time (/proc/PID/stat field 22).
type guestRecord struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// procStart returns the start time of pid (clock ticks since boot), 0 if
// there is no such process.
func procStart(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which ends at the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); field 22 is starttime.
	if len(fields) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(fields[19], 10, 64)
	return v
}

// killGuestsOf SIGKILLs the recorded guests of a sandbox whose sentry is
// gone, each only if its pid still names the same process; it returns how
// many it killed.
func killGuestsOf(st *state) int {
	n := 0
	for _, g := range st.Guests {
		if g.PID > 1 && g.Start != 0 && procStart(g.PID) == g.Start && alive(g.PID) {
			if unix.Kill(g.PID, unix.SIGKILL) == nil {
				n++
			}
		}
	}
	return n
}

// stillGone re-checks a state whose sentry looked gone: a live restart
// may have handed the sandbox to a new sentry that has not written the
// state file yet. If a sentry answers on the control socket, its state
// is returned and ok is false.
func stillGone(st *state) (*state, bool) {
	var live state
	if err := callWithin(st.Root, st.ID, "State", &Empty{}, &live, time.Second); err == nil && alive(live.PID) {
		return &live, false
	}
	return st, true
}

// cleanupGone finishes a sandbox whose sentry died without stopping it:
// its recorded guests are killed, its sockets removed, and its state file
// says stopped.
func cleanupGone(st *state) int {
	n := killGuestsOf(st)
	os.Remove(guestPath(st.Root, st.ID))
	os.Remove(controlPath(st.Root, st.ID))
	st.Status = statusStopped
	st.Guests = nil
	st.gone = false
	if err := writeState(st); err != nil {
		fmt.Fprintf(os.Stderr, "runsc-luo: %v\n", err)
	}
	return n
}

// writeState replaces the state file atomically.
func writeState(s *state) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	p := statePath(s.Root, s.ID)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	return nil
}

// readState reads a sandbox's state file and, if the status says running,
// checks that the sentry process is alive (a sentry that died unexpectedly
// shows as stopped).
func readState(root, id string) (*state, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(statePath(root, id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("sandbox %q does not exist in %s", id, root)
	}
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state file of %q: %w", id, err)
	}
	if s.Status == statusRunning && !alive(s.PID) {
		s.Status = statusStopped
		s.gone = true
		if s.Error == "" {
			s.Error = "the sentry process is gone"
		}
	}
	return &s, nil
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	for i := len(b) - 1; i > 0; i-- {
		if b[i] == ')' && i+2 < len(b) {
			return b[i+2] != 'Z' && b[i+2] != 'X'
		}
	}
	return unix.Kill(pid, 0) == nil
}

// Control RPC arguments and results. The sentry registers a *controller
// whose methods are "Sentry.<Name>".

// RestartArgs are the arguments of Sentry.Restart.
type RestartArgs struct {
	Mode    string        `json:"mode"`
	Binary  string        `json:"binary"`
	Timeout time.Duration `json:"timeout"`
}

// RestartRecord is the outcome of the last restart, kept by the sentry
// that came out of it (exec mode reports through it, since the CLI's
// connection does not survive execve).
type RestartRecord struct {
	Generation uint64          `json:"generation"`
	Timing     handover.Timing `json:"timing"`
	Error      string          `json:"error,omitempty"`
}

// ExecArgs are the arguments of Sentry.Exec: argv, extra environment, and
// stdin, stdout, stderr as files.
type ExecArgs struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env"`
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

// SignalArgs are the arguments of Sentry.Signal.
type SignalArgs struct {
	Signal int `json:"signal"`
}

// KHODumpArgs are the arguments of Sentry.KHODump.
type KHODumpArgs struct {
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

// connect opens a control connection to a sandbox.
func connect(root, id string) (*urpc.Client, error) {
	s, err := unet.Connect(controlPath(root, id), false)
	if err != nil {
		return nil, fmt.Errorf("connecting to sandbox %q: %w", id, err)
	}
	return urpc.NewClient(s), nil
}

// controlTimeout bounds a control call (connecting included): a stuck
// sentry must not hang the CLI. WaitPID has none; Restart gets its own
// timeout on top.
const controlTimeout = 30 * time.Second

// call makes one control call to a sandbox, within controlTimeout.
func call(root, id, method string, arg, result any) error {
	return callWithin(root, id, method, arg, result, controlTimeout)
}

// callWithin makes one control call to a sandbox; timeout > 0 bounds it.
// On a timeout the call is abandoned (its connection shut down) and the
// error says so.
func callWithin(root, id, method string, arg, result any, timeout time.Duration) error {
	conn := make(chan *urpc.Client, 1)
	done := make(chan error, 1)
	go func() {
		c, err := connect(root, id)
		if err != nil {
			done <- err
			return
		}
		conn <- c
		defer c.Close()
		done <- c.Call("Sentry."+method, arg, result)
	}()
	if timeout <= 0 {
		return <-done
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-timer.C:
		select {
		case c := <-conn:
			c.Socket.Shutdown()
		default:
		}
		return fmt.Errorf("sandbox %q: no answer to %s within %v: %w", id, method, timeout, unix.ETIMEDOUT)
	}
}
