// Package supervisor is the per-sandbox process that outlives every
// sentry, like containerd-shim or conmon: it starts the first sentry, holds
// a copy of the memory file and the listening sockets each serving sentry
// registers, and, when the serving sentry dies without handing the sandbox
// over, hands the same memory file to a new sentry (handover.ModeRecover):
// the spare sentry it keeps started for that, or one it starts. That
// sentry ingests the file as after a planned restart and relaunches the
// entrypoint.
//
// Sentries register on the supervisor socket of the sandbox once they
// serve (cold boot, after a restart's commit, after a recovery) and keep
// the connection open: its end is how the supervisor learns that a sentry
// is gone. The supervisor is a child subreaper, so the processes a dead
// sentry leaves (its guests, a new sentry it was starting) become its
// children: before a recovery it kills every one of them.
package supervisor

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
)

// Register is a serving sentry's message on the supervisor socket. The
// memory file, the guest listener and the control listener come with it.
//
// A client that is no sentry sends one with Stop set (see AskStop), and no
// files.
type Register struct {
	PID int `json:"pid"`
	// Root is the byte address of the KHO root in the memory file.
	Root uint64 `json:"root"`
	// MemorySize is the memory file's size.
	MemorySize uint64 `json:"memory_size"`
	// LiveupdateNumber is the sentry's.
	LiveupdateNumber uint64 `json:"liveupdate_number"`
	// Version is the sentry's version string.
	Version string `json:"version"`
	// Standby says the sentry does not serve yet: it is the new sentry
	// of a transfer-mode restart, registering before the blackout so
	// that its commit costs one message (this one again, with Standby
	// false and the files), which needs no answer before it serves. No
	// files come with a standby registration.
	Standby bool `json:"standby,omitempty"`
	// Stop, from kill rather than a sentry, says a stop of the sandbox was
	// asked for while its sentry did not answer: kill signals the sentry
	// process itself once this is answered, and the sentry's end is no
	// crash.
	Stop *StopRequest `json:"stop,omitempty"`
}

// Options configures a supervisor.
type Options struct {
	Globals sandbox.Globals
	// Config is the sandbox's configuration as the first sentry boots it.
	Config sandbox.Config
	// Exe is the runsc-luo binary to start sentries with.
	Exe string
	// Ready is the pipe the first sentry reports its cold boot on.
	Ready *os.File
	// ExecTimeout is how long a sentry whose connection ended may take to
	// register again as the same process (an exec-mode restart's new
	// image).
	ExecTimeout time.Duration
}

// sentry is a registered sentry.
type sentry struct {
	reg   Register
	files []*os.File
}

// event is something the main loop acts on.
type event struct {
	registered *sentry
	// done is closed once the main loop has taken the registration; the
	// answer is sent then.
	done  chan struct{}
	reply *Registered
	ended int // pid whose connection ended
	// notice came from sentry from.
	notice *Notice
	from   int
}

// Registered is the supervisor's answer to a registration, once it holds
// the sentry as the sandbox's: only then may a sentry let the one before
// it exit (a transfer-mode restart sends Serving after it).
type Registered struct {
	PID int `json:"pid"`
	// Stop is a stop of the sandbox asked for before this sentry
	// registered (during the restart it came out of): the sentry
	// finishes the restart's handshake and stops the sandbox.
	Stop *StopRequest `json:"stop,omitempty"`
}

// StopRequest is a stop of the sandbox: its exit status and why.
type StopRequest struct {
	ExitStatus int    `json:"exit_status"`
	Reason     string `json:"reason"`
}

// Notice is what a registered sentry tells its supervisor afterwards, on
// the same connection; one field is set.
type Notice struct {
	// Frozen is the KHO root page as it is once the sentry paused for a
	// restart: until a new sentry registers (or Thawed), that page is the
	// sandbox's state even if the new sentry had rewritten it (its KHO
	// ingest reuses the page), and a recovery writes it back first.
	Frozen []byte `json:"frozen,omitempty"`
	// Thawed says the restart rolled back: the sentry serves and owns the
	// root page again.
	Thawed bool `json:"thawed,omitempty"`
	// Stop says a stop of the sandbox was asked for (kill): if the
	// sentry dies before it stops the sandbox, the supervisor finishes
	// the stop instead of recovering.
	Stop *StopRequest `json:"stop,omitempty"`
	// HandedOff is the pid of the new sentry this one committed a
	// restart to: its end is no crash, and the new sentry's registration
	// (already sent, on its own connection) is waited for.
	HandedOff int `json:"handed_off,omitempty"`
}

