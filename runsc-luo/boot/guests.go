package boot

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/shim"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
)

// guestProc is a guest process the sentry launched.
type guestProc struct {
	pid int
	// start is the process's start time, its identity with pid.
	start uint64
	entry bool
	cmd   *exec.Cmd
	// done is closed once the process is reaped; res is set then.
	done chan struct{}
	res  WaitResult
}

// launch starts a guest program with the guest socket in its environment
// and, with withShim, the libc shim preloaded (which a static program, such
// as a Go guest, simply does not load). Without a C compiler to build the
// shim, the program starts without it and a warning goes to its stderr.
func (s *Sentry) launch(argv, env []string, stdio [3]*os.File, entry, withShim bool) (*guestProc, error) {
	cmd, err := guestCommand(s.cfg, s.k.LUO().LiveupdateNumber(), argv, env, stdio, withShim)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.mayLaunchLocked(); err != nil {
		return nil, err
	}
	if err := startCmd(cmd); err != nil {
		return nil, fmt.Errorf("starting %q: %w", argv[0], err)
	}
	return s.addGuestLocked(cmd, entry), nil
}

// mayLaunchLocked refuses a guest while the sandbox stops or restarts.
//
// +checklocks:s.mu
func (s *Sentry) mayLaunchLocked() error {
	if s.stopped || s.handedOver {
		return fmt.Errorf("the sandbox is stopping")
	}
	if s.restarting {
		// A guest started now would outlive an exec-mode restart's
		// execve unnoticed, or be killed by a transfer-mode handoff.
		return fmt.Errorf("the sandbox is restarting, try again: %w", unix.EBUSY)
	}
	return nil
}

// addGuestLocked records the started guest cmd and reaps it when it exits.
//
// +checklocks:s.mu
func (s *Sentry) addGuestLocked(cmd *exec.Cmd, entry bool) *guestProc {
	p := &guestProc{pid: cmd.Process.Pid, start: sandbox.StartTime(cmd.Process.Pid), entry: entry, cmd: cmd, done: make(chan struct{})}
	s.procs[p.pid] = p
	go s.reap(p)
	return p
}

// guestCommand is the command that starts argv as a guest of the sandbox
// cfg whose liveupdate number is n.
func guestCommand(cfg sandbox.Config, n uint64, argv, env []string, stdio [3]*os.File, withShim bool) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("no program given")
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), env...),
		abiguest.EnvSocket+"="+sandbox.GuestPath(cfg.Root, cfg.ID),
		abiguest.EnvLiveupdateNumber+"="+strconv.FormatUint(n, 10))
	if withShim {
		lib, err := shim.Path()
		switch {
		case errors.Is(err, shim.ErrNoCompiler):
			// A program that speaks the guest protocol itself (a Go
			// guest) runs as well without; one that relies on the
			// shim finds no /dev/liveupdate, and its stderr says
			// why.
			msg := fmt.Sprintf("runsc-luo: %q runs without the libc shim: %v\n", argv[0], err)
			log.Warningf("%s", msg)
			if stdio[2] != nil {
				stdio[2].WriteString(msg)
			}
		case err != nil:
			return nil, fmt.Errorf("starting %q under the libc shim: %w", argv[0], err)
		default:
			cmd.Env = withPreload(cmd.Env, lib)
		}
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdio[0], stdio[1], stdio[2]
	// A guest must not die with the CLI's terminal session.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, nil
}

// withPreload returns env with lib first in LD_PRELOAD (the last
// LD_PRELOAD in env wins, as for execve, and keeps its libraries after
// lib).
func withPreload(env []string, lib string) []string {
	const key = "LD_PRELOAD="
	val := lib
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if rest, ok := strings.CutPrefix(kv, key); ok {
			if rest != "" {
				val = lib + ":" + rest
			} else {
				val = lib
			}
			continue
		}
		out = append(out, kv)
	}
	return append(out, key+val)
}

