package boot

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/shim"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
)

// A transfer restart's relaunched entrypoint is a new process, and on a VM
// a new process is expensive: fork, execve, the dynamic loader or the Go
// runtime and the program's initialisation take milliseconds, all of them
// after the blackout and before the guest can retrieve its memory. So when
// the entrypoint said that it honours a start gate (its Hello,
// abiguest.HelloStartGate: pkg/guest and the libc shim do), the old sentry
// passes its command line to the new one (envPrestart), which starts the
// next life before it says Ready. The process loads and waits at the gate
// (abiguest.EnvStartFD) before the program's own code runs; the new sentry
// opens the gate where it would have launched the entrypoint, once the old
// guests are gone, so that two lives of the program never run at once. If
// the restart does not happen, the new sentry kills the waiting process,
// or, if the new sentry is killed, the gate's end makes it exit.

// prestartSpec is the entrypoint of a transfer restart's new sentry as the
// old sentry passes it, before the descriptor, in envPrestart.
type prestartSpec struct {
	// ID is the sandbox's ID.
	ID string `json:"id"`
	// Entrypoint is the command line; NoShim as in sandbox.Config.
	Entrypoint []string `json:"entrypoint"`
	NoShim     bool     `json:"no_shim,omitempty"`
	// LiveupdateNumber is the sandbox's liveupdate number after the
	// restart, which the relaunched entrypoint is given.
	LiveupdateNumber uint64 `json:"liveupdate_number"`
	// GateWait bounds the wait for the process to reach its start gate
	// (gateWait), so that it stays well inside the restart's deadline
	// for Ready.
	GateWait time.Duration `json:"gate_wait_ns"`
}

// envPrestart carries a prestartSpec, as JSON, to a transfer restart's new
// sentry. In the environment rather than on the command line: a build
// that does not know it (a restart into an older one) ignores it and
// relaunches the entrypoint after the restart.
const envPrestart = "LIVESENTRY_PRESTART"

// env is the environment variable that passes p on.
func (p prestartSpec) env() string {
	b, _ := json.Marshal(p)
	return envPrestart + "=" + string(b)
}

// prestartFromEnv takes the prestartSpec out of the environment: nil if
// there is none, an error naming the field if it is malformed. The
// variable is removed, so that no guest inherits it.
func prestartFromEnv() (*prestartSpec, error) {
	v, ok := os.LookupEnv(envPrestart)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(envPrestart)
	var p prestartSpec
	if err := json.Unmarshal([]byte(v), &p); err != nil {
		return nil, fmt.Errorf("%s: %w", envPrestart, err)
	}
	switch {
	case p.ID == "":
		return nil, fmt.Errorf("%s: no id", envPrestart)
	case len(p.Entrypoint) == 0 || p.Entrypoint[0] == "":
		return nil, fmt.Errorf("%s: no entrypoint", envPrestart)
	case p.LiveupdateNumber == 0:
		return nil, fmt.Errorf("%s: liveupdate_number 0 (a restart's is 1 or more)", envPrestart)
	case p.GateWait <= 0:
		return nil, fmt.Errorf("%s: gate_wait_ns %d (want a positive wait)", envPrestart, p.GateWait)
	}
	return &p, nil
}

// prestart returns what a transfer restart's new sentry needs to start the
// entrypoint before the pause, if the running entrypoint said that it waits
// at a start gate; timeout is the restart's, which bounds the wait for
// Ready.
func (s *Sentry) prestart(timeout time.Duration) (prestartSpec, bool) {
	s.mu.Lock()
	pid := 0
	for _, p := range s.procs {
		if p.entry {
			pid = p.pid
		}
	}
	s.mu.Unlock()
	if pid == 0 || len(s.cfg.Entrypoint) == 0 || !s.k.StartGated(pid) {
		return prestartSpec{}, false
	}
	return prestartSpec{ID: s.cfg.ID, Entrypoint: s.cfg.Entrypoint, NoShim: s.cfg.NoShim,
		LiveupdateNumber: s.k.LUO().LiveupdateNumber() + 1, GateWait: min(gateWait, timeout/4)}, true
}

// gateWait bounds the wait for an early entrypoint to reach its start gate
// (a Go program's start-up takes 10–30 ms here), and a quarter of the
// restart's timeout bounds it too.
const gateWait = 2 * time.Second

// earlyEntry is an entrypoint started before a restart's pause, waiting at
// its start gate.
type earlyEntry struct {
	want prestartSpec
	cmd  *exec.Cmd
	// gate is the sentry's end of the start gate.
	gate *os.File
}

