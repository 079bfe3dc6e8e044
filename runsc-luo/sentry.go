package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/google/subcommands"
	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

func nowUTC() time.Time { return time.Now().UTC() }

// faultAckDelay, if set (only by the tests, with -ldflags -X), is how long
// the old sentry of a transfer-mode restart sleeps before reading the new
// sentry's ack: it stands in for being descheduled near its deadline.
var faultAckDelay string

// exitGrace is how long the old sentry of a handoff waits for its control
// connections to end before it closes them.
const exitGrace = 2 * time.Second

// defaultRestartTimeout is a restart's timeout when none is given.
const defaultRestartTimeout = 10 * time.Second

// commitSendTimeout bounds sending the Commit (a few bytes into an empty
// socket buffer).
const commitSendTimeout = 2 * time.Second

// closeAll closes files that came with a message that carries none.
func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// guestProc is a guest process the sentry launched.
type guestProc struct {
	pid int
	// start is the process's start time (procStart), its identity.
	start uint64
	entry bool
	cmd   *exec.Cmd
	done  chan struct{}
	res   WaitResult
}

// sentry is the sandbox's sentry process: the kernel, its two listening
// sockets, the control server and the guest processes it launched.
type sentry struct {
	cfg config
	k   *kernel.Kernel

	// guestFile and controlFile are the listening sockets; they cross a
	// restart. guestLn and controlLn are this process's listeners on
	// dups of them, closed to stop accepting.
	guestFile   *os.File
	controlFile *os.File

	mu         sync.Mutex
	guestLn    *net.UnixListener
	controlLn  *net.UnixListener
	procs      map[int]*guestProc
	finished   map[int]WaitResult
	restarting bool
	// restartDone is closed when the restart in progress has its
	// outcome; nil when none is.
	restartDone chan struct{}
	// pendingStop is a stop asked for during a restart (the entrypoint
	// exited, SIGTERM, a terminating Signal): applied after a rollback,
	// dropped after a handoff (this process exits; the new sentry serves).
	pendingStop *stopRequest
	handedOver  bool
	stopped     bool
	last        RestartRecord
	server      *urpc.Server
	exited      chan struct{}
}

// stopRequest is a stop of the sandbox: its exit status and why.
type stopRequest struct {
	exitStatus int
	reason     string
}

// newSentry makes a cold-booted sandbox's directory and sockets.
func newSentry(cfg config) (*sentry, error) {
	if err := os.MkdirAll(cfg.dir(), 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", cfg.dir(), err)
	}
	s := &sentry{cfg: cfg, exited: make(chan struct{}), procs: make(map[int]*guestProc)}
	var err error
	if s.guestFile, err = listen(guestPath(cfg.Root, cfg.ID)); err != nil {
		return nil, err
	}
	if s.controlFile, err = listen(controlPath(cfg.Root, cfg.ID)); err != nil {
		s.guestFile.Close()
		os.Remove(guestPath(cfg.Root, cfg.ID))
		return nil, err
	}
	return s, nil
}

// listen creates a listening Unix socket at path and returns it as a file.
func listen(path string) (*os.File, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	return f, nil
}

// unixListener returns a listener on a dup of f.
func unixListener(f *os.File) (*net.UnixListener, error) {
	l, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("%T is not a Unix listener", l)
	}
	ul.SetUnlinkOnClose(false)
	return ul, nil
}

// start begins serving guests and control calls, and handles SIGTERM and
// SIGINT.
func (s *sentry) start() {
	s.server = urpc.NewServer()
	s.server.Register(&Sentry{s: s})
	if err := s.startAccepting(); err != nil {
		log.Warningf("%v", err)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT)
	go func() {
		for sig := range sigs {
			s.shutdown(fmt.Sprintf("sentry killed by %v", sig))
		}
	}()
}

