// Package boot is the sentry process of a sandbox: the kernel (memory
// file, KHO, LUO, guest dispatch), the sandbox's two listening sockets, the
// guest processes it launches, the control server the CLI calls, and both
// sides of a live restart (driven by pkg/sentry/handover through the
// Source and Target this package implements).
//
// A Sentry is made by New (a cold boot) or NewFromHandover (the incoming
// side of a live restart), then Run (serve and launch the entrypoint) and
// Wait (until it stops). Stop stops it; during a restart a stop waits for
// the restart's outcome.
//
// Lock order: Sentry.mu → kernel locks. Sentry.mu is never held across a
// call into the kernel that waits (Pause, Shutdown) or a process wait.
package boot

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/urpc"
)

// Options configures a sentry process.
type Options struct {
	// Globals are the global flags to hand to a new sentry at a restart.
	Globals sandbox.Globals
	// Version is this build's version string.
	Version string
	// MetadataChunks is, for a transfer-mode restart's new sentry, the
	// number of page-metadata chunks the old one had: it faults them in
	// before it says it is ready (pgalloc.PrepareMetadata).
	MetadataChunks int
}

// exitGrace is how long a stopping sentry waits for its control
// connections to end before it closes them.
const exitGrace = 2 * time.Second

// stopRequest is a stop of the sandbox: its exit status and why.
type stopRequest struct {
	exitStatus int
	reason     string
	// entrypointExited says the entrypoint's own exit asked for it,
	// which an exec-mode restart does not roll back for (restartExec).
	entrypointExited bool
}

// Sentry is one sandbox's sentry process.
type Sentry struct {
	opts Options
	cfg  sandbox.Config
	k    *kernel.Kernel

	// guestFile and controlFile are the listening sockets; they cross a
	// restart. The listeners this process accepts on are dups of them,
	// closed to stop accepting.
	guestFile   *os.File
	controlFile *os.File
	server      *urpc.Server
	exited      chan struct{}
	exitStatus  int
	// waitFor are the guests of the previous sentry (transfer mode), which
	// it stops after the commit, or what a dead sentry left, which the
	// supervisor killed (recovery): the entrypoint is relaunched only once
	// they are gone.
	waitFor []int
	// waitStart are their start times (sandbox.StartTime), waitFrom the
	// previous sentry's pid.
	waitStart []uint64
	waitFrom  int
	// waitLive says waitFor are waited for only while they run (a
	// recovery), not until they are reaped (a restart).
	waitLive bool
	// early is the entrypoint a transfer restart started before its
	// pause, waiting at its start gate (early.go) until Run launches it
	// or drops it; nil if none.
	early *earlyEntry

	mu sync.Mutex
	// +checklocks:mu
	guestLn *net.UnixListener
	// +checklocks:mu
	controlLn *net.UnixListener
	// +checklocks:mu
	started bool
	// +checklocks:mu
	procs map[int]*guestProc
	// +checklocks:mu
	finished map[int]WaitResult
	// +checklocks:mu
	restarting bool
	// restartDone is closed when the restart in progress has its outcome;
	// nil when none is.
	//
	// +checklocks:mu
	restartDone chan struct{}
	// pendingStop is a stop asked for during a restart (the entrypoint
	// exited, SIGTERM, a terminating Signal): applied after a rollback,
	// dropped after a handoff (this process exits; the new sentry serves).
	//
	// +checklocks:mu
	pendingStop *stopRequest
	// +checklocks:mu
	handedOver bool
	// +checklocks:mu
	stopped bool
	// last is the outcome of the restart this sentry came out of.
	//
	// +checklocks:mu
	last sandbox.RestartRecord
	// recovery is the recovery this sentry came out of, if any.
	//
	// +checklocks:mu
	recovery *sandbox.RecoveryRecord
	// supervised is set while a supervisor holds the memory file;
	// registered once register has run.
	//
	// +checklocks:mu
	supervised bool
	// +checklocks:mu
	registered bool
	// supervisor is the pid of the supervisor this sentry registered
	// with, 0 if none.
	//
	// +checklocks:mu
	supervisor int
	// supervisorStop is a stop the supervisor passed on at registration.
	//
	// +checklocks:mu
	supervisorStop *supervisor.StopRequest

	// standby is the connection on which this sentry, the new one of a
	// transfer-mode restart, stood by with the supervisor (until Commit
	// promotes it); answered is closed once the supervisor has answered
	// the promotion (nil if none is due). Both belong to the restart's
	// goroutine, then to Run.
	standby  *handover.Channel
	answered chan struct{}

	// superMu serializes the notices to the supervisor.
	superMu sync.Mutex
	// superCh is the connection to the supervisor, nil without one.
	//
	// +checklocks:superMu
	superCh *handover.Channel
}

