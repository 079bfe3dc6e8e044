package boot

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"slices"
	"time"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/shim"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"gvisor.dev/gvisor/pkg/log"
)

// incoming is the sentry as the incoming side of a restart drives it: a
// handover.Target.
type incoming struct {
	opts Options
	// s is the sentry Boot built.
	s *Sentry
	// standby is the connection to the supervisor this sentry stood by
	// on before Ready, nil without one.
	standby *handover.Channel
	// ownRoot is what this sentry's KHO wrote into the root page it
	// reuses (its outgoing root), while the page holds the old root
	// again, from Boot until Commit (see keepOldRoot).
	ownRoot []byte
	// fault is the restart's fault hook (handover.Options.Fault), which
	// the boot calls inside, at handover.AcceptIngested.
	fault func(handover.Point) error
	// early is the entrypoint started before Ready, nil if none.
	early *earlyEntry
	// control, if not nil, returns the control server prepared for the
	// sentry Boot makes (prepareControl).
	control func() *control
	// standbyWait, if not nil, returns the standby connection to the
	// supervisor opened beside an exec-mode boot (standbyAsync).
	standbyWait func() *handover.Channel
	// preread is the handover read ahead of the pause (Preview), until
	// Boot takes it; nil if none.
	preread *kernel.Preread
}

var (
	_ handover.Target        = (*incoming)(nil)
	_ handover.PreviewTarget = (*incoming)(nil)
)

// Preview reads ahead the handover the old sentry shows before its pause
// (kernel.PrereadHandover), for Boot. Failing costs only time: Boot then
// reads the handover as it would without.
func (in *incoming) Preview(p *handover.Preview, mem *os.File) {
	in.preread.Close()
	pre, err := kernel.PrereadHandover(mem, p.Root, p.Generation)
	if err != nil {
		log.Infof("transfer restart: the handover is read in the blackout: %v", err)
	}
	in.preread = pre
}

// dropPreread closes what Preview read if Boot did not take it.
func (in *incoming) dropPreread() {
	in.preread.Close()
	in.preread = nil
}

// decodeConfig returns the sandbox configuration a descriptor carries.
func decodeConfig(d *handover.Descriptor) (sandbox.Config, error) {
	var cfg sandbox.Config
	if err := json.Unmarshal(d.Sandbox, &cfg); err != nil {
		return cfg, fmt.Errorf("handover descriptor: sandbox configuration %q: %w", d.Sandbox, err)
	}
	if err := sandbox.CheckID(cfg.ID); err != nil {
		return cfg, fmt.Errorf("handover descriptor: sandbox configuration: %w", err)
	}
	return cfg, nil
}

// Boot maps the memory file and ingests the state in it.
func (in *incoming) Boot(d *handover.Descriptor, files []*os.File, t *handover.Timing) error {
	cfg, err := decodeConfig(d)
	if err != nil {
		for _, f := range files {
			f.Close()
		}
		return err
	}
	boot := kernel.NewFromHandover
	if d.Mode == handover.ModeRecover {
		// The memory file of a sentry that died, as it was then.
		boot = kernel.Recover
	}
	oldRoot := make([]byte, pgalloc.PageSize)
	if _, err := files[0].ReadAt(oldRoot, int64(d.Root)); err != nil {
		for _, f := range files {
			f.Close()
		}
		return fmt.Errorf("reading the KHO root page at %#x: %w", d.Root, err)
	}
	if pre := in.preread; pre != nil && d.Mode == handover.ModeTransfer {
		in.preread = nil
		boot = func(file *os.File, root uint64, opts kernel.Options, t *handover.Timing) (*kernel.Kernel, error) {
			return kernel.NewFromPreread(pre, file, root, d.Generation, opts, t)
		}
	}
	in.dropPreread()
	k, err := boot(files[0], d.Root, kernel.Options{Logf: log.Infof, Fault: in.fault}, t)
	if err != nil {
		files[1].Close()
		files[2].Close()
		return fmt.Errorf("live-update boot from %s sentry %q: %w", d.Mode, d.Version, err)
	}
	if d.Mode != handover.ModeRecover {
		in.ownRoot = keepOldRoot(k, d.Root, oldRoot)
	}
	var ctl *control
	if in.control != nil {
		ctl = in.control()
	}
	s := newSentry(cfg, in.opts, ctl)
	s.k, s.guestFile, s.controlFile = k, files[1], files[2]
	s.standby, in.standby = in.standby, nil
	if d.Mode != handover.ModeExec {
		s.waitFor, s.waitFrom, s.waitLive = d.OldGuests, d.PID, d.Mode == handover.ModeRecover
		if len(d.OldGuestStarts) == len(d.OldGuests) && d.Mode == handover.ModeTransfer {
			// The old sentry said who they are (protocol 4).
			s.waitStart = slices.Clone(d.OldGuestStarts)
		}
		if d.Mode == handover.ModeRecover {
			// Their identity is taken now, while the supervisor holds
			// what the dead sentry left, killed and exiting.
			s.takeWaitStarts()
		}
	}
	in.s = s
	return nil
}

