package boot

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
)

// outgoing is the sentry as the outgoing side of a restart drives it: a
// handover.Source.
type outgoing struct {
	s    *Sentry
	mode string
	// mem is the dup of the memory file handed over, between Prepare and
	// Abort or Handoff.
	mem *os.File
	// peer is the new sentry's pid (transfer mode).
	peer int
	// fault is the restart's fault hook (handover.Options.Fault), which
	// Prepare calls inside, at handover.OfferFrozen.
	fault func(handover.Point) error
	// cfg is the sandbox's configuration as the descriptor carries it,
	// encoded before the pause (newOutgoing); nil: Prepare encodes it.
	cfg []byte
}

// newOutgoing returns the outgoing side of a restart in mode, to the new
// sentry peer (transfer mode), with the restart's fault hook. The
// configuration, which does not change while the sentry lives, is encoded
// now rather than in the blackout (some 15 µs).
func (s *Sentry) newOutgoing(mode string, peer int, fault func(handover.Point) error) *outgoing {
	o := &outgoing{s: s, mode: mode, peer: peer, fault: fault}
	if cfg, err := json.Marshal(&s.cfg); err == nil {
		o.cfg = cfg
	}
	return o
}

var (
	_ handover.Source    = (*outgoing)(nil)
	_ handover.Previewer = (*outgoing)(nil)
)

// Pause stops accepting guests and control calls, unless that was done
// already (a transfer-mode restart does it just before the pause,
// beforeTransferPause), and pauses guest dispatch.
func (o *outgoing) Pause(deadline time.Time) error {
	o.s.stopAccepting()
	if err := o.s.k.Pause(deadline); err != nil {
		o.resumeAccepting()
		return err
	}
	// The supervisor keeps the root page as it is now: a new sentry's
	// ingest rewrites it (KHO reuses the page), and should this sentry
	// die before a new one registers, the sandbox is recovered from it.
	k := o.s.k
	if page, err := k.MemoryFile().Slice(k.KHO().RootAddr()/pgalloc.PageSize, 1); err == nil {
		o.s.notifySupervisor(&supervisor.Notice{Frozen: bytes.Clone(page)})
	}
	return nil
}

// Preview shows the new sentry of a transfer-mode restart, before the
// pause, the KHO root and tree generation, with a dup of the memory file,
// so that it reads the tree while guests still run here (kernel.Preview).
func (o *outgoing) Preview(p *handover.Preview, peerReads []string) *os.File {
	if o.mode != handover.ModeTransfer {
		return nil
	}
	root, generation, ok := o.s.k.Preview(peerReads)
	if !ok {
		return nil
	}
	mem, err := o.s.k.MemoryFile().DupFile()
	if err != nil {
		log.Warningf("transfer restart: not showing the handover ahead: %v", err)
		return nil
	}
	p.Root, p.MemorySize, p.Generation = root, o.s.k.MemoryFile().Size(), generation
	return mem
}

// Prepare freezes LUO and finalizes KHO, in the newest formats the new
// sentry reads, and describes the result.
func (o *outgoing) Prepare(d *handover.Descriptor, peerReads []string) ([]*os.File, error) {
	s := o.s
	h, err := s.k.PrepareHandoverWith(&d.Timing, peerReads, o.fault)
	if err != nil {
		return nil, err
	}
	fail := func(err error) ([]*os.File, error) {
		o.Abort()
		return nil, err
	}
	cfg := o.cfg
	if cfg == nil {
		if cfg, err = json.Marshal(&s.cfg); err != nil {
			return fail(err)
		}
	}
	if o.mem, err = s.k.MemoryFile().DupFile(); err != nil {
		return fail(err)
	}
	d.Root, d.LiveupdateNumber, d.MemorySize = h.Root, h.LiveupdateNumber, s.k.MemoryFile().Size()
	d.Compatibles, d.Sandbox, d.Generation = h.Written, cfg, h.Generation
	// Exec mode: the guests become the new image's children, and it
	// stops them. Transfer mode: this sentry stops them after the commit,
	// and the new one relaunches the entrypoint only once they are gone
	// (it knows them by pid and start time).
	d.OldGuests, d.OldGuestStarts = s.guestIdentities()
	return []*os.File{o.mem, s.guestFile, s.controlFile}, nil
}