// startAccepting opens this process's listeners and starts the accept
// loops.
func (s *sentry) startAccepting() error {
	gl, err := unixListener(s.guestFile)
	if err != nil {
		return fmt.Errorf("guest listener: %w", err)
	}
	cl, err := unixListener(s.controlFile)
	if err != nil {
		gl.Close()
		return fmt.Errorf("control listener: %w", err)
	}
	s.mu.Lock()
	s.guestLn, s.controlLn = gl, cl
	s.mu.Unlock()
	k := s.k
	go func() {
		if err := k.Serve(gl); err != nil {
			log.Warningf("guest socket: %v", err)
		}
	}()
	go s.serveControl(cl)
	return nil
}

// stopAccepting closes this process's listeners; the listening sockets
// stay open (in guestFile and controlFile), so connections queue.
func (s *sentry) stopAccepting() {
	s.mu.Lock()
	gl, cl := s.guestLn, s.controlLn
	s.guestLn, s.controlLn = nil, nil
	s.mu.Unlock()
	if gl != nil {
		gl.Close()
	}
	if cl != nil {
		cl.Close()
	}
}

func (s *sentry) serveControl(l *net.UnixListener) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Warningf("control socket: %v", err)
			}
			return
		}
		raw, err := c.SyscallConn()
		if err != nil {
			c.Close()
			continue
		}
		fd := -1
		raw.Control(func(f uintptr) { fd, _ = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) })
		c.Close()
		if fd < 0 {
			continue
		}
		sock, err := unet.NewSocket(fd)
		if err != nil {
			unix.Close(fd)
			continue
		}
		s.server.StartHandling(sock)
	}
}

// exitAfterHandoff ends the old sentry of a successful transfer-mode
// restart once its control calls have been answered: urpc's Stop waits
// for every control connection to end (the CLI closes its own once it has
// the Restart answer); connections still open after exitGrace are closed,
// those in the middle of a call once it is answered. An exit after any
// call (as before) could come before the Restart answer.
func (s *sentry) exitAfterHandoff() {
	s.server.Stop(exitGrace)
	log.Infof("handed over; exiting")
	os.Exit(0)
}

// writeState writes the state file for a running sandbox, unless the
// sandbox has stopped or been handed over: the file is written under s.mu
// and stop marks the sandbox stopped under s.mu before it writes its own,
// so a late write can never turn "stopped" back into "running".
func (s *sentry) writeState(errStr string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.handedOver {
		return nil
	}
	st := s.stateLocked()
	st.Error = errStr
	return writeState(st)
}

func (s *sentry) stateLocked() *state {
	st := &state{
		ID: s.cfg.ID, Status: statusRunning, PID: os.Getpid(), Version: version, Created: s.cfg.Created,
		Root: s.cfg.Root, GuestSocket: guestPath(s.cfg.Root, s.cfg.ID), ControlSocket: controlPath(s.cfg.Root, s.cfg.ID),
		MemorySize: s.cfg.MemorySize, Entrypoint: s.cfg.Entrypoint,
	}
	if s.k != nil {
		st.LiveupdateNumber = s.k.LUO().LiveupdateNumber()
	}
	for _, p := range s.procs {
		if p.entry {
			st.EntrypointPID = p.pid
		}
		st.Guests = append(st.Guests, guestRecord{PID: p.pid, Start: p.start})
	}
	if s.last.Generation > 0 {
		last := s.last
		st.LastRestart = &last
	}
	return st
}

// launch starts a guest program with the guest socket in its environment.
func (s *sentry) launch(argv, env []string, stdin, stdout, stderr *os.File, entry bool) (*guestProc, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("no program given")
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), env...),
		abiguest.EnvSocket+"="+guestPath(s.cfg.Root, s.cfg.ID),
		abiguest.EnvLiveupdateNumber+"="+strconv.FormatUint(s.k.LUO().LiveupdateNumber(), 10))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	// A guest must not die with the CLI's terminal session.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.handedOver {
		return nil, fmt.Errorf("the sandbox is stopping")
	}
	if s.restarting {
		// A guest started now would outlive an exec-mode restart's
		// execve unnoticed, or be killed by a transfer-mode handoff.
		return nil, fmt.Errorf("the sandbox is restarting, try again: %w", unix.EBUSY)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %q: %w", argv[0], err)
	}
	p := &guestProc{pid: cmd.Process.Pid, start: procStart(cmd.Process.Pid), entry: entry, cmd: cmd, done: make(chan struct{})}
	s.procs[p.pid] = p
	go s.reap(p)
	return p, nil
}