// control is a control server with the controller of a sentry registered
// on it. urpc's Register reflects over every method of the controller:
// 0.08-0.15 ms here, which a sentry booting from a handover pays before
// its blackout (prepareControl) rather than inside it.
type control struct {
	server *urpc.Server
	c      *controller
}

// newControl registers a controller, bound to no sentry yet, with a new
// server.
func newControl() *control {
	c := &controller{}
	srv := urpc.NewServer()
	srv.Register(c)
	return &control{server: srv, c: c}
}

// prepareControl runs newControl beside whatever the caller does next (in
// exec mode, the boot inside the blackout).
func prepareControl() func() *control { return beside(newControl) }

// beside runs f on a goroutine of its own, on the other CPU while the
// caller goes on; the function it returns waits for f's result.
func beside[T any](f func() T) func() T {
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	return sync.OnceValue(func() T { return <-ch })
}

// newSentry makes a sentry served by ctl, a control bound to no sentry
// yet (newControl if nil).
func newSentry(cfg sandbox.Config, opts Options, ctl *control) *Sentry {
	if ctl == nil {
		ctl = newControl()
	}
	s := &Sentry{cfg: cfg, opts: opts, exited: make(chan struct{}), procs: make(map[int]*guestProc)}
	s.server, ctl.c.s = ctl.server, s
	return s
}