// keepOldRoot writes the old root FDT back into the root page, which KHO's
// ingest reused and rewrote as this sentry's (empty) outgoing root, and
// returns what ingest wrote there. Until Commit, this sentry has changed
// nothing else in the memory file (releases are held), so the file is
// still the old sentry's state, as it froze: should this sentry die before
// it commits, the old one rolls back, or the supervisor recovers the
// sandbox from that page, with every byte. nil if KHO did not reuse the
// page, or carried it over unchanged (kho.KHO.Carried).
func keepOldRoot(k *kernel.Kernel, root uint64, old []byte) []byte {
	if k.KHO().RootAddr() != root || k.KHO().Carried() {
		return nil
	}
	page, err := k.MemoryFile().Slice(root/pgalloc.PageSize, 1)
	if err != nil {
		return nil
	}
	own := bytes.Clone(page)
	copy(page, old)
	return own
}

// Commit registers with the supervisor (which from then on recovers the
// sandbox from this sentry's memory file and root page, not the old
// sentry's), makes the root page this sentry's outgoing root, lets the
// memory file scrub what was not preserved and serves guests: the
// blackout ends. The registration comes first: until the scrub starts, a
// crash of this sentry loses nothing, the root page still describing the
// old sentry's state.
func (in *incoming) Commit(*handover.Descriptor) error {
	s := in.s
	if s.standby == nil && in.standbyWait != nil {
		s.standby = in.standbyWait()
	}
	switch {
	case s.standby != nil:
		s.promote(s.standby)
		s.standby = nil
	case !s.isRegistered():
		// The state file is written by Serving, after the blackout.
		s.register(false)
	}
	if in.ownRoot != nil {
		page, err := s.k.MemoryFile().Slice(s.k.KHO().RootAddr()/pgalloc.PageSize, 1)
		if err != nil {
			return fmt.Errorf("the KHO root page: %w", err)
		}
		copy(page, in.ownRoot)
	}
	s.k.Commit()
	return s.serve()
}

// Serving records the restart and writes the state file: it names this
// sentry before the old one answers the CLI and exits (until then it names
// the old one, which would look gone to kill and delete).
func (in *incoming) Serving(t handover.Timing) {
	s := in.s
	s.mu.Lock()
	if t.Mode == handover.ModeRecover {
		var names []string
		for _, ss := range s.k.LUO().Status().Sessions {
			names = append(names, ss.Name)
		}
		reason := fmt.Sprintf("sentry %d died; recovered in %v", t.OldPID, t.Blackout)
		if dead := t.LiveupdateNumber - 1; dead > 0 && s.k.LUO().LiveupdateNumber() <= dead && !s.k.LUO().Carried() {
			// The dead sentry came out of restart number dead and had
			// not preserved anything since, and its records were not
			// carried (a kho-v1 handover): its incoming sessions were
			// not in its outgoing records (docs/crash.md). Carried
			// records hold them.
			reason += fmt.Sprintf("; lost: the sessions sentry %d had received at restart %d and not preserved again", t.OldPID, dead)
		}
		s.recovery = &sandbox.RecoveryRecord{At: time.Now().UTC(), Reason: reason, Sessions: names}
	} else {
		s.last = sandbox.RestartRecord{Generation: t.LiveupdateNumber, Timing: t}
	}
	s.mu.Unlock()
	if t.Mode == handover.ModeTransfer && len(s.waitStart) != len(s.waitFor) {
		// From an old sentry of protocol 3, which did not say who its
		// guests are: they are its children, stopped and not reaped,
		// until it hears Serving; their identity is taken now, after
		// the blackout rather than inside it (a read of /proc per
		// guest).
		s.takeWaitStarts()
	}
	if !s.isRegistered() {
		s.register(true)
	} else if err := s.writeState(""); err != nil {
		log.Warningf("%v", err)
	}
}

