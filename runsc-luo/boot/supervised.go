package boot

import (
	"errors"
	"os"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
	"gvisor.dev/gvisor/pkg/log"
)

// register tells the sandbox's supervisor, if it has one, that this sentry
// serves: it hands over copies of the memory file and the listening
// sockets, waits until the supervisor holds it as the sandbox's sentry,
// and keeps the connection open for this process's life (its end tells the
// supervisor this sentry is gone). A sentry out of a restart registers
// before it tells the old one it serves, so that the old one's exit is
// never taken for a crash. Without a supervisor (a
// sandbox started by an older build, or one whose supervisor died) a crash
// of this sentry loses the sandbox; the state file says so. With
// writeState, the state file records the outcome at once; a restart's
// Commit leaves that to Serving, after the blackout.
func (s *Sentry) register(writeState bool) {
	set := func(v bool) {
		s.markSupervised(v)
		if writeState {
			if err := s.writeState(""); err != nil {
				log.Warningf("%v", err)
			}
		}
	}
	c := &s.cfg
	ch, err := supervisor.Dial(sandbox.SupervisorPath(c.Root, c.ID))
	if err != nil {
		set(false)
		if !errors.Is(err, os.ErrNotExist) {
			log.Warningf("no supervisor: %v", err)
		}
		return
	}
	ch.SetDeadline(time.Now().Add(superTimeout))
	var ok supervisor.Registered
	err = s.sendRegistration(ch)
	if err == nil {
		err = recvNoFiles(ch, &ok)
	}
	if err != nil {
		ch.Close()
		set(false)
		log.Warningf("registering with the supervisor: %v", err)
		return
	}
	s.takeAnswer(ch, &ok)
	set(true)
	go s.keepSupervisor(ch)
}

// sendRegistration sends this sentry's registration on ch, with copies of
// the memory file and the listening sockets.
func (s *Sentry) sendRegistration(ch *handover.Channel) error {
	mem, err := s.k.MemoryFile().DupFile()
	if err != nil {
		return err
	}
	defer mem.Close()
	reg := supervisor.Register{PID: os.Getpid(), Root: s.k.KHO().RootAddr(), MemorySize: s.k.MemoryFile().Size(),
		LiveupdateNumber: s.k.LUO().LiveupdateNumber(), Version: s.opts.Version}
	return ch.Send(&reg, mem, s.guestFile, s.controlFile)
}

// superTimeout bounds each exchange with the supervisor.
const superTimeout = 5 * time.Second

// envSupervisor gives the new sentry of a restart the path of the
// sandbox's supervisor socket, so that it registers as a standby: in
// transfer mode before it says Ready, in exec mode beside its boot (a
// build that does not know it registers after the commit, as a
// cold-booted sentry does).
const envSupervisor = "LIVESENTRY_SUPERVISOR"

// standby registers this process, the new sentry of a transfer-mode
// restart, with the sandbox's supervisor before the blackout, and returns
// the connection: the commit then costs one message (promote), which the
// sentry needs no answer to before it serves. nil without a supervisor.
func standby(version string) *handover.Channel {
	path := os.Getenv(envSupervisor)
	os.Unsetenv(envSupervisor)
	if path == "" {
		return nil
	}
	ch, err := supervisor.Dial(path)
	if err != nil {
		log.Warningf("no supervisor to stand by with: %v", err)
		return nil
	}
	ch.SetDeadline(time.Now().Add(superTimeout))
	var ok supervisor.Registered
	err = ch.Send(&supervisor.Register{PID: os.Getpid(), Version: version, Standby: true})
	if err == nil {
		err = recvNoFiles(ch, &ok)
	}
	if err != nil {
		ch.Close()
		log.Warningf("standing by with the supervisor: %v", err)
		return nil
	}
	ch.SetDeadline(time.Time{})
	return ch
}

// standbyAsync runs standby on a goroutine of its own: the exec-mode new
// image's dial and round trip with the supervisor go on the other CPU
// while this one boots, inside the blackout, and its commit then costs one
// message, as in transfer mode. The function it returns waits for the
// connection (nil without a supervisor or on failure).
func standbyAsync(version string) func() *handover.Channel {
	return beside(func() *handover.Channel { return standby(version) })
}

