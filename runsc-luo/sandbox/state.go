package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
)

// Sandbox statuses, as runsc names container statuses.
const (
	StatusRunning = "running"
	StatusStopped = "stopped"
)

// State is the state file, and what "state" prints.
type State struct {
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
	Guests []GuestRecord `json:"guests,omitempty"`
	// Recoveries counts the times the sandbox was recovered from its
	// memory file after a sentry died; LastRecovery says the last.
	Recoveries   uint64          `json:"recoveries,omitempty"`
	LastRecovery *RecoveryRecord `json:"last_recovery,omitempty"`
	// Supervised says a supervisor holds the memory file: a crash of the
	// sentry is recovered. Without one it loses the sandbox.
	Supervised bool `json:"supervised"`
	// LastPID is, in what "state" prints for a stopped sandbox (which
	// reports no pid), the pid of the sentry that stopped it.
	LastPID int `json:"last_pid,omitempty"`

	// Gone is set by ReadState: the file says running, but the sentry
	// process is gone (it died without stopping its guests).
	Gone bool `json:"-"`
}

// GuestRecord names a guest process: its pid and, so that a reused pid is
// never mistaken for it, its start time.
type GuestRecord struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// RestartRecord is the outcome of the last restart, kept by the sentry that
// came out of it (exec mode reports through it, since the CLI's connection
// does not survive execve).
type RestartRecord struct {
	Generation uint64          `json:"generation"`
	Timing     handover.Timing `json:"timing"`
	Error      string          `json:"error,omitempty"`
	// EntrypointStartedEarly says the relaunched entrypoint was started
	// before the pause and waited at its start gate (transfer mode, an
	// entrypoint that honours the gate).
	EntrypointStartedEarly bool `json:"entrypoint_started_early,omitempty"`
}

// RecoveryRecord is a recovery of the sandbox after its sentry died.
type RecoveryRecord struct {
	// At is when the new sentry started serving.
	At time.Time `json:"at"`
	// Reason says which sentry died and when.
	Reason string `json:"reason"`
	// Sessions are the LUO sessions recovered.
	Sessions []string `json:"sessions,omitempty"`
}

// WriteState replaces the state file atomically.
func WriteState(s *State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	p := StatePath(s.Root, s.ID)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	return nil
}

// ReadState reads a sandbox's state file and, if the status says running,
// checks that the sentry process is alive (a sentry that died unexpectedly
// shows as stopped, with Gone set).
func ReadState(root, id string) (*State, error) {
	if err := CheckID(id); err != nil {
		return nil, err
	}
	s, err := readStateFile(root, id)
	if err != nil {
		return nil, err
	}
	if s.Status == StatusRunning && !Alive(s.PID) {
		// A sentry that stops writes its final state and then exits,
		// possibly between the read above and the check: read again
		// now that it is gone, or its exit status would be lost.
		if s, err = readStateFile(root, id); err != nil {
			return nil, err
		}
		if s.Status == StatusRunning && !Alive(s.PID) {
			s.Status = StatusStopped
			s.Gone = true
			if s.Error == "" {
				s.Error = "the sentry process is gone"
			}
		}
	}
	return s, nil
}

// readStateFile reads and decodes the state file of sandbox id.
func readStateFile(root, id string) (*State, error) {
	b, err := os.ReadFile(StatePath(root, id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("sandbox %q does not exist in %s (\"runsc-luo --root %s list\" shows those that do)", id, root, root)
	}
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state file of %q: %w", id, err)
	}
	return &s, nil
}

// List returns the state of every sandbox in root.
func List(root string) ([]*State, error) {
	ents, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*State
	for _, e := range ents {
		if !e.IsDir() || CheckID(e.Name()) != nil {
			continue
		}
		if st, err := ReadState(root, e.Name()); err == nil {
			out = append(out, st)
		}
	}
	return out, nil
}