// startEarly starts p's entrypoint under root and waits until it is at its
// start gate. A process that does not get there within p.GateWait is
// killed, and the error says why.
func startEarly(root string, p prestartSpec) (*earlyEntry, error) {
	withShim := !p.NoShim
	if withShim && !shim.Lookup() {
		// Building the shim takes seconds: not before Ready.
		return nil, fmt.Errorf("the libc shim is not built")
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start gate: %w", err)
	}
	// Non-blocking, so that the read below can have a deadline.
	unix.SetNonblock(fds[0], true)
	gate, theirs := os.NewFile(uintptr(fds[0]), "start-gate"), os.NewFile(uintptr(fds[1]), "start-gate")
	defer theirs.Close()
	out, err := os.OpenFile(sandbox.EntrypointLogPath(root, p.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		gate.Close()
		return nil, err
	}
	defer out.Close()
	cfg := sandbox.Config{ID: p.ID, Root: root}
	// The gate is fd 3 (the first of ExtraFiles).
	cmd, err := guestCommand(cfg, p.LiveupdateNumber, p.Entrypoint, []string{abiguest.EnvStartFD + "=3"}, [3]*os.File{nil, out, out}, withShim)
	if err != nil {
		gate.Close()
		return nil, err
	}
	cmd.ExtraFiles = []*os.File{theirs}
	if err := startCmd(cmd); err != nil {
		gate.Close()
		return nil, fmt.Errorf("starting %q: %w", p.Entrypoint[0], err)
	}
	e := &earlyEntry{want: p, cmd: cmd, gate: gate}
	gate.SetReadDeadline(time.Now().Add(p.GateWait))
	var b [1]byte
	n, err := gate.Read(b[:])
	gate.SetReadDeadline(time.Time{})
	if n != 1 || b[0] != abiguest.StartGateWaiting {
		e.kill()
		if err == nil {
			err = fmt.Errorf("it sent %q", b[:n])
		}
		return nil, fmt.Errorf("%q did not wait at its start gate: %w", p.Entrypoint[0], err)
	}
	return e, nil
}

// startEarlyFromEnv starts the entrypoint the old sentry passed in
// envPrestart, under root, and returns it waiting at its start gate; nil,
// with a warning in the log, if there is none or it could not be started
// early (it is then launched after the restart, as without).
func startEarlyFromEnv(root string) *earlyEntry {
	p, err := prestartFromEnv()
	if err != nil {
		log.Warningf("%v", err)
	}
	if p == nil {
		return nil
	}
	e, err := startEarly(root, *p)
	if err != nil {
		log.Warningf("the entrypoint is relaunched after the restart, not before: %v", err)
		return nil
	}
	log.Infof("entrypoint started before the pause (pid %d), waiting at its start gate", e.cmd.Process.Pid)
	return e
}

// matches reports whether e is the entrypoint cfg would launch, given n,
// the liveupdate number after the restart.
func (e *earlyEntry) matches(cfg sandbox.Config, n uint64) bool {
	return e.want.ID == cfg.ID && slices.Equal(e.want.Entrypoint, cfg.Entrypoint) && e.want.NoShim == cfg.NoShim && e.want.LiveupdateNumber == n
}

// kill kills the waiting process and its group and reaps it.
func (e *earlyEntry) kill() {
	// The kill first: a process that saw its gate close first would
	// still run a little (its exit, a line on its stderr).
	killGroup(e.cmd.Process.Pid)
	e.gate.Close()
	e.cmd.Wait()
}

// dropEarly kills the entrypoint started early, if Run has not launched it.
func (s *Sentry) dropEarly() {
	if s.early != nil {
		s.early.kill()
		s.early = nil
	}
}

// launchEarly makes the early entrypoint e the sandbox's entrypoint and
// opens its start gate.
func (s *Sentry) launchEarly(e *earlyEntry) error {
	s.mu.Lock()
	if err := s.mayLaunchLocked(); err != nil {
		s.mu.Unlock()
		e.kill()
		return err
	}
	p := s.addGuestLocked(e.cmd, true)
	s.last.EntrypointStartedEarly = true
	s.mu.Unlock()
	_, err := e.gate.Write([]byte{abiguest.StartGateOpen})
	e.gate.Close()
	if err != nil {
		// It died at the gate: reap reports its exit as the
		// entrypoint's.
		log.Warningf("opening the start gate of the entrypoint (pid %d): %v", p.pid, err)
	}
	// The entrypoint's pid and start time, and how it started (unless it
	// has already exited and stopped the sandbox).
	return s.writeState("")
}