// Abort discards the finalize output and unfreezes LUO.
func (o *outgoing) Abort() {
	if err := o.s.k.AbortHandover(); err != nil {
		log.Warningf("rollback: %v", err)
	}
	o.closeMem()
}

// Resume resumes guest dispatch and accepting.
func (o *outgoing) Resume() {
	o.s.notifySupervisor(&supervisor.Notice{Thawed: true})
	o.s.k.Resume()
	o.resumeAccepting()
}

func (o *outgoing) resumeAccepting() {
	if err := o.s.startAccepting(); err != nil {
		log.Warningf("rollback: %v", err)
	}
}

// Handoff forgets every guest without releasing anything and stops the
// guest processes: the state is the new sentry's. Once the new sentry
// serves (serving: protocol 4, whose ack comes after the blackout) they are
// killed at once; before (protocol 3, whose handoff is inside the
// blackout) they are stopped, and killed after the blackout.
func (o *outgoing) Handoff(serving bool) {
	o.s.mu.Lock()
	o.s.handedOver = true
	o.s.mu.Unlock()
	if o.peer > 0 {
		// Before this sentry's end: the supervisor then waits for the
		// new one's registration, already on its way.
		o.s.notifySupervisor(&supervisor.Notice{HandedOff: o.peer})
	}
	switch {
	case o.mode != handover.ModeTransfer:
	case serving:
		// Their teardown (milliseconds of CPU for a guest with memory
		// mapped) starts now; restartTransfer reaps them.
		o.s.signalGuests(unix.SIGKILL)
	default:
		// Killed once the new sentry serves (restartTransfer).
		o.s.signalGuests(unix.SIGSTOP)
	}
	o.s.k.Handoff()
	if o.mode != handover.ModeTransfer {
		o.s.killGuests()
	}
	o.closeMem()
}

func (o *outgoing) closeMem() {
	if o.mem != nil {
		o.mem.Close()
		o.mem = nil
	}
}