// reap waits for a guest process; the entrypoint's exit stops the sandbox
// unless a restart stopped it.
func (s *Sentry) reap(p *guestProc) {
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
		s.requestStop(stopRequest{exitStatus: p.res.ExitStatus, entrypointExited: true})
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

// settleGuests waits, for at most a second each, until the guest processes
// pids (killed by a test at a point of a restart) have been reaped, with
// what their exit asks of the sentry (the entrypoint's: a stop), and until
// the kernel has let go of them (kernel.Kernel.WaitGone).
func (s *Sentry) settleGuests(pids []int) {
	for _, pid := range pids {
		s.mu.Lock()
		p := s.procs[pid]
		s.mu.Unlock()
		if p == nil {
			continue
		}
		select {
		case <-p.done:
		case <-time.After(time.Second):
		}
		// reap asks for the entrypoint's stop right after done.
		for deadline := time.Now().Add(time.Second); p.entry && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			s.mu.Lock()
			asked := s.pendingStop != nil || s.stopped
			s.mu.Unlock()
			if asked {
				break
			}
		}
	}
	s.k.WaitGone(pids, time.Second)
}

// waitGuest waits for a guest process the sentry launched to exit.
func (s *Sentry) waitGuest(pid int) (WaitResult, error) {
	s.mu.Lock()
	p, ok := s.procs[pid]
	res, done := s.finished[pid]
	delete(s.finished, pid)
	s.mu.Unlock()
	if done {
		return res, nil
	}
	if !ok {
		return WaitResult{}, fmt.Errorf("no guest process %d: %w", pid, unix.ESRCH)
	}
	<-p.done
	return p.res, nil
}