// Supervisor is one sandbox's supervisor.
type Supervisor struct {
	opts   Options
	events chan event

	mu sync.Mutex
	// current is the serving sentry.
	//
	// +checklocks:mu
	current *sentry

	// The fields below belong to the main loop.

	// frozen is the current sentry's root page as it froze for a restart
	// (Notice.Frozen), until a new sentry registers or the restart rolls
	// back.
	frozen []byte
	// stopping is a stop of the sandbox asked for (Notice.Stop).
	stopping *StopRequest
	// spare is the spare sentry, nil if none runs; servedAt is when a
	// sentry last registered, spareAfter the earliest time to start a
	// spare again after one failed or died.
	spare      *spare
	servedAt   time.Time
	spareAfter time.Time
	// spareChecked is when the spare was last seen alive.
	spareChecked time.Time
}

// spare is a spare sentry ("boot --spare-fd"): started ahead of any crash,
// prepared as a restart's new sentry is before its Ready, it waits on ch
// for a recovery, so that a recovery does not pay for starting a process.
type spare struct {
	pid int
	ch  *handover.Channel
}

// spareDelay is how long after a sentry registers the supervisor starts a
// spare if it has none: the spare's start (a process and a rehearsed boot,
// tens of milliseconds of CPU) stays out of the aftermath of the restart
// or recovery, when the relaunched entrypoint reads its memory.
const spareDelay = time.Second

// spareRetry is how long the supervisor waits to start a spare again after
// one could not start or died.
const spareRetry = 10 * time.Second

// Run starts the sandbox's first sentry and supervises it and its
// successors until the sandbox stops. It returns an error only if the
// sandbox could not start.
func Run(opts Options) error {
	// One processor. The supervisor is an event loop, and its wake-ups
	// come inside restarts' blackouts (the frozen root, the new sentry's
	// standby and registration): with more processors each message woke
	// a second thread, on the CPU the sentries were about to need, to
	// hand it from the connection's reader to the main loop. Idle 1 GiB
	// restarts (2 MiB folios), 2 rounds of 50 per build, alternated:
	// blackout p50 1.06 -> 0.90 ms, p90 2.21 -> 1.61 ms, p99 6.21 ->
	// 2.32 ms.
	runtime.GOMAXPROCS(1)
	if opts.ExecTimeout == 0 {
		opts.ExecTimeout = 30 * time.Second
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("becoming a child subreaper: %w", err)
	}
	c := &opts.Config
	path := sandbox.SupervisorPath(c.Root, c.ID)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listening on %s: %w", path, err)
	}
	defer os.Remove(path)
	defer l.Close()
	s := &Supervisor{opts: opts, events: make(chan event, 16)}
	go s.accept(l)
	go reapChildren()
	go s.watch()
	args := append(opts.Globals.Args(), "boot", "--id="+c.ID, fmt.Sprintf("--memory=%d", c.MemorySize), "--ready-fd=3", fmt.Sprintf("--shim=%t", !c.NoShim), "--")
	cmd := exec.Command(opts.Exe, append(args, c.Entrypoint...)...)
	cmd.ExtraFiles = []*os.File{opts.Ready}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the sentry: %w", err)
	}
	opts.Ready.Close()
	// reapChildren reaps the sentries: release the handle (a pidfd)
	// os/exec keeps until Wait.
	pid := cmd.Process.Pid
	cmd.Process.Release()
	s.loop(pid)
	return nil
}

// Dial connects to the supervisor socket at path.
func Dial(path string) (*handover.Channel, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	f, err := conn.File()
	conn.Close()
	if err != nil {
		return nil, err
	}
	return handover.NewChannel(f)
}

// StopsSandbox reports whether sig, sent by kill, stops the sandbox
// (SIGTERM, SIGINT, SIGKILL) rather than only reaching its guests.
func StopsSandbox(sig unix.Signal) bool {
	return sig == unix.SIGTERM || sig == unix.SIGINT || sig == unix.SIGKILL
}

// AskStop tells the supervisor of sandbox id that a stop was asked for
// (req): once it returns nil, the end of the serving sentry, or of the one
// a restart in progress hands the sandbox to, stops the sandbox rather than
// recovering it. kill calls it before it signals a sentry that does not
// answer its control call (an exec-mode restart replacing its image, say),
// since a signal that ends the process there would otherwise look like a
// crash. An error if the sandbox has no supervisor or it did not answer
// within timeout.
func AskStop(root, id string, req StopRequest, timeout time.Duration) error {
	ch, err := Dial(sandbox.SupervisorPath(root, id))
	if err != nil {
		return err
	}
	defer ch.Close()
	ch.SetDeadline(time.Now().Add(timeout))
	if err := ch.Send(&Register{PID: os.Getpid(), Stop: &req}); err != nil {
		return fmt.Errorf("asking the supervisor to stop sandbox %q: %w", id, err)
	}
	var ok Registered
	files, err := ch.Recv(&ok)
	closeFiles(files)
	if err == nil && ok.PID <= 1 {
		err = fmt.Errorf("a bad answer (pid %d)", ok.PID)
	}
	if err != nil {
		return fmt.Errorf("asking the supervisor to stop sandbox %q: %w", id, err)
	}
	return nil
}

