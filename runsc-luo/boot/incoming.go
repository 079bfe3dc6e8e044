package boot

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"gvisor.dev/gvisor/pkg/log"
)

// incoming is the sentry as the incoming side of a restart drives it: a
// handover.Target.
type incoming struct {
	opts Options
	// s is the sentry Boot built.
	s *Sentry
}

var _ handover.Target = (*incoming)(nil)

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
	k, err := boot(files[0], d.Root, kernel.Options{Logf: log.Infof}, t)
	if err != nil {
		files[1].Close()
		files[2].Close()
		return fmt.Errorf("live-update boot from %s sentry %q: %w", d.Mode, d.Version, err)
	}
	s := newSentry(cfg, in.opts)
	s.k, s.guestFile, s.controlFile = k, files[1], files[2]
	if d.Mode == handover.ModeTransfer {
		s.waitFor = d.OldGuests
	}
	in.s = s
	return nil
}

// Commit lets the memory file scrub what was not preserved and serves
// guests: the blackout ends.
func (in *incoming) Commit(*handover.Descriptor) error {
	in.s.k.Commit()
	return in.s.serve()
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
		s.recovery = &sandbox.RecoveryRecord{At: time.Now().UTC(), Reason: fmt.Sprintf("sentry %d died; recovered in %v", t.OldPID, t.Blackout), Sessions: names}
	} else {
		s.last = sandbox.RestartRecord{Generation: t.LiveupdateNumber, Timing: t}
	}
	s.mu.Unlock()
	s.register()
}

// Discard drops the booted kernel without touching the memory file's
// contents (releases are still held) and closes this process's copies of
// the sockets, which stay the old sentry's.
func (in *incoming) Discard() {
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
	in := &incoming{opts: opts}
	hopts := handover.Options{Version: opts.Version, Reads: kernel.Reads()}
	if fd >= 0 {
		ch, err := handover.NewChannel(os.NewFile(uintptr(fd), "handover"))
		if err != nil {
			return nil, err
		}
		if n := closeInherited(); n > 0 {
			log.Warningf("closed %d fds inherited without FD_CLOEXEC", n)
		}
		// Before Ready: what the boot needs that does not depend on the
		// handover is faulted in outside the blackout.
		kernel.PrepareIncoming(0)
		d, t, err := handover.Accept(ch, in, hopts)
		if err != nil {
			return nil, err
		}
		log.Infof("sandbox %s: live-update boot (transfer mode) from %q, liveupdate number %d, blackout %v", in.s.cfg.ID, d.Version, t.LiveupdateNumber, t.Blackout)
		return in.s, nil
	}
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
			// The old image's guests are this process's children now:
			// stop them before the entrypoint is relaunched.
			stopOldGuests(d.OldGuests)
			log.Infof("sandbox %s: live-update boot (%s mode) from %q, liveupdate number %d, blackout %v", in.s.cfg.ID, d.Mode, d.Version, t.LiveupdateNumber, t.Blackout)
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

// failExec records an exec-mode restart that failed after execve: the old
// image's guests are stopped, the sockets removed, the state stopped.
func failExec(d *handover.Descriptor, err error) {
	if d == nil {
		return
	}
	stopOldGuests(d.OldGuests)
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
