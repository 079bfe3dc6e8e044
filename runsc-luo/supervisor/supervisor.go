// Package supervisor is the per-sandbox process that outlives every
// sentry, like containerd-shim or conmon: it starts the first sentry, holds
// a copy of the memory file and the listening sockets each serving sentry
// registers, and, when the serving sentry dies without handing the sandbox
// over, starts a new sentry on the same memory file (handover.ModeRecover),
// which ingests it as after a planned restart and relaunches the
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
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
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
	// done is closed once the main loop has taken the registration.
	done  chan struct{}
	ended int // pid whose connection ended
}

// Registered is the supervisor's answer to a registration, once it holds
// the sentry as the sandbox's: only then may a sentry let the one before
// it exit (a transfer-mode restart sends Serving after it).
type Registered struct {
	PID int `json:"pid"`
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
}

// Run starts the sandbox's first sentry and supervises it and its
// successors until the sandbox stops. It returns an error only if the
// sandbox could not start.
func Run(opts Options) error {
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
	args := append(opts.Globals.Args(), "boot", "--id="+c.ID, fmt.Sprintf("--memory=%d", c.MemorySize), "--ready-fd=3", fmt.Sprintf("--shim=%t", !c.NoShim), "--")
	cmd := exec.Command(opts.Exe, append(args, c.Entrypoint...)...)
	cmd.ExtraFiles = []*os.File{opts.Ready}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the sentry: %w", err)
	}
	opts.Ready.Close()
	s.loop(cmd.Process.Pid)
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
	if err != nil || len(files) != 3 || reg.PID <= 1 || reg.Root == 0 {
		for _, f := range files {
			f.Close()
		}
		log.Warningf("supervisor: a bad registration (pid %d, %d files): %v", reg.PID, len(files), err)
		return
	}
	done := make(chan struct{})
	s.events <- event{registered: &sentry{reg: reg, files: files}, done: done}
	<-done
	if err := ch.Send(&Registered{PID: os.Getpid()}); err != nil {
		log.Warningf("supervisor: answering sentry %d: %v", reg.PID, err)
	}
	var none struct{}
	ch.Recv(&none) // Until the connection ends.
	s.events <- event{ended: reg.PID}
}

// loop supervises the sandbox until it stops; pid is the first sentry.
func (s *Supervisor) loop(pid int) {
	c := &s.opts.Config
	var endedAt time.Time
	waiting := false
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case e := <-s.events:
			if e.registered != nil {
				s.mu.Lock()
				old := s.current
				s.current = e.registered
				s.mu.Unlock()
				if old != nil {
					closeFiles(old.files)
				}
				close(e.done)
				pid, waiting = e.registered.reg.PID, false
				log.Infof("supervisor: sentry %d serves sandbox %s", pid, c.ID)
				continue
			}
			if e.ended != pid {
				// A sentry that handed over.
				continue
			}
			waiting, endedAt = true, time.Now()
		case <-tick.C:
		}
		if !waiting {
			if !sandbox.Alive(pid) && s.currentPID() == 0 {
				// The first sentry died before it registered.
				if st, err := sandbox.ReadState(c.Root, c.ID); err != nil || st.Status != sandbox.StatusRunning || st.Gone {
					return
				}
			}
			continue
		}
		st, err := sandbox.ReadState(c.Root, c.ID)
		if err == nil && st.Status == sandbox.StatusStopped && !st.Gone {
			// The sandbox stopped; the sentry exits.
			killChildren()
			return
		}
		if sandbox.Alive(pid) && time.Since(endedAt) < s.opts.ExecTimeout {
			// An exec-mode restart's new image registers again.
			continue
		}
		if sandbox.Alive(pid) {
			unix.Kill(pid, unix.SIGKILL)
		}
		if !s.recover(pid, endedAt) {
			return
		}
		waiting = false
	}
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
// (noticed at at); false if the sandbox is lost.
func (s *Supervisor) recover(dead int, at time.Time) bool {
	pausedAt := handover.Monotonic() - int64(time.Since(at))
	c := &s.opts.Config
	s.mu.Lock()
	cur := s.current
	s.mu.Unlock()
	if cur == nil {
		s.lost(fmt.Errorf("the sentry (pid %d) died before it served", dead))
		return false
	}
	// Whatever the dead sentry left (guests, a new sentry it was
	// starting) must not run alongside the recovered one.
	killChildren()
	c.Recoveries++
	cfg, err := json.Marshal(c)
	if err != nil {
		s.lost(err)
		return false
	}
	d := &handover.Descriptor{
		Protocol: handover.ProtocolVersion, Mode: handover.ModeRecover, Version: cur.reg.Version, PID: dead,
		Root: cur.reg.Root, LiveupdateNumber: cur.reg.LiveupdateNumber, MemorySize: cur.reg.MemorySize,
		Files:   handover.Files{MemoryFile: 3, GuestListener: 4, ControlListener: 5},
		Sandbox: cfg,
		Timing:  handover.Timing{Mode: handover.ModeRecover, OldPID: dead, OldVersion: cur.reg.Version, PausedAt: pausedAt},
	}
	d.Timing.SentAt = handover.Monotonic()
	env, err := handover.EncodeEnv(d)
	if err != nil {
		s.lost(err)
		return false
	}
	logf, _ := os.OpenFile(sandbox.SentryLogPath(c.Root, c.ID), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	cmd := exec.Command(s.opts.Exe, append(s.opts.Globals.Args(), "boot")...)
	cmd.Env = append(os.Environ(), env)
	cmd.ExtraFiles = cur.files
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	if logf != nil {
		logf.Close()
	}
	if err != nil {
		s.lost(fmt.Errorf("starting a sentry to recover the sandbox: %w", err))
		return false
	}
	log.Warningf("supervisor: sentry %d died; recovering sandbox %s with sentry %d", dead, c.ID, cmd.Process.Pid)
	// The new sentry registers once it serves; if it dies first, the
	// sandbox is lost.
	deadline := time.Now().Add(s.opts.ExecTimeout)
	for time.Now().Before(deadline) {
		select {
		case e := <-s.events:
			if e.registered != nil {
				// Hand it back to the main loop, which takes it.
				go func() { s.events <- e }()
				return true
			}
		case <-time.After(10 * time.Millisecond):
		}
		if !sandbox.Alive(cmd.Process.Pid) {
			s.lost(fmt.Errorf("the recovering sentry (pid %d) exited; see sentry.log", cmd.Process.Pid))
			return false
		}
	}
	unix.Kill(cmd.Process.Pid, unix.SIGKILL)
	s.lost(fmt.Errorf("the recovering sentry did not serve within %v", s.opts.ExecTimeout))
	return false
}

// lost records that no sentry serves the sandbox any more.
func (s *Supervisor) lost(err error) {
	c := &s.opts.Config
	killChildren()
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
// (orphans keep arriving as their parents die), for 2 s at most.
func killChildren() {
	me := os.Getpid()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		kids := children(me)
		if len(kids) == 0 {
			return
		}
		for _, pid := range kids {
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(time.Millisecond)
	}
}

// children returns the live children of pid.
func children(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		var p int
		if _, err := fmt.Sscan(e.Name(), &p); err != nil {
			continue
		}
		if pp, ok := sandbox.ReadProc(p); ok && pp.Alive() && pp.PPID == pid {
			out = append(out, p)
		}
	}
	return out
}