// accept takes the registrations of sentries.
func (s *Supervisor) accept(l *net.UnixListener) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return
		}
		go s.serve(c)
	}
}

// serve reads one sentry's registration, then waits for its connection to
// end.
func (s *Supervisor) serve(c *net.UnixConn) {
	f, err := c.File()
	c.Close()
	if err != nil {
		return
	}
	ch, err := handover.NewChannel(f)
	if err != nil {
		return
	}
	defer ch.Close()
	var reg Register
	files, err := ch.Recv(&reg)
	if err == nil && reg.Stop != nil {
		closeFiles(files)
		// Queued before the answer, so before the signal that kill
		// sends once answered, and before any end of the sentry it
		// causes.
		s.events <- event{notice: &Notice{Stop: reg.Stop}, from: reg.PID}
		log.Infof("supervisor: a stop was asked for by pid %d: %s", reg.PID, reg.Stop.Reason)
		ch.Send(&Registered{PID: os.Getpid()})
		return
	}
	if err == nil && reg.Standby {
		// A restart's new sentry, before its blackout: answered at
		// once; its registration proper follows when it commits, or
		// the connection ends without one.
		pid := reg.PID
		if len(files) != 0 || pid <= 1 {
			closeFiles(files)
			log.Warningf("supervisor: a bad standby registration (pid %d, %d files)", pid, len(files))
			return
		}
		if err := ch.Send(&Registered{PID: os.Getpid()}); err != nil {
			return
		}
		log.Infof("supervisor: sentry %d stands by", pid)
		s.serveStandby(ch, pid)
		return
	}
	s.serveRegistered(ch, reg, files, err)
}

// serveStandby reads the registration of sentry pid, which stands by on ch
// (a restart's new sentry, or a spare sentry that was given a recovery),
// then serves it as a registered sentry; if the connection ends without
// one, the sentry never committed.
func (s *Supervisor) serveStandby(ch *handover.Channel, pid int) {
	var reg Register
	files, err := ch.Recv(&reg)
	if err != nil {
		s.events <- event{ended: pid}
		return
	}
	if reg.PID != pid || reg.Standby {
		closeFiles(files)
		log.Warningf("supervisor: standby sentry %d registered as pid %d (standby %t)", pid, reg.PID, reg.Standby)
		s.events <- event{ended: pid}
		return
	}
	s.serveRegistered(ch, reg, files, nil)
}

// serveRegistered takes a sentry's registration (reg, its files, or the
// error receiving it), answers it once the main loop has taken it, then
// reads its notices until its connection ends.
func (s *Supervisor) serveRegistered(ch *handover.Channel, reg Register, files []*os.File, err error) {
	if err != nil || len(files) != 3 || reg.PID <= 1 || reg.Root == 0 {
		for _, f := range files {
			f.Close()
		}
		log.Warningf("supervisor: a bad registration (pid %d, %d files): %v", reg.PID, len(files), err)
		return
	}
	e := event{registered: &sentry{reg: reg, files: files}, done: make(chan struct{}), reply: &Registered{PID: os.Getpid()}}
	s.events <- e
	<-e.done
	if e.reply.PID == 0 {
		// Refused: the connection ends unanswered.
		return
	}
	if err := ch.Send(e.reply); err != nil {
		log.Warningf("supervisor: answering sentry %d: %v", reg.PID, err)
	}
	// Notices, until the connection ends.
	for {
		var n Notice
		files, err := ch.Recv(&n)
		closeFiles(files)
		if err != nil {
			break
		}
		s.events <- event{notice: &n, from: reg.PID}
	}
	s.events <- event{ended: reg.PID}
}