// beginRestart marks a restart in progress; false if one is, or the
// sandbox is stopping.
func (s *Sentry) beginRestart() bool {
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
func (s *Sentry) endRestart() {
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

func (s *Sentry) isHandedOver() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handedOver
}

// exitAfterHandoff ends the old sentry of a transfer-mode restart once its
// control calls have been answered: urpc's Stop waits for every control
// connection to end (the CLI closes its own once it has the Restart
// answer); connections still open after exitGrace are closed.
func (s *Sentry) exitAfterHandoff() {
	// The guests are reaped (killGuests): what is left is this process's
	// teardown, which unmaps every page of the memory file it touched
	// (tens of milliseconds per GiB) and must not take a CPU from the new
	// sentry and its relaunched guests.
	sandbox.Idle(os.Getpid())
	s.server.Stop(exitGrace)
	log.Infof("handed over; exiting")
	os.Exit(0)
}

// restartTransfer is a transfer-mode restart: a new sentry process takes
// over; on any failure before the commit this one rolls back and goes on
// serving.
func (s *Sentry) restartTransfer(binary string, timeout, commitDelay time.Duration, crash *CrashAt) (handover.Timing, error) {
	ch, peer, err := handover.Pair()
	if err != nil {
		return handover.Timing{}, err
	}
	logf, err := os.OpenFile(sandbox.SentryLogPath(s.cfg.Root, s.cfg.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		ch.Close()
		peer.Close()
		return handover.Timing{}, err
	}
	defer logf.Close()
	cmd := exec.Command(binary, append(s.opts.Globals.Args(), "boot", "--handover-fd=3",
		"--metadata-chunks="+strconv.Itoa(s.k.MemoryFile().MetadataChunks()))...)
	cmd.ExtraFiles = []*os.File{peer}
	cmd.Env = os.Environ()
	if p, ok := s.prestart(timeout); ok {
		cmd.Env = append(cmd.Env, p.env())
	}
	if crash != nil {
		cmd.Env = append(cmd.Env, crash.env())
	}
	if commitDelay > 0 {
		cmd.Env = append(cmd.Env, envCommitDelay+"="+commitDelay.String())
	}
	if s.isSupervised() {
		cmd.Env = append(cmd.Env, envSupervisor+"="+sandbox.SupervisorPath(s.cfg.Root, s.cfg.ID))
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = startCmd(cmd)
	peer.Close()
	if err != nil {
		ch.Close()
		return handover.Timing{}, fmt.Errorf("starting the new sentry %s: %w", binary, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	// This process exits once it has handed over, and its exit tears
	// down its page tables, which hold an entry for every page of the
	// memory file it touched (tens of milliseconds of CPU per GiB here):
	// right after the blackout, while the new sentry and the relaunched
	// guests reach their data, on a CPU they need. Drop those of the
	// guests' data instead while the new sentry starts, until it is ready
	// (a page touched from here on faults back in; what is left when the
	// pause comes is torn down at exit, as before). Failing costs only
	// time.
	//
	// The same thread first reads the pages of KHO's outgoing state that
	// the new sentry's ingest reads first thing in the blackout
	// (kho.KHO.ReadAhead: on a host that reclaims cold memory, a page
	// nobody has read for a while can take hundreds of microseconds). It
	// takes a fraction of a millisecond and normally ends long before the
	// new sentry is ready; if not, the pause waits for it as for the drop,
	// outside the blackout.
	stopDrop, dropped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(dropped)
		// On a thread of its own at idle priority, so that it takes
		// only what the new sentry's start leaves of the CPUs; the
		// thread ends with the goroutine, still locked to it.
		runtime.LockOSThread()
		sandbox.IdleThread()
		if _, err := s.k.KHO().ReadAhead(); err != nil {
			log.Warningf("transfer restart: %v", err)
		}
		if err := s.k.MemoryFile().DropTouchedPageTables(stopDrop); err != nil {
			log.Warningf("transfer restart: %v", err)
		}
	}()
	endDrop := sync.OnceFunc(func() {
		close(stopDrop)
		<-dropped
	})
	defer endDrop()
	if crash != nil {
		crash.settle = s.settleGuests
	}
	fault := crash.fault(func() int { return cmd.Process.Pid }, nil)
	t, err := handover.Offer(ch, s.newOutgoing(handover.ModeTransfer, cmd.Process.Pid, fault), handover.Options{
		Version:  s.opts.Version,
		Deadline: time.Now().Add(timeout),
		StopPeer: func() {
			cmd.Process.Kill()
			<-exited
		},
		BeforePause: s.beforeTransferPause(endDrop),
		Fault:       fault,
	})
	if s.isHandedOver() {
		// Stopped at the handoff; the new sentry relaunches the
		// entrypoint once they are gone.
		s.killGuests()
	}
	if err != nil {
		return t, fmt.Errorf("new sentry %s: %w", binary, err)
	}
	return t, nil
}

// beforeTransferPause returns what a transfer-mode restart does once the
// new sentry is ready, just before the blackout: end (the page-table drop
// running meanwhile), then stop accepting. Closing a listener waits for
// its accepting goroutine to wake and return, 0.05-0.25 ms each here, and
// there are two: done before the pause, that wait is no part of the
// blackout. A guest connecting from now on waits in the backlog for
// whichever sentry serves next, as it would in the blackout; a pause that
// fails starts accepting again (outgoing.Pause), like a rollback.
func (s *Sentry) beforeTransferPause(end func()) func() {
	return func() {
		end()
		s.stopAccepting()
	}
}

// restartExec is an exec-mode restart: this process execve's binary. It
// returns only on failure, after rolling back.
func (s *Sentry) restartExec(binary string, timeout time.Duration, crash *CrashAt) error {
	// Check the new binary outside the blackout: after execve there is no
	// way back.
	info, err := ProbeABI(binary, timeout)
	if err != nil {
		return err
	}
	// The newest protocol both speak.
	version, err := info.speak()
	if err != nil {
		return fmt.Errorf("%s %w", binary, err)
	}
	// execve tears down this process's address space inside the
	// blackout, page-table entries of the memory file included: drop them
	// now, while guests still run (a page touched from here on faults
	// back in). Failing costs only time.
	if err := s.k.MemoryFile().DropPageTables(); err != nil {
		log.Warningf("exec restart: %v", err)
	}
	argv := append([]string{binary}, append(s.opts.Globals.Args(), "boot")...)
	if crash != nil {
		crash.settle = s.settleGuests
	}
	fault := crash.fault(os.Getpid, nil)
	return handover.OfferExec(s.newOutgoing(handover.ModeExec, 0, fault), handover.Options{
		Version:   s.opts.Version,
		Deadline:  time.Now().Add(timeout),
		PeerReads: info.Reads,
		Protocol:  version,
		Fault:     fault,
		Exec: func(env string, fds []int) error {
			// A stop asked for until now rolls the restart back (and
			// is applied then); one asked for later waits on s.mu
			// until execve has replaced this image, and reaches the
			// new one through the supervisor (signal). The
			// entrypoint's own exit does not roll back: as after a
			// transfer-mode handoff, the new image reaps it and
			// relaunches the entrypoint, whether it died before the
			// execve or is killed at it.
			s.mu.Lock()
			defer s.mu.Unlock()
			if p := s.pendingStop; p != nil && !p.entrypointExited {
				return fmt.Errorf("a stop was asked for (%s): %w", p.reason, unix.ECANCELED)
			}
			// Only the handed-over fds cross: a sweep since OfferExec
			// cleared their FD_CLOEXEC may have set it again.
			fdMu.Lock()
			defer fdMu.Unlock()
			markCloseOnExec()
			for _, fd := range fds {
				if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
					return err
				}
			}
			envv := append(os.Environ(), env)
			if s.supervised {
				// The new image stands by with the supervisor
				// while it boots (standbyAsync).
				envv = append(envv, envSupervisor+"="+sandbox.SupervisorPath(s.cfg.Root, s.cfg.ID))
			}
			if crash != nil {
				envv = append(envv, crash.env())
			}
			return unix.Exec(binary, argv, envv)
		},
	})
}

// ABIInfo is what "runsc-luo abi" prints: the protocols a build speaks
// and the handover formats it reads and writes.
type ABIInfo struct {
	Version string `json:"version"`
	// Protocol is the oldest handover protocol version the build speaks
	// (builds of protocol 3 exec only into a build that says 3 here),
	// NewestProtocol the newest (absent from builds that speak only 3).
	Protocol       int `json:"protocol"`
	NewestProtocol int `json:"newest_protocol,omitempty"`
	// GuestProtocol is the newest guest protocol version.
	GuestProtocol int `json:"guest_protocol"`
	// Formats are, per subsystem, the formats read and written, newest
	// first.
	Formats []kernel.Format `json:"formats"`
	// Reads are every format read, all subsystems together.
	Reads []string `json:"reads"`
}

// ThisABI returns this build's ABIInfo.
func ThisABI(version string) ABIInfo {
	return ABIInfo{Version: version, Protocol: handover.OldestProtocol, NewestProtocol: handover.ProtocolVersion, GuestProtocol: abiguest.Version, Formats: kernel.Formats(), Reads: kernel.Reads()}
}

// speak returns the newest handover protocol this build and the one info
// describes both speak.
func (info *ABIInfo) speak() (int, error) {
	return handover.Negotiate(info.Protocol, info.NewestProtocol)
}

// ProbeABI runs "binary abi" within timeout.
func ProbeABI(binary string, timeout time.Duration) (*ABIInfo, error) {
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
	var info ABIInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("checking %s: its \"abi\" output %q: %w", binary, out, err)
	}
	return &info, nil
}