// Discard drops the booted kernel without touching the memory file's
// contents (releases are still held) and closes this process's copies of
// the sockets, which stay the old sentry's.
func (in *incoming) Discard() {
	if in.s.standby != nil {
		in.s.standby.Close()
	}
	if in.standbyWait != nil {
		if ch := in.standbyWait(); ch != nil && ch != in.s.standby {
			ch.Close()
		}
	}
	in.s.k.MemoryFile().Close()
	in.s.guestFile.Close()
	in.s.controlFile.Close()
}

// HandoverInEnv reports whether this process is the new image of an
// exec-mode restart.
func HandoverInEnv() bool {
	_, ok := os.LookupEnv(handover.EnvDescriptor)
	return ok
}

// reads reports whether this build reads the format c.
func reads(c string) bool {
	for _, k := range kernel.Reads() {
		if k == c {
			return true
		}
	}
	return false
}

// NewFromHandover boots the incoming side of a live restart: over the
// channel on fd (transfer mode) or, if fd < 0, from what an exec-mode
// restart left in the environment. It returns once the sentry serves
// guests; Run then relaunches the entrypoint. In transfer mode an error
// means the old sentry keeps the sandbox; in exec mode there is no one to
// roll back to, so the sandbox is recorded as stopped, with the error.
func NewFromHandover(fd int, opts Options) (*Sentry, error) {
	hopts := handover.Options{Version: opts.Version, Reads: kernel.Reads(), Fault: commitDelayFromEnv(crashAtFromEnv().fault(os.Getpid, nil))}
	// Transfer mode: long done when the descriptor comes. Exec mode:
	// on the other CPU while this one decodes and boots.
	in := &incoming{opts: opts, fault: hopts.Fault, control: prepareControl()}
	if fd >= 0 {
		ch, err := prepareBoot(fd, "handover")
		if err != nil {
			return nil, err
		}
		pgalloc.PrepareMetadata(opts.MetadataChunks)
		// The entrypoint's relaunch finds the libc shim at once.
		shim.Lookup()
		in.early = startEarlyFromEnv(opts.Globals.Root)
		in.standby = standby(opts.Version)
		// No collection inside the blackout: the boot allocates a few
		// MiB, which would start one (its marking takes a CPU of two
		// for milliseconds). And no page fault for what it allocates.
		gcPercent := debug.SetGCPercent(-1)
		if _, err := populateHeap(); err != nil {
			log.Warningf("%v", err)
		}
		growStack()
		d, t, err := handover.Accept(ch, in, hopts)
		// Taken by Boot, unless the handover failed before it.
		in.dropPreread()
		debug.SetGCPercent(gcPercent)
		if in.standby != nil {
			// Boot did not take it: the handover failed before.
			in.standby.Close()
		}
		if err != nil {
			if in.early != nil {
				in.early.kill()
			}
			return nil, err
		}
		in.s.early = in.early
		log.Infof("sandbox %s: live-update boot (transfer mode) from %q, liveupdate number %d, blackout %v", in.s.cfg.ID, d.Version, t.LiveupdateNumber, t.Blackout)
		return in.s, nil
	}
	// Not for the guests this image launches.
	os.Unsetenv(envPrestart)
	// From an old image that is supervised (exec mode only: a recovering
	// sentry the supervisor starts registers after its commit).
	if _, ok := os.LookupEnv(envSupervisor); ok {
		in.standbyWait = standbyAsync(opts.Version)
	}
	// The blackout is on already: beside the boot, not before it.
	go catchSignals()
	gcPercent := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(gcPercent)
	d, files, ok, err := handover.DecodeEnv(reads)
	if !ok {
		return nil, errors.New("no handover: neither a handover fd nor an exec-mode descriptor in the environment")
	}
	// DecodeEnv marked the inherited fds it took close-on-exec.
	if n := closeInherited(); n > 0 {
		log.Warningf("closed %d fds inherited without FD_CLOEXEC", n)
	}
	if err == nil {
		var t handover.Timing
		if t, err = handover.AcceptExec(d, files, in, hopts); err == nil {
			if d.Mode == handover.ModeExec {
				// The old image's guests are this process's children
				// now: stop them before the entrypoint is relaunched.
				stopOldGuests(d.OldGuests)
			}
			logf := log.Infof
			if d.Mode == handover.ModeRecover {
				logf = log.Warningf
			}
			logf("sandbox %s: live-update boot (%s mode) from %q, liveupdate number %d, blackout %v (map %v, KHO %v, LUO %v)", in.s.cfg.ID, d.Mode, d.Version, t.LiveupdateNumber, t.Blackout, t.Map, t.Ingest, t.LUO)
			return in.s, nil
		}
	}
	mode := "exec-mode handover"
	if d != nil && d.Mode == handover.ModeRecover {
		mode = "recovery"
	}
	err = fmt.Errorf("%s refused: %w", mode, err)
	failExec(d, err)
	return nil, err
}

