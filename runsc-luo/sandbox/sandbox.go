// Package sandbox is what every runsc-luo process knows of a sandbox on
// disk and on the wire, without any of the sentry: its configuration, the
// paths under --root, the state file, the identity of host processes, and
// control calls (urpc over a Unix socket) with a timeout.
//
// The sentry (package boot) writes the state file; the CLI (packages
// container and cmd) reads it and calls the sentry's control methods.
package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Globals are runsc-luo's global flags, handed to every runsc-luo process
// a command starts (a sentry, a new sentry at a restart).
type Globals struct {
	// Root is the directory holding sandbox state and sockets.
	Root string
	// Debug logs debug messages.
	Debug bool
	// LogFormat is "text" or "json".
	LogFormat string
}

// Args returns the global flags as arguments for a child runsc-luo.
func (g Globals) Args() []string {
	return []string{"--root=" + g.Root, fmt.Sprintf("--debug=%t", g.Debug), "--log-format=" + g.LogFormat}
}

// DefaultRoot is $XDG_RUNTIME_DIR/runsc-luo, else /var/run/runsc-luo.
func DefaultRoot() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "runsc-luo")
	}
	return "/var/run/runsc-luo"
}

// Config is a sandbox's configuration; it crosses every restart inside the
// handover descriptor.
type Config struct {
	ID         string    `json:"id"`
	Root       string    `json:"root"`
	MemorySize uint64    `json:"memory_size"`
	Entrypoint []string  `json:"entrypoint,omitempty"`
	Created    time.Time `json:"created"`
	// Recoveries counts the recoveries after a sentry died; the
	// supervisor keeps it.
	Recoveries uint64 `json:"recoveries,omitempty"`
}

// Paths of a sandbox's files under its root.
func Dir(root, id string) string         { return filepath.Join(root, id) }
func StatePath(root, id string) string   { return filepath.Join(Dir(root, id), "state.json") }
func ControlPath(root, id string) string { return filepath.Join(Dir(root, id), "control.sock") }
func GuestPath(root, id string) string   { return filepath.Join(Dir(root, id), "guest.sock") }
func SupervisorPath(root, id string) string {
	return filepath.Join(Dir(root, id), "supervisor.sock")
}
func SentryLogPath(root, id string) string { return filepath.Join(Dir(root, id), "sentry.log") }
func EntrypointLogPath(root, id string) string {
	return filepath.Join(Dir(root, id), "entrypoint.log")
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// CheckID validates a sandbox ID as runsc does (no path separators).
func CheckID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("sandbox ID %q: must be 1-64 characters of [A-Za-z0-9_.-], not starting with a punctuation mark", id)
	}
	return nil
}