// loop supervises the sandbox until it stops; pid is the first sentry.
func (s *Supervisor) loop(pid int) {
	c := &s.opts.Config
	var endedAt time.Time
	waiting := false
	// handedTo is the new sentry the serving one committed a restart
	// to (Notice.HandedOff), until it registers or is gone.
	handedTo := 0
	// ended are the sentries whose connection ended while they did not
	// serve (a restart's new sentry that stood by): the HandedOff
	// notice naming one may come after its end (the new sentry won the
	// decision word and died before it registered, and the old one
	// learned of it only then).
	ended := map[int]bool{}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case e := <-s.events:
			if e.registered != nil {
				s.take(e)
				pid, waiting, handedTo = e.registered.reg.PID, false, 0
				delete(ended, pid)
				log.Infof("supervisor: sentry %d serves sandbox %s", pid, c.ID)
				continue
			}
			if e.notice != nil {
				if n := e.notice.HandedOff; n > 1 && e.from == pid {
					handedTo = n
					if ended[n] {
						// Gone before it registered (below).
						handedTo = 0
					}
				}
				s.noticed(e.notice, e.from == pid)
				continue
			}
			switch {
			case e.ended == handedTo && handedTo != 0:
				// Gone before it registered: it never committed
				// (its registration comes before it changes
				// anything), so the old sentry's state stands.
				handedTo = 0
				if !waiting {
					continue
				}
			case e.ended != pid:
				// A sentry that handed over, or a new sentry gone
				// before the notice of the handoff to it.
				if len(ended) > 64 {
					clear(ended)
				}
				ended[e.ended] = true
				continue
			default:
				waiting, endedAt = true, time.Now()
			}
		case <-tick.C:
		}
		if waiting && handedTo != 0 && time.Since(endedAt) < newSentryWait {
			// The sentry handed the sandbox over and exited; its
			// successor's registration is on the way.
			continue
		}
		if !waiting {
			if s.currentPID() == 0 && !sandbox.Alive(pid) {
				// The first sentry died before it registered.
				if s.stopping != nil {
					// kill asked for a stop (AskStop).
					s.finishStop(pid)
					return
				}
				if st, err := sandbox.ReadState(c.Root, c.ID); err != nil || st.Status != sandbox.StatusRunning || st.Gone {
					return
				}
			}
			s.tendSpare()
			continue
		}
		st, err := sandbox.ReadState(c.Root, c.ID)
		if err == nil && st.Status == sandbox.StatusStopped && !st.Gone {
			// The sandbox stopped; the sentry exits (and is not waited
			// for: this process exits too).
			killChildren(pid)
			return
		}
		if sandbox.Alive(pid) && !exiting(pid) && time.Since(endedAt) < s.opts.ExecTimeout {
			// An exec-mode restart's new image registers again.
			continue
		}
		if sandbox.Alive(pid) {
			unix.Kill(pid, unix.SIGKILL)
		}
		if s.stopping != nil {
			// kill was asked for: the sandbox stops, it is not
			// recovered.
			s.finishStop(pid)
			return
		}
		if next := s.awaitNewSentry(pid); next != 0 {
			// The new sentry of a restart the dead one had committed
			// serves.
			pid, waiting = next, false
			continue
		}
		next := s.recover(pid, endedAt)
		if next == 0 {
			return
		}
		// From now on the dead sentry's end, reported twice (by watch
		// and by its connection), is not the sandbox's.
		pid, waiting = next, false
	}
}

// take makes a registered sentry the sandbox's and answers it.
func (s *Supervisor) take(e event) {
	s.mu.Lock()
	old := s.current
	s.current = e.registered
	s.mu.Unlock()
	if old != nil {
		closeFiles(old.files)
	}
	// The new sentry owns the root page now.
	s.frozen = nil
	s.servedAt = time.Now()
	e.reply.Stop = s.stopping
	close(e.done)
}

// noticed records a notice of a sentry; current says it came from the
// sandbox's current sentry.
func (s *Supervisor) noticed(n *Notice, current bool) {
	switch {
	case n.Stop != nil:
		s.stopping = n.Stop
	case !current:
	case n.Frozen != nil:
		s.frozen = n.Frozen
	case n.Thawed:
		s.frozen = nil
	}
}

// newSentryWait bounds how long a supervisor waits for the new sentry of a
// transfer-mode restart whose old sentry died: the new one either committed
// (won the decision word, or, in protocol 3, got the Commit) and registers,
// or exits untouched (it lost the word, or its channel ended first).
const newSentryWait = 10 * time.Second

// awaitNewSentry is called when the serving sentry dead died. If it was in
// a transfer-mode restart whose new sentry still runs (one of this
// process's children by now), that sentry either committed and
// registers (its pid is returned), or exits untouched; the dead sentry's
// guests are killed meanwhile (nobody serves them). 0 if no new sentry
// registered.
//
// isNewSentry of a zombie is false: an exited new sentry is not waited
// for.
func (s *Supervisor) awaitNewSentry(dead int) int {
	me := os.Getpid()
	deadline := time.Now().Add(newSentryWait)
	for time.Now().Before(deadline) {
		// (The dead sentry's children are its own until it has exited.)
		var pending []int
		for _, c := range children(me, dead) {
			pid := c.pid
			switch {
			case pid == dead || pid == s.sparePID():
			case isNewSentry(pid):
				pending = append(pending, pid)
			default:
				// With its process group: a guest's children go
				// with it.
				unix.Kill(-pid, unix.SIGKILL)
				unix.Kill(pid, unix.SIGKILL)
			}
		}
		if len(pending) == 0 {
			return 0
		}
		select {
		case e := <-s.events:
			switch {
			case e.registered != nil:
				s.take(e)
				log.Warningf("supervisor: sentry %d died after committing its restart; sentry %d serves sandbox %s", dead, e.registered.reg.PID, s.opts.Config.ID)
				return e.registered.reg.PID
			case e.notice != nil:
				s.noticed(e.notice, false)
			}
		case <-time.After(time.Millisecond):
		}
	}
	return 0
}

