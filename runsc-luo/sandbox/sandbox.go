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
	// Log is the file the runtime's log and errors are appended to, as
	// runc's --log (a container manager reads the last error from it);
	// empty: stderr only.
	Log string
	// DebugLog is the file debug messages are appended to (with Debug);
	// empty: they go where the log goes.
	DebugLog string
}

// Args returns the global flags as arguments for a child runsc-luo (a
// supervisor, every sentry it or a restart starts, a container's init), so
// that --debug and the log files reach all of them.
func (g Globals) Args() []string {
	args := []string{"--root=" + g.Root, fmt.Sprintf("--debug=%t", g.Debug), "--log-format=" + g.LogFormat}
	if g.Log != "" {
		args = append(args, "--log="+g.Log)
	}
	if g.DebugLog != "" {
		args = append(args, "--debug-log="+g.DebugLog)
	}
	return args
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
	ID         string   `json:"id"`
	Root       string   `json:"root"`
	MemorySize uint64   `json:"memory_size"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	// NoShim starts guests without the libc shim (LD_PRELOAD), for the
	// entrypoint at every launch; exec chooses for itself.
	NoShim  bool      `json:"no_shim,omitempty"`
	Created time.Time `json:"created"`
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

// OCIPath is the file holding a sandbox's container record (bundle,
// annotations, the pid a container manager waits on).
func OCIPath(root, id string) string { return filepath.Join(Dir(root, id), "oci.json") }

// StartFIFOPath is the FIFO a created container's init waits on until
// "start" opens it (runc's exec.fifo): while it exists the container is
// "created".
func StartFIFOPath(root, id string) string { return filepath.Join(Dir(root, id), "start.fifo") }

// InitStatusPath is where a container's init reports that its process is
// prepared ("ready") or why it could not be ("error: ...").
func InitStatusPath(root, id string) string { return filepath.Join(Dir(root, id), "init.status") }

// RestartsPath is the file keeping the last restarts of a sandbox.
func RestartsPath(root, id string) string { return filepath.Join(Dir(root, id), "restarts.json") }

// CheckID validates a sandbox ID as runsc does (no path separators): 1 to
// 64 characters of [A-Za-z0-9_.-], the first alphanumeric. (Not a regexp:
// compiling one at package init cost every process of this binary, an
// exec-mode restart's new image among them, about a millisecond.)
func CheckID(id string) error {
	ok := len(id) >= 1 && len(id) <= 64
	for i := 0; ok && i < len(id); i++ {
		c := id[i]
		alnum := c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		ok = alnum || i > 0 && (c == '_' || c == '.' || c == '-')
	}
	if !ok {
		return fmt.Errorf("sandbox ID %q: must be 1-64 characters of [A-Za-z0-9_.-], not starting with a punctuation mark", id)
	}
	return nil
}