// New boots a sandbox cold: its directory, its sockets and a fresh kernel
// with a memory file of cfg.MemorySize bytes.
//
// Every fd the process inherited without FD_CLOEXEC is closed first: the
// caller marks the fds it keeps close-on-exec before.
func New(cfg sandbox.Config, opts Options) (*Sentry, error) {
	catchSignals()
	if n := closeInherited(); n > 0 {
		log.Warningf("closed %d fds inherited without FD_CLOEXEC", n)
	}
	if err := sandbox.CheckID(cfg.ID); err != nil {
		return nil, err
	}
	dir := sandbox.Dir(cfg.Root, cfg.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	s := newSentry(cfg, opts, nil)
	var err error
	if s.guestFile, err = listen(sandbox.GuestPath(cfg.Root, cfg.ID)); err != nil {
		return nil, err
	}
	if s.controlFile, err = listen(sandbox.ControlPath(cfg.Root, cfg.ID)); err != nil {
		s.removeSockets()
		return nil, err
	}
	s.k, err = kernel.New(kernel.Options{MemorySize: cfg.MemorySize, Logf: log.Infof})
	if err != nil {
		s.removeSockets()
		return nil, fmt.Errorf("cold boot: %w", err)
	}
	s.cfg.Created = time.Now().UTC()
	s.cfg.MemorySize = s.k.MemoryFile().Size()
	log.Infof("sandbox %s: cold boot, pid %d, %d-byte memory file", cfg.ID, os.Getpid(), s.cfg.MemorySize)
	return s, nil
}

// Run serves the sandbox: guests and control calls are accepted (unless a
// restart's commit started that already), the state file names this
// process, and the entrypoint is launched (or relaunched after a restart).
func (s *Sentry) Run() error {
	// An entrypoint started early that is not launched here never runs.
	defer s.dropEarly()
	if err := s.serve(); err != nil {
		return err
	}
	if !s.isRegistered() {
		s.register(true)
	}
	// A stop asked for during the restart comes with the answer.
	s.awaitSupervisor()
	if st := s.stopAsked(); st != nil {
		// A kill during the restart this sentry came out of.
		log.Infof("the supervisor passed on a stop asked for during the restart: %s", st.Reason)
		s.Stop(st.ExitStatus, st.Reason)
		return nil
	}
	return s.launchEntrypoint()
}

// Wait blocks until the sandbox stops and returns the entrypoint's exit
// status (128+signal if a signal stopped it).
func (s *Sentry) Wait() int {
	<-s.exited
	return s.exitStatus
}

// Stop stops the sandbox with the given exit status, or, while a restart
// is in progress, once the restart has its outcome: after a rollback the
// sandbox stops, after a handoff the new sentry serves it and the request
// is dropped.
func (s *Sentry) Stop(exitStatus int, reason string) {
	s.requestStop(stopRequest{exitStatus: exitStatus, reason: reason})
}

// requestStop is Stop of r.
func (s *Sentry) requestStop(r stopRequest) {
	s.mu.Lock()
	if s.restarting {
		if s.pendingStop == nil {
			s.pendingStop = &r
		}
		s.mu.Unlock()
		log.Infof("stop (exit status %d, %q) during a restart: deferred until its outcome", r.exitStatus, r.reason)
		return
	}
	s.mu.Unlock()
	s.stop(r.exitStatus, r.reason)
}

// serve starts accepting guests and control calls and handling SIGTERM and
// SIGINT, once.
func (s *Sentry) serve() error {
	s.mu.Lock()
	started := s.started
	s.started = true
	s.mu.Unlock()
	if started {
		return nil
	}
	if err := s.startAccepting(); err != nil {
		return err
	}
	catchSignals()
	signalled.Store(s)
	return nil
}

var (
	catchOnce sync.Once
	// signalled is the sentry SIGTERM and SIGINT stop, once it serves.
	signalled atomic.Pointer[Sentry]
)

// catchSignals makes SIGTERM and SIGINT stop the serving sentry; before
// one serves, they end the process as their default action would. It is
// called before a sentry boots, because the first signal.Notify of a
// process takes a millisecond or more, which the end of a restart's
// blackout should not pay.
func catchSignals() {
	catchOnce.Do(func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, unix.SIGTERM, unix.SIGINT)
		go func() {
			for sig := range sigs {
				s := signalled.Load()
				if s == nil {
					signal.Reset(sig)
					unix.Kill(os.Getpid(), sig.(unix.Signal))
					continue
				}
				s.Stop(128+int(unix.SIGKILL), "the sentry got "+unix.SignalName(sig.(unix.Signal)))
			}
		}()
	})
}

// writeState writes the state file for a running sandbox, unless the
// sandbox has stopped or been handed over: the file is written under s.mu
// and stop marks the sandbox stopped under s.mu before it writes its own,
// so a late write can never turn "stopped" back into "running".
func (s *Sentry) writeState(errStr string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.handedOver {
		return nil
	}
	st := s.stateLocked()
	st.Error = errStr
	return sandbox.WriteState(st)
}

// +checklocks:s.mu
func (s *Sentry) stateLocked() *sandbox.State {
	c := &s.cfg
	st := &sandbox.State{
		ID: c.ID, Status: sandbox.StatusRunning, PID: os.Getpid(), Version: s.opts.Version, Created: c.Created,
		Root: c.Root, GuestSocket: sandbox.GuestPath(c.Root, c.ID), ControlSocket: sandbox.ControlPath(c.Root, c.ID),
		MemorySize: c.MemorySize, Entrypoint: c.Entrypoint,
	}
	if s.k != nil {
		st.LiveupdateNumber = s.k.LUO().LiveupdateNumber()
	}
	for _, p := range s.procs {
		if p.entry {
			st.EntrypointPID = p.pid
		}
		st.Guests = append(st.Guests, sandbox.GuestRecord{PID: p.pid, Start: p.start})
	}
	if s.last.Generation > 0 {
		last := s.last
		st.LastRestart = &last
	}
	st.Recoveries, st.LastRecovery, st.Supervised = c.Recoveries, s.recovery, s.supervised
	return st
}