// launchEntrypoint starts (or, after a restart, relaunches) the
// entrypoint, its output appended to entrypoint.log.
func (s *Sentry) launchEntrypoint() error {
	if len(s.cfg.Entrypoint) == 0 {
		return nil
	}
	s.awaitOldGuests()
	if e := s.early; e != nil {
		s.early = nil
		if e.matches(s.cfg, s.k.LUO().LiveupdateNumber()) {
			return s.launchEarly(e)
		}
		log.Warningf("the entrypoint started before the pause (pid %d) is not the one to relaunch: killing it", e.cmd.Process.Pid)
		e.kill()
	}
	out, err := os.OpenFile(sandbox.EntrypointLogPath(s.cfg.Root, s.cfg.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if _, err := s.launch(s.cfg.Entrypoint, nil, [3]*os.File{nil, out, out}, true, !s.cfg.NoShim); err != nil {
		return err
	}
	// The entrypoint's pid and start time (unless it has already exited
	// and stopped the sandbox).
	return s.writeState("")
}

// takeWaitStarts records the start times of the guests of the previous
// sentry (waitFor), which identify them in awaitOldGuests.
func (s *Sentry) takeWaitStarts() {
	s.waitStart = s.waitStart[:0]
	for _, pid := range s.waitFor {
		s.waitStart = append(s.waitStart, sandbox.StartTime(pid))
	}
}

// oldGuestsTimeout bounds the wait for the previous sentry's guests.
const oldGuestsTimeout = 5 * time.Second

// awaitOldGuests waits until the guests of the previous sentry (transfer
// mode) have been reaped, so that two entrypoints never run at once, not
// even as a zombie: the previous sentry kills and reaps them after the
// commit. If it died before it could (or after oldGuestsTimeout), they
// are killed here, and still waited for until their new parent (the
// supervisor, a subreaper) has reaped them.
//
// After a recovery, what the dead sentry left was killed by the supervisor
// and runs no code any more: it is waited for until it is a zombie, not
// until it is reaped, which happens only once the dead sentry has been
// torn down (its children are its own until then), up to a second or more
// for a sentry that had gigabytes mapped.
//
// Each wait sleeps on a pidfd of the guest, which wakes it the moment the
// guest is reaped (or, after a recovery, exits), rather than in the next
// millisecond's look at /proc: those milliseconds came between the end of
// a restart's blackout and the relaunched entrypoint's start.
func (s *Sentry) awaitOldGuests() {
	deadline := time.Now().Add(oldGuestsTimeout)
	for i, pid := range s.waitFor {
		start := s.waitStart[i]
		pw := openProcWait(pid, start, s.waitLive)
		for exists(pid, start) && (!s.waitLive || sandbox.Is(pid, start)) {
			if !sandbox.Alive(s.waitFrom) || time.Now().After(deadline) {
				if sandbox.Is(pid, start) {
					log.Warningf("guest %d of the previous sentry %d still runs: killing it", pid, s.waitFrom)
					killGroup(pid)
				}
			}
			if time.Now().After(deadline.Add(oldGuestsTimeout)) {
				log.Warningf("guest %d of the previous sentry %d has not been reaped after %v", pid, s.waitFrom, 2*oldGuestsTimeout)
				break
			}
			pw.wait(time.Millisecond)
		}
		pw.close()
	}
	s.waitFor = nil
}

// procWait waits for a process that is not this one's child to be reaped
// or to exit, on a pidfd.
type procWait struct {
	fd     int   // -1: no pidfd (gone already, or none on this kernel)
	events int16 // what ends the wait besides POLLHUP
}

// openProcWait returns a wait for the process pid that started at start:
// for it to be reaped, or, if exited, to exit.
func openProcWait(pid int, start uint64, exited bool) procWait {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return procWait{fd: -1}
	}
	// The pidfd names whatever pid named when it was opened: it is the
	// guest's only if the guest still had pid then.
	if sandbox.StartTime(pid) != start {
		unix.Close(fd)
		return procWait{fd: -1}
	}
	w := procWait{fd: fd}
	if exited {
		w.events = unix.POLLIN
	}
	return w
}

// wait returns once the process is reaped (a pidfd reports POLLHUP then,
// Linux 6.9 and later), exits if that is asked for (POLLIN), or d has
// passed, whichever is first. The caller looks at the process again: a
// kernel that reports no POLLHUP makes the wait a sleep of d.
func (w procWait) wait(d time.Duration) {
	if w.fd < 0 {
		time.Sleep(d)
		return
	}
	fds := []unix.PollFd{{Fd: int32(w.fd), Events: w.events}}
	// Signals (the runtime's preemption, SIGCHLD) interrupt the poll.
	for end := time.Now().Add(d); ; {
		left := time.Until(end)
		if left <= 0 {
			return
		}
		_, err := unix.Poll(fds, int(max(left.Milliseconds(), 1)))
		if err == nil {
			return
		}
		if err != unix.EINTR {
			time.Sleep(left)
			return
		}
	}
}

func (w procWait) close() {
	if w.fd >= 0 {
		unix.Close(w.fd)
	}
}

// exists reports whether pid is the process that started at start, alive
// or a zombie not yet reaped.
func exists(pid int, start uint64) bool {
	p, ok := sandbox.ReadProc(pid)
	return ok && p.Start == start
}

// killGroup SIGKILLs a guest and its process group (each guest leads its
// own): the children it started go with it, rather than outliving the
// restart or the stop that ended it. (A pid that leads a group that still
// exists is never reused.)
func killGroup(pid int) {
	unix.Kill(-pid, unix.SIGKILL)
	unix.Kill(pid, unix.SIGKILL)
}

// signalGuests sends sig to every guest process the sentry launched, with
// their process groups, without waiting: after a restart's commit they
// must not run on. SIGSTOP while the new sentry does not serve yet (their
// teardown, SIGKILL, takes milliseconds of CPU for a guest with memory
// mapped), SIGKILL once it does.
func (s *Sentry) signalGuests(sig unix.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.procs {
		unix.Kill(-p.pid, sig)
		unix.Kill(p.pid, sig)
	}
}

// killGuests SIGKILLs every guest process the sentry launched, with their
// process groups, and waits for them.
func (s *Sentry) killGuests() {
	s.mu.Lock()
	procs := make([]*guestProc, 0, len(s.procs))
	for _, p := range s.procs {
		procs = append(procs, p)
	}
	s.mu.Unlock()
	for _, p := range procs {
		killGroup(p.pid)
	}
	for _, p := range procs {
		<-p.done
	}
}

// guestPIDs returns the pids of the guests the sentry launched.
func (s *Sentry) guestPIDs() []int {
	pids, _ := s.guestIdentities()
	return pids
}

// guestIdentities returns the pids of the guests the sentry launched, and
// their start times in the same order; nil start times if one was not
// read at launch (the new sentry then reads them itself).
func (s *Sentry) guestIdentities() ([]int, []uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pids := make([]int, 0, len(s.procs))
	starts := make([]uint64, 0, len(s.procs))
	for pid, p := range s.procs {
		pids = append(pids, pid)
		starts = append(starts, p.start)
	}
	if slices.Contains(starts, 0) {
		starts = nil
	}
	return pids, starts
}

// stopOldGuests kills and reaps the guests an exec-mode restart's old
// image launched (this process's children now).
func stopOldGuests(pids []int) {
	for _, pid := range pids {
		if pid > 1 {
			killGroup(pid)
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, 0, nil)
		}
	}
}
