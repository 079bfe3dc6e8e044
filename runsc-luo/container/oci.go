package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/specutil"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// OCIRecord is what a sandbox keeps of its container (oci.json): the
// bundle it was made from and the process a container manager waits on.
type OCIRecord struct {
	Bundle      string            `json:"bundle,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// PID is the supervisor's: the process that outlives every sentry
	// and exits with the container's exit status.
	PID int `json:"pid"`
}

// readOCI reads a sandbox's oci.json; a sandbox without one has an empty
// record.
func readOCI(root, id string) (*OCIRecord, error) {
	var r OCIRecord
	b, err := os.ReadFile(sandbox.OCIPath(root, id))
	if errors.Is(err, os.ErrNotExist) {
		return &r, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("oci.json of %q: %w", id, err)
	}
	return &r, nil
}

// writeJSON replaces path atomically with v as JSON.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// updateOCI changes a sandbox's oci.json.
func updateOCI(root, id string, change func(*OCIRecord)) error {
	r, err := readOCI(root, id)
	if err != nil {
		return err
	}
	change(r)
	return writeJSON(sandbox.OCIPath(root, id), r)
}

// CreateOptions are the choices of Create.
type CreateOptions struct {
	// Bundle is the bundle directory.
	Bundle string
	// MemorySize is the memory file's size; 0 takes the bundle's
	// (annotation dev.livesentry.memory or linux.resources.memory.limit),
	// else 1 GiB.
	MemorySize uint64
	// PIDFile, if set, receives the pid a container manager waits on.
	PIDFile string
	// Attach copies the process's output to this process's stdout (see
	// StartOptions.Attach).
	Attach bool
}

// DefaultMemorySize is a container's memory file size when neither the
// command line nor the bundle gives one.
const DefaultMemorySize = 1 << 30

// initTimeout bounds the preparation of a container's process (building
// the libc shim the first time included).
const initTimeout = 60 * time.Second

// Create makes container id from a bundle and leaves it created: its
// supervisor and sentry serve, its process is prepared in its namespaces
// and root filesystem and waits for Start. It returns the pid a container
// manager waits on (the supervisor's, which exits with the container's
// exit status). On failure nothing is left behind.
func Create(g sandbox.Globals, id string, o CreateOptions) (int, error) {
	if err := sandbox.CheckID(id); err != nil {
		return 0, err
	}
	s, bundle, err := specutil.Load(o.Bundle)
	if err != nil {
		return 0, err
	}
	size := o.MemorySize
	if size == 0 {
		if size, err = specutil.MemoryLimit(s, sandbox.ParseSize); err != nil {
			return 0, err
		}
	}
	if size == 0 {
		size = DefaultMemorySize
	}
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	entry := append(append([]string{exe}, g.Args()...), "init", "--id="+id, "--bundle="+bundle)
	prepare := func(dir string) error {
		if err := unix.Mkfifo(sandbox.StartFIFOPath(g.Root, id), 0o600); err != nil {
			return fmt.Errorf("creating the start FIFO: %w", err)
		}
		return writeJSON(sandbox.OCIPath(g.Root, id), &OCIRecord{Bundle: bundle, Annotations: s.Annotations})
	}
	// The init adds the libc shim to the process itself, inside the
	// container.
	pid, err := startSupervised(g, id, size, entry, StartOptions{NoShim: true, Prepare: prepare, Attach: o.Attach})
	if err != nil {
		return 0, err
	}
	undo := func(err error) (int, error) {
		Kill(g.Root, id, unix.SIGKILL)
		// Once the supervisor has exited: until then it may still
		// write the state file, or recover a sentry that died.
		Remove(g.Root, id)
		return 0, err
	}
	if err := awaitInit(g.Root, id); err != nil {
		return undo(err)
	}
	if o.PIDFile != "" {
		if err := writePIDFile(o.PIDFile, pid); err != nil {
			return undo(err)
		}
	}
	return pid, nil
}

// awaitInit waits until the container's init reports its process
// prepared, or why it is not.
func awaitInit(root, id string) error {
	deadline := time.Now().Add(initTimeout)
	for {
		b, err := os.ReadFile(sandbox.InitStatusPath(root, id))
		if err == nil {
			if string(b) == "ready" {
				return nil
			}
			return fmt.Errorf("preparing the container's process: %s", strings.TrimPrefix(string(b), "error: "))
		}
		if st, err := sandbox.ReadState(root, id); err == nil && st.Status == sandbox.StatusStopped {
			return fmt.Errorf("the container's init exited before it was ready: %s", st.Error)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the container's init was not ready within %v", initTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// writePIDFile writes pid to path atomically, as runc does.
func writePIDFile(path string, pid int) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(abs), "."+filepath.Base(abs)+".tmp")
	if err := os.WriteFile(tmp, []byte(fmt.Sprint(pid)), 0o644); err != nil {
		return fmt.Errorf("--pid-file: %w", err)
	}
	if err := os.Rename(tmp, abs); err != nil {
		return fmt.Errorf("--pid-file: %w", err)
	}
	return nil
}

// isCreated reports whether a sandbox is a created container that has not
// been started.
func isCreated(root, id string) bool {
	_, err := os.Lstat(sandbox.StartFIFOPath(root, id))
	return err == nil
}

// StartContainer starts a created container's process.
func StartContainer(root, id string) error {
	st, err := sandbox.ReadState(root, id)
	if err != nil {
		return err
	}
	if st.Status != sandbox.StatusRunning {
		return fmt.Errorf("container %q is %s: cannot start a stopped container; delete it and create it again", id, st.Status)
	}
	fifo := sandbox.StartFIFOPath(root, id)
	if !isCreated(root, id) {
		return fmt.Errorf("container %q is already running: start works once, on a created container", id)
	}
	f, err := os.OpenFile(fifo, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("starting %q: %w", id, err)
	}
	defer f.Close()
	// The init, blocked opening the FIFO for writing, writes one byte.
	fds := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLIN}}
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, _ := unix.Poll(fds, 100)
		if n > 0 && fds[0].Revents&unix.POLLIN != 0 {
			break
		}
		if st, err := sandbox.ReadState(root, id); err != nil || st.Status != sandbox.StatusRunning {
			return fmt.Errorf("container %q stopped before it started", id)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the init of %q did not answer start within 10s", id)
		}
	}
	var b [1]byte
	f.Read(b[:])
	if err := os.Remove(fifo); err != nil {
		return fmt.Errorf("starting %q: %w", id, err)
	}
	return nil
}

// Status values of the runtime spec.
const (
	StatusCreated = string(specs.StateCreated)
	StatusRunning = string(specs.StateRunning)
	StatusStopped = string(specs.StateStopped)
)

// OCIState is what "state" prints: the runtime spec's state, with
// livesentry's own under "livesentry".
type OCIState struct {
	specs.State
	// Created is when the sandbox was created.
	Created time.Time `json:"created"`
	// Livesentry is livesentry's state of the sandbox.
	Livesentry *Extras `json:"livesentry"`
}

// Extras are livesentry's part of OCIState.
type Extras struct {
	*sandbox.State
	// SupervisorPID is the supervisor's pid while it runs.
	SupervisorPID int `json:"supervisor_pid,omitempty"`
	// Restarts are the last live restarts made with "restart", oldest
	// first.
	Restarts []RestartEntry `json:"restarts,omitempty"`
}

// ReadOCIState returns a sandbox's state in the runtime spec's terms:
// created until started, running, or stopped; pid (the process a
// container manager waits on) only while not stopped.
func ReadOCIState(root, id string) (*OCIState, error) {
	st, err := readSettled(root, id)
	if err != nil {
		return nil, err
	}
	rec, err := readOCI(root, id)
	if err != nil {
		return nil, err
	}
	out := &OCIState{
		State:   specs.State{Version: specs.Version, ID: id, Bundle: rec.Bundle, Annotations: rec.Annotations},
		Created: st.Created, Livesentry: &Extras{State: st},
	}
	out.Livesentry.Restarts, _ = ReadRestarts(root, id)
	supAlive := sandbox.Alive(rec.PID)
	if supAlive {
		out.Livesentry.SupervisorPID = rec.PID
	}
	switch {
	case st.Status == sandbox.StatusStopped:
		out.Status = specs.StateStopped
		// Nothing of a stopped sandbox runs: no pid to report (the last
		// sentry's is kept apart, as last_pid).
		st.LastPID = st.PID
		st.PID, st.EntrypointPID, st.Guests = 0, 0, nil
		out.Livesentry.SupervisorPID = 0
	case isCreated(root, id):
		out.Status = specs.StateCreated
	default:
		out.Status = specs.StateRunning
	}
	if out.Status != specs.StateStopped {
		out.Pid = st.PID
		if supAlive {
			out.Pid = rec.PID
		}
	}
	return out, nil
}

// RestartEntry is one live restart made with "restart", kept in the
// sandbox's restarts.json.
type RestartEntry struct {
	At   time.Time `json:"at"`
	Mode string    `json:"mode"`
	// Outcome is "restarted", "rolled back", "recovered" or "lost".
	Outcome string `json:"outcome"`
	Error   string `json:"error,omitempty"`
	// Phases are the timing breakdown in milliseconds, in order.
	Phases []PhaseMS       `json:"phases,omitempty"`
	Timing handover.Timing `json:"timing"`
}

// PhaseMS is one phase of a restart in milliseconds.
type PhaseMS struct {
	Name string  `json:"name"`
	MS   float64 `json:"ms"`
}

// keptRestarts is how many restarts restarts.json keeps.
const keptRestarts = 10

// ReadRestarts returns the last restarts of a sandbox, oldest first.
func ReadRestarts(root, id string) ([]RestartEntry, error) {
	b, err := os.ReadFile(sandbox.RestartsPath(root, id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var rs []RestartEntry
	if err := json.Unmarshal(b, &rs); err != nil {
		return nil, fmt.Errorf("restarts.json of %q: %w", id, err)
	}
	return rs, nil
}

// recordRestart appends a restart's outcome to restarts.json.
func recordRestart(root, id, mode string, t handover.Timing, err error) {
	if mode == "" {
		mode = handover.ModeTransfer
	}
	e := RestartEntry{At: time.Now().UTC(), Mode: mode, Outcome: "restarted", Timing: t}
	var re *RestartError
	switch {
	case errors.As(err, &re):
		e.Outcome = map[Outcome]string{RolledBack: "rolled back", Recovered: "recovered", Lost: "lost"}[re.Outcome]
		e.Error = re.Err.Error()
	case err != nil:
		// The restart did not reach the sandbox: nothing to keep.
		return
	}
	if err == nil {
		for _, p := range t.Phases() {
			e.Phases = append(e.Phases, PhaseMS{p.Name, float64(p.Duration) / 1e6})
		}
	}
	rs, _ := ReadRestarts(root, id)
	rs = append(rs, e)
	if len(rs) > keptRestarts {
		rs = rs[len(rs)-keptRestarts:]
	}
	if _, serr := os.Stat(sandbox.Dir(root, id)); serr == nil {
		writeJSON(sandbox.RestartsPath(root, id), rs)
	}
}

// Processes returns the host pids of a sandbox's guest processes and all
// their descendants (a container's init stages and everything the process
// started), sorted.
func Processes(root, id string) ([]int, error) {
	st, _, _, err := readLive(root, id)
	if err != nil {
		return nil, err
	}
	if st.Status != sandbox.StatusRunning {
		return nil, nil
	}
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		if p, ok := sandbox.ReadProc(pid); ok && p.Alive() {
			children[p.PPID] = append(children[p.PPID], pid)
		}
	}
	seen := map[int]bool{}
	var walk func(int)
	walk = func(pid int) {
		if seen[pid] || !sandbox.Alive(pid) {
			return
		}
		seen[pid] = true
		for _, c := range children[pid] {
			walk(c)
		}
	}
	for _, g := range st.Guests {
		if sandbox.Is(g.PID, g.Start) {
			walk(g.PID)
		}
	}
	out := make([]int, 0, len(seen))
	for pid := range seen {
		out = append(out, pid)
	}
	sort.Ints(out)
	return out, nil
}

// SignalProcess sends sig to the container's process only (runc's kill
// without --all): the entrypoint the sentry launched, which forwards it
// into the container.
func SignalProcess(root, id string, sig unix.Signal) error {
	if err := checkSignal(sig); err != nil {
		return err
	}
	st, _, _, err := readLive(root, id)
	if err != nil {
		return err
	}
	if st.Status != sandbox.StatusRunning {
		return fmt.Errorf("container %q: container not running (%s); \"runsc-luo delete %s\" removes it", id, st.Status, id)
	}
	if st.EntrypointPID <= 0 {
		return fmt.Errorf("container %q has no process to signal", id)
	}
	for _, g := range st.Guests {
		if g.PID == st.EntrypointPID && sandbox.Is(g.PID, g.Start) {
			if err := unix.Kill(g.PID, sig); err != nil {
				return fmt.Errorf("signalling %q: %w", id, err)
			}
			return nil
		}
	}
	return fmt.Errorf("container %q: its process is not running", id)
}

// supervisorExitTimeout bounds the wait for a stopped sandbox's supervisor
// to exit.
const supervisorExitTimeout = 5 * time.Second

// awaitSupervisor waits until the supervisor of a stopped sandbox has
// exited: removing the sandbox's directory under a supervisor still
// looking at it would make it take the sandbox for crashed.
func awaitSupervisor(root, id string) {
	deadline := time.Now().Add(supervisorExitTimeout)
	for supervisorRuns(root, id) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// Remove removes a stopped sandbox's directory once its supervisor is
// gone.
func Remove(root, id string) error {
	awaitSupervisor(root, id)
	if err := os.RemoveAll(sandbox.Dir(root, id)); err != nil {
		return fmt.Errorf("removing %q: %w", id, err)
	}
	return nil
}

// WaitExit waits until sandbox id stops and returns its exit status.
func WaitExit(root, id string) (int, error) {
	st, err := WaitStopped(root, id, 0)
	if err != nil {
		return 0, err
	}
	if st.ExitStatus == nil {
		return 0, fmt.Errorf("sandbox %q stopped without an exit status: %s", id, st.Error)
	}
	return *st.ExitStatus, nil
}