// reap waits for a guest process; the entrypoint's exit stops the sandbox
// unless a restart stopped it.
func (s *sentry) reap(p *guestProc) {
	err := p.cmd.Wait()
	p.res = waitResult(p.cmd.ProcessState, err)
	close(p.done)
	s.mu.Lock()
	delete(s.procs, p.pid)
	if !p.entry {
		if s.finished == nil {
			s.finished = make(map[int]WaitResult)
		}
		s.finished[p.pid] = p.res
	}
	quiet := s.handedOver || s.stopped
	s.mu.Unlock()
	if p.entry && !quiet {
		log.Infof("entrypoint (pid %d) exited: %+v", p.pid, p.res)
		s.requestStop(p.res.ExitStatus, "")
	}
}

func waitResult(ps *os.ProcessState, err error) WaitResult {
	if ps == nil {
		return WaitResult{ExitStatus: 127, Signal: fmt.Sprint(err)}
	}
	ws, _ := ps.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		return WaitResult{ExitStatus: 128 + int(ws.Signal()), Signal: ws.Signal().String()}
	}
	return WaitResult{ExitStatus: ws.ExitStatus()}
}

// launchEntrypoint starts (or, after a restart, relaunches) the
// entrypoint, its output appended to entrypoint.log.
func (s *sentry) launchEntrypoint() error {
	if len(s.cfg.Entrypoint) == 0 {
		return nil
	}
	out, err := os.OpenFile(entrypointLogPath(s.cfg.Root, s.cfg.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if _, err := s.launch(s.cfg.Entrypoint, nil, nil, out, out, true); err != nil {
		return err
	}
	// The entrypoint's pid and start time (unless it has already exited
	// and stopped the sandbox).
	return s.writeState("")
}

// killGuests SIGKILLs every guest process the sentry launched and waits
// for them.
func (s *sentry) killGuests() {
	s.mu.Lock()
	procs := make([]*guestProc, 0, len(s.procs))
	for _, p := range s.procs {
		procs = append(procs, p)
	}
	s.mu.Unlock()
	for _, p := range procs {
		unix.Kill(p.pid, unix.SIGKILL)
	}
	for _, p := range procs {
		<-p.done
	}
}

// stopOldGuest kills and reaps a guest the previous image (exec mode)
// launched.
func stopOldGuest(pid int) {
	unix.Kill(pid, unix.SIGKILL)
	var ws unix.WaitStatus
	unix.Wait4(pid, &ws, 0, nil)
}

// requestStop stops the sandbox, or, while a restart is in progress,
// queues the stop until the restart's outcome (see endRestart): a stop
// must not run alongside a handover.
func (s *sentry) requestStop(exitStatus int, reason string) {
	s.mu.Lock()
	if s.restarting {
		if s.pendingStop == nil {
			s.pendingStop = &stopRequest{exitStatus, reason}
		}
		s.mu.Unlock()
		log.Infof("stop (exit status %d, %q) during a restart: deferred until its outcome", exitStatus, reason)
		return
	}
	s.mu.Unlock()
	s.stop(exitStatus, reason)
}

// beginRestart marks a restart in progress; false if one is, or the
// sandbox is stopping.
func (s *sentry) beginRestart() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.restarting || s.stopped || s.handedOver {
		return false
	}
	s.restarting = true
	s.restartDone = make(chan struct{})
	return true
}

// endRestart ends the restart in progress and applies a stop requested
// during it: after a rollback the sandbox stops now; after a handoff the
// request is dropped (the new sentry serves the sandbox).
func (s *sentry) endRestart() {
	s.mu.Lock()
	s.restarting = false
	pending := s.pendingStop
	s.pendingStop = nil
	done := s.restartDone
	s.restartDone = nil
	handedOver := s.handedOver
	s.mu.Unlock()
	close(done)
	if pending == nil {
		return
	}
	if handedOver {
		log.Infof("stop (%q) requested during the restart dropped: the sandbox was handed over", pending.reason)
		return
	}
	log.Infof("applying the stop (%q) requested during the rolled-back restart", pending.reason)
	go s.stop(pending.exitStatus, pending.reason)
}

// stop ends the sandbox: guests killed, kernel shut down (every guest fd
// closed), sockets removed, state "stopped" with the entrypoint's exit
// status. It must not run during a restart (requestStop).
func (s *sentry) stop(exitStatus int, reason string) {
	s.mu.Lock()
	if s.stopped || s.handedOver {
		s.mu.Unlock()
		return
	}
	s.stopped = true
	s.mu.Unlock()
	s.stopAccepting()
	s.killGuests()
	if s.k != nil {
		s.k.Shutdown()
	}
	s.cleanupSockets()
	s.mu.Lock()
	st := s.stateLocked()
	s.mu.Unlock()
	st.Status = statusStopped
	st.ExitStatus = &exitStatus
	st.Error = reason
	if err := writeState(st); err != nil {
		log.Warningf("%v", err)
	}
	log.Infof("sandbox %s stopped (exit status %d) %s", s.cfg.ID, exitStatus, reason)
	if s.server != nil {
		// Answer the calls in progress (the Signal that stopped the
		// sandbox, the Restart whose rollback applied a deferred stop)
		// before the process exits. stop never runs inside a call.
		s.server.Stop(exitGrace)
	}
	close(s.exited)
}

// shutdown stops the sandbox for reason (deferred during a restart).
func (s *sentry) shutdown(reason string) { s.requestStop(128+int(unix.SIGKILL), reason) }

// cleanupSockets closes and removes both sockets.
func (s *sentry) cleanupSockets() {
	if s.guestFile != nil {
		s.guestFile.Close()
	}
	if s.controlFile != nil {
		s.controlFile.Close()
	}
	os.Remove(guestPath(s.cfg.Root, s.cfg.ID))
	os.Remove(controlPath(s.cfg.Root, s.cfg.ID))
}

// wait blocks until the sandbox stops.
func (s *sentry) wait() subcommands.ExitStatus {
	<-s.exited
	return subcommands.ExitSuccess
}

// compatibles returns the ABI strings the outgoing state uses.
func (s *sentry) compatibles() []string {
	cs := []string{abikho.Compatible, abiluo.FDTCompatible, abiluo.FDTSessionCompatible}
	seen := map[string]bool{}
	for _, ss := range s.k.LUO().Status().Sessions {
		if ss.Direction != "outgoing" {
			continue
		}
		for _, f := range ss.Files {
			if !seen[f.Compatible] {
				seen[f.Compatible] = true
				cs = append(cs, f.Compatible)
			}
		}
	}
	return cs
}

// descriptor builds the handover descriptor.
func (s *sentry) descriptor(mode string, h kernel.Handover, ht kernel.HandoverTiming, pausedAt int64) (*handover.Descriptor, error) {
	cfg, err := json.Marshal(&s.cfg)
	if err != nil {
		return nil, err
	}
	return &handover.Descriptor{
		Protocol: handover.ProtocolVersion, Mode: mode, Version: version, PID: os.Getpid(),
		Root: h.Root, LiveupdateNumber: h.LiveupdateNumber, MemorySize: s.k.MemoryFile().Size(),
		Compatibles: s.compatibles(), Sandbox: cfg, PausedAt: pausedAt,
		Freeze: ht.Freeze, Finalize: ht.Finalize,
	}, nil
}

// rollback undoes a prepared handover and resumes serving.
func (s *sentry) rollback(prepared bool) {
	if prepared {
		if err := s.k.AbortHandover(); err != nil {
			log.Warningf("rollback: %v", err)
		}
	}
	s.k.Resume()
	if err := s.startAccepting(); err != nil {
		log.Warningf("rollback: %v", err)
	}
}

// restartTransfer is a transfer-mode restart: a new sentry process takes
// over; on any failure this one rolls back and goes on serving.
func (s *sentry) restartTransfer(binary string, timeout time.Duration) (handover.Timing, error) {
	var t handover.Timing
	ch, peer, err := handover.Pair()
	if err != nil {
		return t, err
	}
	defer ch.Close()
	logf, err := os.OpenFile(sentryLogPath(s.cfg.Root, s.cfg.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		peer.Close()
		return t, err
	}
	defer logf.Close()
	cmd := exec.Command(binary, append(globalArgs(), "boot", "--handover-fd=3")...)
	cmd.ExtraFiles = []*os.File{peer}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		peer.Close()
		return t, fmt.Errorf("starting the new sentry %s: %w", binary, err)
	}
	peer.Close()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	// kill stops the new sentry for good before this one touches
	// anything again: a late ack must not find two sentries serving.
	kill := func() {
		cmd.Process.Kill()
		<-exited
	}
	deadline := time.Now().Add(timeout)
	ch.SetDeadline(deadline)
	var ready handover.Ready
	files, err := ch.Recv(&ready)
	closeAll(files)
	if err != nil {
		kill()
		return t, fmt.Errorf("the new sentry (%s) did not become ready: %w (exit: %v)", binary, err, cmd.ProcessState)
	}
	if ready.Protocol != handover.ProtocolVersion {
		kill()
		return t, fmt.Errorf("the new sentry %q speaks handover protocol %d, this one %d", ready.Version, ready.Protocol, handover.ProtocolVersion)
	}

	// The blackout starts. Pause waits for guest calls in progress at
	// most until the restart's deadline; then the restart fails and
	// dispatch goes on.
	pausedAt := handover.Monotonic()
	s.stopAccepting()
	if err := s.k.Pause(deadline); err != nil {
		kill()
		s.rollback(false)
		return t, err
	}
	h, ht, err := s.k.PrepareHandover()
	if err != nil {
		kill()
		s.rollback(false)
		return t, err
	}
	d, err := s.descriptor(handover.ModeTransfer, h, ht, pausedAt)
	if err != nil {
		kill()
		s.rollback(true)
		return t, err
	}
	d.Files = handover.Files{MemoryFile: 0, GuestListener: 1, ControlListener: 2}
	mem, err := s.k.MemoryFile().DupFile()
	if err != nil {
		kill()
		s.rollback(true)
		return t, err
	}
	d.SentAt = handover.Monotonic()
	err = ch.Send(d, mem, s.guestFile, s.controlFile)
	mem.Close()
	if err != nil {
		kill()
		s.rollback(true)
		return t, fmt.Errorf("sending the handover: %w", err)
	}
	if faultAckDelay != "" {
		// Fault injection (test builds only): this sentry descheduled
		// just before it reads the ack.
		if dl, err := time.ParseDuration(faultAckDelay); err == nil {
			time.Sleep(dl)
		}
	}
	var ack handover.Ack
	files, err = ch.Recv(&ack)
	closeAll(files)
	if err != nil {
		kill()
		s.rollback(true)
		return t, fmt.Errorf("waiting for the new sentry's acknowledgement: %w", err)
	}
	if !ack.Accepted {
		kill()
		s.rollback(true)
		return t, fmt.Errorf("the new sentry %q refused the handover: %s", ack.Version, ack.Error)
	}
	// The ack was read within the deadline: commit. The new sentry touches
	// nothing before it has this message, so a failed send can still be
	// rolled back (the new one is killed before anything resumes here);
	// once it is sent, this sentry never rolls back.
	ch.SetDeadline(time.Now().Add(commitSendTimeout))
	if err := ch.Send(&handover.Commit{PID: os.Getpid()}); err != nil {
		kill()
		s.rollback(true)
		return t, fmt.Errorf("committing the handover: %w", err)
	}
	// Committed: the state is the new sentry's. Forget every guest
	// without releasing anything, stop the guest processes, and exit once
	// the CLI has its answer.
	s.mu.Lock()
	s.handedOver = true
	s.mu.Unlock()
	s.k.Handoff()
	s.killGuests()
	// The blackout ends when the new sentry serves guests, after it has
	// committed; without that message (it died right after the ack) the
	// ack's time stands in.
	var serving handover.Serving
	ch.SetDeadline(time.Now().Add(2 * time.Second))
	files, err = ch.Recv(&serving)
	closeAll(files)
	if err == nil && serving.At >= ack.AcceptingAt {
		ack.AcceptingAt = serving.At
	} else {
		log.Warningf("no serving message from the new sentry (%v): the blackout ends at its ack", err)
	}
	return handover.MakeTiming(d, &ack, os.Getpid()), nil
}

// restartExec is an exec-mode restart: this process execve's binary. It
// returns only on failure, after rolling back.
func (s *sentry) restartExec(binary string, timeout time.Duration) error {
	// Check the new binary outside the blackout: after execve there is no
	// way back.
	info, err := probeABI(binary, timeout)
	if err != nil {
		return err
	}
	if info.Protocol != handover.ProtocolVersion {
		return fmt.Errorf("%s speaks handover protocol %d, this sentry %d", binary, info.Protocol, handover.ProtocolVersion)
	}
	if unknown := info.unknownCompatibles(s.compatibles()); len(unknown) > 0 {
		return fmt.Errorf("%s (%q) cannot read %q, which this sandbox's preserved state uses", binary, info.Version, unknown)
	}
	pausedAt := handover.Monotonic()
	s.stopAccepting()
	if err := s.k.Pause(time.Now().Add(timeout)); err != nil {
		s.rollback(false)
		return err
	}
	h, ht, err := s.k.PrepareHandover()
	if err != nil {
		s.rollback(false)
		return err
	}
	d, err := s.descriptor(handover.ModeExec, h, ht, pausedAt)
	if err != nil {
		s.rollback(true)
		return err
	}
	mem, err := s.k.MemoryFile().DupFile()
	if err != nil {
		s.rollback(true)
		return err
	}
	defer mem.Close()
	files := []*os.File{mem, s.guestFile, s.controlFile}
	var fds []int
	for _, f := range files {
		fd, err := handover.Inherit(f)
		if err != nil {
			for _, f := range files {
				unix.CloseOnExec(int(f.Fd()))
			}
			s.rollback(true)
			return err
		}
		fds = append(fds, fd)
	}
	d.Files = handover.Files{MemoryFile: fds[0], GuestListener: fds[1], ControlListener: fds[2]}
	s.mu.Lock()
	for pid := range s.procs {
		d.OldGuests = append(d.OldGuests, pid)
	}
	s.mu.Unlock()
	d.SentAt = handover.Monotonic()
	envEntry, err := handover.EncodeEnv(d)
	if err != nil {
		s.rollback(true)
		return err
	}
	argv := append([]string{binary}, append(globalArgs(), "boot")...)
	err = unix.Exec(binary, argv, append(os.Environ(), envEntry))
	// Still here: execve failed, and everything can be rolled back.
	for _, f := range files {
		unix.CloseOnExec(int(f.Fd()))
	}
	s.rollback(true)
	return fmt.Errorf("execve %s: %w", binary, err)
}

// probeABI runs "binary abi".
func probeABI(binary string, timeout time.Duration) (*abiInfo, error) {
	cmd := exec.Command(binary, "abi")
	done := make(chan struct{})
	timer := time.AfterFunc(timeout, func() {
		select {
		case <-done:
		default:
			if cmd.Process != nil {
				cmd.Process.Kill()
			}
		}
	})
	defer timer.Stop()
	out, err := cmd.Output()
	close(done)
	if err != nil {
		return nil, fmt.Errorf("checking %s (\"%s abi\"): %w", binary, binary, err)
	}
	var info abiInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("checking %s: its \"abi\" output %q: %w", binary, out, err)
	}
	return &info, nil
}