// isNewSentry reports whether pid is the new sentry of a transfer-mode
// restart ("boot --handover-fd=N").
func isNewSentry(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(b, []byte("\x00boot\x00")) && bytes.Contains(b, []byte("\x00--handover-fd="))
}

// finishStop stops the sandbox whose sentry dead died after a stop was
// asked for: what it left is killed, its sockets removed, and the state
// says stopped (unless the sentry wrote that itself).
func (s *Supervisor) finishStop(dead int) {
	c := &s.opts.Config
	killChildren(dead)
	os.Remove(sandbox.GuestPath(c.Root, c.ID))
	os.Remove(sandbox.ControlPath(c.Root, c.ID))
	st, err := sandbox.ReadState(c.Root, c.ID)
	if err == nil && st.Status == sandbox.StatusStopped && !st.Gone {
		return
	}
	if err != nil {
		st = &sandbox.State{ID: c.ID, Root: c.Root, Created: c.Created, Recoveries: c.Recoveries}
	}
	st.Status, st.Gone, st.Guests, st.EntrypointPID = sandbox.StatusStopped, false, nil, 0
	status := s.stopping.ExitStatus
	st.ExitStatus = &status
	st.Error = fmt.Sprintf("%s (the sentry, pid %d, died while stopping; the supervisor finished the stop)", s.stopping.Reason, dead)
	if err := sandbox.WriteState(st); err != nil {
		log.Warningf("supervisor: %v", err)
	}
	log.Infof("supervisor: sandbox %s stopped: %s", c.ID, st.Error)
}

func (s *Supervisor) currentPID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current == nil {
		return 0
	}
	return s.current.reg.PID
}

// recover starts a new sentry on the memory file after sentry dead died
// (noticed at at) and returns its pid once it has registered; 0 if the
// sandbox is lost.
func (s *Supervisor) recover(dead int, at time.Time) int {
	pausedAt := handover.Monotonic() - int64(time.Since(at))
	c := &s.opts.Config
	s.mu.Lock()
	cur := s.current
	s.mu.Unlock()
	if cur == nil {
		s.lost(fmt.Errorf("the sentry (pid %d) died before it served", dead))
		return 0
	}
	// Whatever the dead sentry left (guests, a new sentry it was
	// starting) must not run alongside the recovered one.
	left := killLeft(dead, s.sparePID())
	killed := time.Since(at)
	if s.frozen != nil {
		// It died in a restart that no new sentry committed: the
		// root page is as it froze, whatever a new sentry's ingest
		// wrote there since.
		if _, err := cur.files[0].WriteAt(s.frozen, int64(cur.reg.Root)); err != nil {
			s.lost(fmt.Errorf("restoring the KHO root page: %w", err))
			return 0
		}
		s.frozen = nil
	}
	c.Recoveries++
	cfg, err := json.Marshal(c)
	if err != nil {
		s.lost(err)
		return 0
	}
	d := &handover.Descriptor{
		Protocol: handover.ProtocolVersion, Mode: handover.ModeRecover, Version: cur.reg.Version, PID: dead,
		Root: cur.reg.Root, LiveupdateNumber: cur.reg.LiveupdateNumber, MemorySize: cur.reg.MemorySize,
		Files:     handover.Files{MemoryFile: 3, GuestListener: 4, ControlListener: 5},
		OldGuests: left,
		Sandbox:   cfg,
		Timing:    handover.Timing{Mode: handover.ModeRecover, OldPID: dead, OldVersion: cur.reg.Version, PausedAt: pausedAt},
	}
	// Until it serves, the state names the recovering sentry (else it
	// would name a dead one, and read as stopped); written before the
	// spare can serve and write its own.
	if pid := s.sparePID(); pid != 0 {
		// The root page as it is: a recovering sentry rewrites it
		// (KHO reuses it as its outgoing root) but changes nothing else
		// before it registers, so a spare that fails before then is
		// replaced by a started sentry on this page again.
		root := make([]byte, os.Getpagesize())
		_, rerr := cur.files[0].ReadAt(root, int64(cur.reg.Root))
		s.recovering(dead, pid)
		if s.useSpare(d, cur.files) {
			log.Warningf("supervisor: sentry %d died; recovering sandbox %s with spare sentry %d (what it left killed in %v, the recovery sent %v after the death was noticed)", dead, c.ID, pid, killed, time.Since(at))
			next, err := s.awaitRecovering(dead, pid)
			if err == nil {
				return next
			}
			if rerr == nil {
				_, rerr = cur.files[0].WriteAt(root, int64(cur.reg.Root))
			}
			if rerr != nil {
				s.lost(fmt.Errorf("%v, and the KHO root page could not be restored for another: %v", err, rerr))
				return 0
			}
			log.Warningf("supervisor: %v; starting a sentry", err)
		}
	}
	pid := s.startRecovering(d, cur.files)
	if pid == 0 {
		return 0
	}
	log.Warningf("supervisor: sentry %d died; recovering sandbox %s with sentry %d (what it left killed in %v, sentry started %v after the death was noticed)", dead, c.ID, pid, killed, time.Since(at))
	s.recovering(dead, pid)
	next, err := s.awaitRecovering(dead, pid)
	if err != nil {
		s.lost(err)
	}
	return next
}