// prepareBoot takes the channel on fd (named name) and does, before a
// sentry waits for its handover or recovery, what the boot needs that does
// not depend on it: the fds inherited by mistake closed, signal handling
// installed, a boot rehearsed (kernel.PrepareIncoming), so that none of it
// is paid inside the blackout.
func prepareBoot(fd int, name string) (*handover.Channel, error) {
	ch, err := handover.NewChannel(os.NewFile(uintptr(fd), name))
	if err != nil {
		return nil, err
	}
	if n := closeInherited(); n > 0 {
		log.Warningf("closed %d fds inherited without FD_CLOEXEC", n)
	}
	catchSignals()
	// The messages of the blackout and what follows it at once: the
	// supervisor's registration and answer, the sandbox configuration
	// in the descriptor, the state file.
	handover.WarmCodecs(&supervisor.Register{}, &supervisor.Registered{Stop: &supervisor.StopRequest{}}, &sandbox.Config{},
		&sandbox.State{Guests: []sandbox.GuestRecord{{}}, LastRestart: &sandbox.RestartRecord{}, LastRecovery: &sandbox.RecoveryRecord{}})
	if err := kernel.PrepareIncoming(0); err != nil {
		log.Warningf("%v", err)
	}
	return ch, nil
}

// failExec records an exec-mode restart that failed after execve: the old
// image's guests are stopped, the sockets removed, the state stopped.
func failExec(d *handover.Descriptor, err error) {
	if d == nil {
		return
	}
	if d.Mode == handover.ModeExec {
		stopOldGuests(d.OldGuests)
	}
	cfg, cerr := decodeConfig(d)
	if cerr != nil {
		return
	}
	st := &sandbox.State{ID: cfg.ID, Status: sandbox.StatusStopped, Root: cfg.Root, Created: cfg.Created, Version: d.Version,
		Error: "exec-mode restart failed after execve (no rollback possible): " + err.Error()}
	if werr := sandbox.WriteState(st); werr != nil {
		log.Warningf("%v", werr)
	}
	os.Remove(sandbox.GuestPath(cfg.Root, cfg.ID))
	os.Remove(sandbox.ControlPath(cfg.Root, cfg.ID))
}

// growStack grows this goroutine's stack to hold the boot: a goroutine
// starts with a few KiB, and each time a call needs more the runtime
// copies the whole stack into a new one twice as large, with a page fault
// per new page. With the collector off (which alone shrinks stacks) the
// stack stays grown for the blackout.
//
//go:noinline
func growStack() byte {
	var b [128 << 10]byte
	return touchStack(b[:])
}

//go:noinline
func touchStack(b []byte) byte {
	for i := 0; i < len(b); i += 4096 {
		b[i] = byte(i)
	}
	return b[len(b)-1]
}