// Sentry is the control interface of a sandbox (urpc methods
// "Sentry.<Name>").
type Sentry struct {
	s *sentry
}

// State returns the sandbox's state.
func (c *Sentry) State(_ *Empty, out *state) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	*out = *c.s.stateLocked()
	return nil
}

// Restart restarts the sentry live. In transfer mode it returns the timing
// once the new sentry took over, or an error after rolling back. In exec
// mode it returns only on failure (rolled back); on success the connection
// ends with the execve and LastRestart has the outcome.
func (c *Sentry) Restart(a *RestartArgs, out *handover.Timing) error {
	s := c.s
	if !s.beginRestart() {
		return fmt.Errorf("the sandbox is already restarting or stopping: %w", unix.EBUSY)
	}
	defer s.endRestart()
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
		timeout = defaultRestartTimeout
	}
	switch a.Mode {
	case "", handover.ModeTransfer:
		t, err := s.restartTransfer(binary, timeout)
		if err != nil {
			log.Warningf("transfer-mode restart failed, still serving: %v", err)
			return fmt.Errorf("%w; the old sentry (pid %d) rolled back and is still serving", err, os.Getpid())
		}
		*out = t
		go s.exitAfterHandoff()
		return nil
	case handover.ModeExec:
		err := s.restartExec(binary, timeout)
		log.Warningf("exec-mode restart failed, still serving: %v", err)
		return fmt.Errorf("%w; the old sentry (pid %d) rolled back and is still serving", err, os.Getpid())
	}
	return fmt.Errorf("restart mode %q: must be %q or %q", a.Mode, handover.ModeTransfer, handover.ModeExec)
}