// recovering writes the state of a sandbox that sentry pid recovers after
// sentry dead died.
func (s *Supervisor) recovering(dead, pid int) {
	c := &s.opts.Config
	st, err := sandbox.ReadState(c.Root, c.ID)
	if err != nil {
		return
	}
	st.Status, st.PID, st.Guests, st.EntrypointPID = sandbox.StatusRunning, pid, nil, 0
	st.Error = fmt.Sprintf("recovering: sentry %d died", dead)
	if err := sandbox.WriteState(st); err != nil {
		log.Warningf("supervisor: %v", err)
	}
}

// useSpare hands the recovery d, with the memory file and the listening
// sockets, to the spare sentry; false if it could not take it (it is
// killed then). Either way the spare is used up.
func (s *Supervisor) useSpare(d *handover.Descriptor, files []*os.File) bool {
	sp := s.spare
	s.spare = nil
	if !sandbox.Alive(sp.pid) || exiting(sp.pid) {
		sp.ch.Close()
		log.Warningf("supervisor: the spare sentry %d is gone; starting a sentry", sp.pid)
		return false
	}
	spared := *d
	spared.Files = handover.Files{MemoryFile: 0, GuestListener: 1, ControlListener: 2}
	spared.Timing.SentAt = handover.Monotonic()
	if err := sp.ch.Send(&spared, files...); err != nil {
		sp.ch.Close()
		log.Warningf("supervisor: the spare sentry %d did not take the recovery (%v); starting a sentry", sp.pid, err)
		unix.Kill(sp.pid, unix.SIGKILL)
		return false
	}
	// It registers on the same channel, as a standby sentry would.
	go func() {
		defer sp.ch.Close()
		s.serveStandby(sp.ch, sp.pid)
	}()
	return true
}

// startRecovering starts a sentry with the recovery d in its environment
// and the memory file and the listening sockets as fds 3 to 5, and returns
// its pid; 0 if the sandbox is lost.
func (s *Supervisor) startRecovering(d *handover.Descriptor, files []*os.File) int {
	d.Timing.SentAt = handover.Monotonic()
	env, err := handover.EncodeEnv(d)
	if err != nil {
		s.lost(err)
		return 0
	}
	pid, err := s.spawn(append(os.Environ(), env), files)
	if err != nil {
		s.lost(fmt.Errorf("starting a sentry to recover the sandbox: %w", err))
		return 0
	}
	return pid
}