// promote registers this sentry, which stood by (standby), as the
// sandbox's on the standby connection: one message, with the memory file
// and the listening sockets, sent before the sentry changes anything (the
// supervisor reads it before it notices the old sentry's end, which the
// old sentry announces with Notice.HandedOff). The supervisor's answer is
// awaited after the blackout, by awaitSupervisor.
func (s *Sentry) promote(ch *handover.Channel) {
	s.answered = make(chan struct{})
	ch.SetDeadline(time.Now().Add(superTimeout))
	if err := s.sendRegistration(ch); err != nil {
		ch.Close()
		close(s.answered)
		s.markSupervised(false)
		log.Warningf("registering with the supervisor: %v", err)
		return
	}
	s.markSupervised(true)
	s.superMu.Lock()
	s.superCh = ch
	s.superMu.Unlock()
	go func() {
		var ok supervisor.Registered
		err := recvNoFiles(ch, &ok)
		if err == nil {
			s.takeAnswer(ch, &ok)
		}
		close(s.answered)
		if err != nil {
			s.superMu.Lock()
			s.superCh = nil
			s.superMu.Unlock()
			ch.Close()
			log.Warningf("registering with the supervisor: %v", err)
			s.setSupervised(false)
			return
		}
		s.keepSupervisor(ch)
	}()
}

// awaitSupervisor waits for the supervisor's answer to promote, if one is
// due.
func (s *Sentry) awaitSupervisor() {
	if s.answered != nil {
		<-s.answered
	}
}

// takeAnswer records the supervisor's answer to a registration on ch.
func (s *Sentry) takeAnswer(ch *handover.Channel, ok *supervisor.Registered) {
	ch.SetDeadline(time.Time{})
	s.mu.Lock()
	s.supervisor = ok.PID
	if ok.Stop != nil && s.supervisorStop == nil {
		s.supervisorStop = ok.Stop
	}
	s.mu.Unlock()
	s.superMu.Lock()
	s.superCh = ch
	s.superMu.Unlock()
}

// keepSupervisor waits for the end of the connection to the supervisor.
func (s *Sentry) keepSupervisor(ch *handover.Channel) {
	var none struct{}
	ch.Recv(&none)
	s.superMu.Lock()
	s.superCh = nil
	s.superMu.Unlock()
	ch.Close()
	if !s.isHandedOver() {
		log.Warningf("the supervisor is gone: a crash of this sentry would now lose the sandbox")
		s.setSupervised(false)
	}
}

// recvNoFiles receives msg on ch; files that came with it are closed.
func recvNoFiles(ch *handover.Channel, msg any) error {
	files, err := ch.Recv(msg)
	for _, f := range files {
		f.Close()
	}
	return err
}

// notifySupervisor sends n to the supervisor, if this sentry has one. The
// supervisor reads notices in order, before it notices this sentry's end.
func (s *Sentry) notifySupervisor(n *supervisor.Notice) {
	s.superMu.Lock()
	defer s.superMu.Unlock()
	if s.superCh == nil {
		return
	}
	if err := s.superCh.Send(n); err != nil {
		log.Warningf("telling the supervisor: %v", err)
	}
}

// markSupervised records whether this sentry is registered with a
// supervisor, without writing the state file.
func (s *Sentry) markSupervised(v bool) {
	s.mu.Lock()
	s.supervised, s.registered = v, true
	s.mu.Unlock()
}

// stopAsked returns the stop the supervisor passed on at registration
// (one asked for during the restart this sentry came out of), if any.
func (s *Sentry) stopAsked() *supervisor.StopRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.supervisorStop
}

func (s *Sentry) setSupervised(v bool) {
	s.markSupervised(v)
	if err := s.writeState(""); err != nil {
		log.Warningf("%v", err)
	}
}

// isRegistered reports whether register ran (with or without a
// supervisor to register with).
func (s *Sentry) isRegistered() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.registered
}

// isSupervised reports whether a supervisor holds this sentry's memory
// file.
func (s *Sentry) isSupervised() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.supervised
}

// supervisorPID returns the pid of the supervisor this sentry registered
// with, 0 if none.
func (s *Sentry) supervisorPID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.supervisor
}