// LastRestart returns the outcome of the restart this sentry came out of.
func (c *Sentry) LastRestart(_ *Empty, out *RestartRecord) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	*out = c.s.last
	return nil
}

// Exec starts a host program as another guest, with the given stdio.
func (c *Sentry) Exec(a *ExecArgs, out *PIDResult) error {
	var stdio [3]*os.File
	copy(stdio[:], a.Files)
	// urpc closes the received files after the call; the child has its
	// own copies by then.
	p, err := c.s.launch(a.Argv, a.Env, stdio[0], stdio[1], stdio[2], false)
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
func (c *Sentry) WaitPID(a *PIDResult, out *WaitResult) error {
	c.s.mu.Lock()
	p, ok := c.s.procs[a.PID]
	res, done := c.s.finished[a.PID]
	delete(c.s.finished, a.PID)
	c.s.mu.Unlock()
	if done {
		*out = res
		return nil
	}
	if !ok {
		return fmt.Errorf("no guest process %d: %w", a.PID, unix.ESRCH)
	}
	<-p.done
	*out = p.res
	return nil
}

// Signal sends a signal to every guest process; SIGTERM, SIGINT and
// SIGKILL also stop the sandbox.
func (c *Sentry) Signal(a *SignalArgs, _ *Empty) error {
	sig := unix.Signal(a.Signal)
	if a.Signal <= 0 || a.Signal > 64 {
		return fmt.Errorf("signal %d: %w", a.Signal, unix.EINVAL)
	}
	stops := sig == unix.SIGTERM || sig == unix.SIGINT || sig == unix.SIGKILL
	s := c.s
	s.mu.Lock()
	if done := s.restartDone; stops && done != nil {
		// A stop must not run alongside a restart: wait for its outcome
		// (bounded by the restart's timeout).
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
		go s.requestStop(128+a.Signal, "killed by "+sig.String())
	}
	return nil
}

// KHODump returns the outgoing (or incoming) KHO root FDT.
func (c *Sentry) KHODump(a *KHODumpArgs, out *KHODumpResult) error {
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
func (c *Sentry) LUOStatus(_ *Empty, out *LUOStatusResult) error {
	out.Status = c.s.k.LUO().Status()
	return nil
}