// spawn starts "runsc-luo boot ARGS" in its own session, with env, files as
// fds 3 on, and its output appended to the sandbox's sentry log, and
// returns its pid. reapChildren reaps it.
func (s *Supervisor) spawn(env []string, files []*os.File, args ...string) (int, error) {
	c := &s.opts.Config
	logf, _ := os.OpenFile(sandbox.SentryLogPath(c.Root, c.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	cmd := exec.Command(s.opts.Exe, append(append(s.opts.Globals.Args(), "boot"), args...)...)
	cmd.Env = env
	cmd.ExtraFiles = files
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err := cmd.Start()
	if logf != nil {
		logf.Close()
	}
	if err != nil {
		return 0, err
	}
	// Release the handle (a pidfd) os/exec keeps until Wait, or each
	// sentry started would leak one.
	pid := cmd.Process.Pid
	cmd.Process.Release()
	return pid, nil
}

// sparePID is the spare sentry's pid, 0 if none runs.
func (s *Supervisor) sparePID() int {
	if s.spare == nil {
		return 0
	}
	return s.spare.pid
}

// tendSpare starts a spare sentry when a sentry has served for spareDelay
// without one, and forgets one that died.
func (s *Supervisor) tendSpare() {
	now := time.Now()
	if sp := s.spare; sp != nil {
		if now.Sub(s.spareChecked) < spareDelay {
			return
		}
		s.spareChecked = now
		if !sandbox.Alive(sp.pid) {
			log.Warningf("supervisor: the spare sentry %d died; another is started in %v", sp.pid, spareRetry)
			sp.ch.Close()
			s.spare, s.spareAfter = nil, now.Add(spareRetry)
		}
		return
	}
	if s.currentPID() == 0 || s.stopping != nil || s.frozen != nil || now.Sub(s.servedAt) < spareDelay || now.Before(s.spareAfter) {
		// (Not while the sentry is paused for a restart: the spare's
		// start would take CPU from the blackout.)
		return
	}
	ch, peer, err := handover.Pair()
	if err != nil {
		log.Warningf("supervisor: a spare sentry's channel: %v", err)
		s.spareAfter = now.Add(spareRetry)
		return
	}
	pid, err := s.spawn(os.Environ(), []*os.File{peer}, "--spare-fd=3")
	peer.Close()
	if err != nil {
		ch.Close()
		log.Warningf("supervisor: starting a spare sentry: %v", err)
		s.spareAfter = now.Add(spareRetry)
		return
	}
	s.spare, s.spareChecked = &spare{pid: pid, ch: ch}, now
	log.Debugf("supervisor: spare sentry %d started", pid)
}

// awaitRecovering waits for the recovering sentry pid to register, and
// returns pid once it has; an error if it died first or did not serve in
// time (it is killed then).
func (s *Supervisor) awaitRecovering(dead, pid int) (int, error) {
	deadline := time.Now().Add(s.opts.ExecTimeout)
	for time.Now().Before(deadline) {
		select {
		case e := <-s.events:
			switch {
			case e.notice != nil:
				// A stop asked for meanwhile is passed on to
				// the recovering sentry when it registers.
				s.noticed(e.notice, false)
			case e.registered == nil:
			case e.registered.reg.PID != pid:
				// A sentry killed above (the new sentry of the
				// dead one's restart) whose registration was on
				// its way: not the sandbox's.
				closeFiles(e.registered.files)
				e.reply.PID = 0
				close(e.done)
				log.Warningf("supervisor: ignoring the registration of sentry %d, killed with what sentry %d left", e.registered.reg.PID, dead)
			default:
				// Hand it back to the main loop, which takes it.
				go func() { s.events <- e }()
				return pid, nil
			}
		case <-time.After(10 * time.Millisecond):
		}
		if !sandbox.Alive(pid) {
			return 0, fmt.Errorf("the recovering sentry (pid %d) exited; see sentry.log", pid)
		}
	}
	unix.Kill(pid, unix.SIGKILL)
	return 0, fmt.Errorf("the recovering sentry (pid %d) did not serve within %v", pid, s.opts.ExecTimeout)
}

// lost records that no sentry serves the sandbox any more.
func (s *Supervisor) lost(err error) {
	c := &s.opts.Config
	killChildren(0)
	os.Remove(sandbox.GuestPath(c.Root, c.ID))
	os.Remove(sandbox.ControlPath(c.Root, c.ID))
	st := &sandbox.State{ID: c.ID, Status: sandbox.StatusStopped, Root: c.Root, Created: c.Created,
		Error: "sandbox lost: " + err.Error(), Recoveries: c.Recoveries}
	if werr := sandbox.WriteState(st); werr != nil {
		log.Warningf("supervisor: %v", werr)
	}
	log.Warningf("supervisor: sandbox %s lost: %v", c.ID, err)
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// reapChildren reaps every child of this process (sentries, and the
// orphans it adopts as a subreaper).
func reapChildren() {
	for {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(-1, &ws, 0, nil); errors.Is(err, unix.ECHILD) {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// killChildren SIGKILLs every child of this process until none is left
// (orphans keep arriving as their parents die), for 2 s at most. dead, if
// not 0, is a sentry that was SIGKILLed and is still exiting (tearing down
// its address space, which takes about 35 ms per GiB it touched): it runs
// no code any more and is not waited for; its children (guests, a new
// sentry) are killed, with their process groups, and waited for until
// they are zombies (they are reaped once dead is gone and they are this
// process's).
func killChildren(dead int) {
	me := os.Getpid()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		left := 0
		parents := []int{me}
		if dead > 0 {
			parents = append(parents, dead)
		}
		for _, c := range children(parents...) {
			switch {
			case c.pid == dead:
			case c.ppid == me:
				unix.Kill(c.pid, unix.SIGKILL)
				left++
			case c.alive:
				unix.Kill(-c.pid, unix.SIGKILL)
				unix.Kill(c.pid, unix.SIGKILL)
				left++
			}
		}
		if left == 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// exiting reports whether process pid has begun to exit: every thread of
// it has PF_EXITING in its flags (/proc/PID/task/TID/stat). A SIGKILLed
// process runs no code from then on, but its fds (the supervisor
// connection) close only after its address space is torn down. (While a
// thread execve's, the others exit, the thread-group leader among them,
// but the exec'ing thread does not: an exec-mode restart is never taken
// for a death.)
func exiting(pid int) bool {
	// The leader first: one read in the common case.
	if !taskExiting(fmt.Sprintf("/proc/%d/stat", pid)) {
		return false
	}
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(dir, e.Name())); err == nil && !taskExiting(filepath.Join(dir, e.Name(), "stat")) {
			return false
		}
	}
	return true
}

// taskExiting reports whether the task whose stat file is path has
// PF_EXITING in its flags; false if it is gone.
func taskExiting(path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && statExiting(b)
}

// statExiting reports whether a task's stat line has PF_EXITING in its
// flags (field 9).
func statExiting(b []byte) bool {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return false
	}
	// Fields 3 to 9 follow the command name, each after one space.
	b = b[i+1:]
	for field := 2; field < 9; field++ {
		j := bytes.IndexByte(b, ' ')
		if j < 0 {
			return false
		}
		b = b[j+1:]
	}
	var flags uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			break
		}
		flags = flags*10 + uint64(c-'0')
	}
	const pfExiting = 0x4
	return flags&pfExiting != 0
}

// watchInterval is how often watch reads the serving sentry's flags.
const watchInterval = 3 * time.Millisecond

// watch notices the death of the serving sentry as soon as it begins to
// exit, rather than when its connection ends after its teardown: it reads
// the sentry's flags every watchInterval (one pread of its stat file,
// kept open) and reports a pid seen exiting twice in a row.
func (s *Supervisor) watch() {
	fd, fdPID := -1, 0
	var buf [1024]byte
	seen, reported := 0, 0
	for {
		time.Sleep(watchInterval)
		pid := s.currentPID()
		if pid == 0 || pid == reported {
			seen = 0
			continue
		}
		if pid != fdPID {
			if fd >= 0 {
				unix.Close(fd)
			}
			fd, _ = unix.Open(fmt.Sprintf("/proc/%d/stat", pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			fdPID = pid
		}
		n, err := unix.Pread(fd, buf[:], 0)
		// The leader's flags first (one read in the common case),
		// then every thread's.
		if err != nil || n <= 0 || !statExiting(buf[:n]) || !exiting(pid) {
			seen = 0
			continue
		}
		if seen != pid {
			seen = pid
			continue
		}
		reported = pid
		s.events <- event{ended: pid}
	}
}

// killLeft SIGKILLs what the dead sentry left, before a recovery: every
// child of this process but dead and keep (the spare sentry), and every
// descendant of dead and of those, each with its process group. It returns
// once each of them, and dead, runs no code any more (it is exiting, or a
// zombie), or after 2 s: the kernel may still be tearing down their
// address spaces, tens of milliseconds per GiB mapped, but nothing of
// theirs can reach the recovering sentry. The pids returned are those not
// yet reaped: the recovering sentry relaunches the entrypoint only once
// they are zombies or gone. (A process reparented from a dying guest to
// this subreaper is seen in the same pass as its child of this process,
// before as its descendant.)
func killLeft(dead, keep int) []int {
	me := os.Getpid()
	deadline := time.Now().Add(2 * time.Second)
	idled := make(map[int]bool)
	for {
		procs := processes()
		kids := make(map[int][]int)
		byPID := make(map[int]sandbox.Proc, len(procs))
		for _, p := range procs {
			kids[p.PPID] = append(kids[p.PPID], p.PID)
			byPID[p.PID] = p
		}
		var left []int
		running := 0
		var visit func(pid int)
		visit = func(pid int) {
			if pid == keep || pid == me {
				return
			}
			if !idled[pid] {
				sandbox.Idle(pid)
				idled[pid] = true
			}
			if pid != dead {
				p := byPID[pid]
				if p.Alive() {
					unix.Kill(-pid, unix.SIGKILL)
					unix.Kill(pid, unix.SIGKILL)
				}
				left = append(left, pid)
			}
			if p := byPID[pid]; p.Alive() && !exiting(pid) {
				running++
			}
			for _, c := range kids[pid] {
				visit(c)
			}
		}
		for _, pid := range kids[me] {
			visit(pid)
		}
		if p, ok := byPID[dead]; ok && p.PPID != me {
			// (Not this process's child: its own sentry, when the
			// supervisor is not its parent.)
			visit(dead)
		}
		if running == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(time.Millisecond)
	}
}

// processes reads every process's stat, in one pass over /proc.
func processes() []sandbox.Proc {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	out := make([]sandbox.Proc, 0, len(ents))
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, ok := sandbox.ReadProc(pid); ok {
			out = append(out, p)
		}
	}
	return out
}

// child is a process and its parent, as one read of /proc saw them.
type child struct {
	pid, ppid int
	alive     bool
}

// children returns the children of the parents, zombies included (a
// killed child counts until it is reaped), in one pass over /proc: a
// process reparented from one parent to another while it runs (the orphan
// of a dying sentry, adopted by this subreaper) is seen once, never
// missed between two passes.
func children(parents ...int) []child {
	var out []child
	for _, p := range processes() {
		for _, parent := range parents {
			if p.PPID == parent {
				out = append(out, child{pid: p.PID, ppid: p.PPID, alive: p.Alive()})
				break
			}
		}
	}
	return out
}