// stop ends the sandbox: guests killed, kernel shut down (every guest fd
// closed), sockets removed, state "stopped" with the entrypoint's exit
// status. It must not run during a restart (Stop defers it).
func (s *Sentry) stop(exitStatus int, reason string) {
	s.mu.Lock()
	if s.stopped || s.handedOver {
		s.mu.Unlock()
		return
	}
	s.stopped = true
	s.mu.Unlock()
	// The supervisor learns of the stop before anything is torn down: a
	// sentry that dies from here on (a "kill" that found the control
	// socket closed SIGKILLs it) has its stop finished, not a recovery
	// of a sandbox whose entrypoint is gone.
	s.notifySupervisor(&supervisor.Notice{Stop: &supervisor.StopRequest{ExitStatus: exitStatus, Reason: reason}})
	s.stopAccepting()
	s.killGuests()
	if s.k != nil {
		s.k.Shutdown()
	}
	s.removeSockets()
	s.mu.Lock()
	st := s.stateLocked()
	s.mu.Unlock()
	st.Status = sandbox.StatusStopped
	st.ExitStatus = &exitStatus
	st.Error = reason
	if err := sandbox.WriteState(st); err != nil {
		log.Warningf("%v", err)
	}
	log.Infof("sandbox %s stopped (exit status %d) %s", s.cfg.ID, exitStatus, reason)
	// Answer the calls in progress (the Signal that stopped the sandbox,
	// the Restart whose rollback applied a deferred stop) before the
	// process exits. stop never runs inside a call.
	s.server.Stop(exitGrace)
	s.exitStatus = exitStatus
	close(s.exited)
}

// stopGrace is how long guests have to exit after SIGTERM or SIGINT before
// the sandbox stops them with SIGKILL.
var stopGrace = 5 * time.Second

// signal sends sig to every guest process; SIGTERM, SIGINT and SIGKILL
// also stop the sandbox, after the outcome of a restart in progress.
// After SIGTERM or SIGINT the guests have stopGrace to exit: the sandbox's
// exit status is then the entrypoint's own (0 if it exits cleanly on
// SIGTERM), and only guests still running after it are SIGKILLed (137).
func (s *Sentry) signal(sig unix.Signal) error {
	stops := supervisor.StopsSandbox(sig)
	if stops {
		// Whatever happens to this process from now on (an exec-mode
		// restart replacing it, a crash), the sandbox stops.
		s.notifySupervisor(&supervisor.Notice{Stop: &supervisor.StopRequest{ExitStatus: 128 + int(sig), Reason: "killed by " + unix.SignalName(sig)}})
	}
	s.mu.Lock()
	if done := s.restartDone; stops && done != nil {
		// A stop must not run alongside a restart: wait for its outcome
		// (bounded by the restart's timeout). An exec-mode restart that
		// has not called execve yet rolls back instead (restartExec).
		if s.pendingStop == nil {
			s.pendingStop = &stopRequest{exitStatus: 128 + int(sig), reason: "killed by " + unix.SignalName(sig)}
		}
		s.mu.Unlock()
		<-done
		s.mu.Lock()
	}
	if s.handedOver {
		s.mu.Unlock()
		return fmt.Errorf("the sandbox was handed over to a new sentry, signal it there: %w", unix.EAGAIN)
	}
	for pid := range s.procs {
		unix.Kill(pid, sig)
	}
	s.mu.Unlock()
	if stops {
		go s.stopAfterSignal(sig)
	}
	return nil
}

// stopAfterSignal stops the sandbox after sig: at once for SIGKILL,
// otherwise once every guest has exited or stopGrace has passed. An
// entrypoint that exits in time stops the sandbox itself, with its own
// exit status (see reap).
func (s *Sentry) stopAfterSignal(sig unix.Signal) {
	if sig != unix.SIGKILL {
		deadline := time.After(stopGrace)
		for {
			s.mu.Lock()
			n, stopped := len(s.procs), s.stopped
			s.mu.Unlock()
			if n == 0 || stopped {
				break
			}
			select {
			case <-deadline:
				s.Stop(128+int(unix.SIGKILL), fmt.Sprintf("guests still running %v after %v: killed", stopGrace, sig))
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	s.Stop(128+int(sig), "killed by "+unix.SignalName(sig))
}
