package boot

import (
	"errors"
	"net"
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
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sandbox.SupervisorPath(c.Root, c.ID), Net: "unix"})
	if err != nil {
		set(false)
		if !errors.Is(err, os.ErrNotExist) {
			log.Warningf("no supervisor: %v", err)
		}
		return
	}
	f, err := conn.File()
	conn.Close()
	if err != nil {
		set(false)
		return
	}
	ch, err := handover.NewChannel(f)
	if err != nil {
		set(false)
		return
	}
	mem, err := s.k.MemoryFile().DupFile()
	if err != nil {
		ch.Close()
		set(false)
		return
	}
	defer mem.Close()
	reg := supervisor.Register{PID: os.Getpid(), Root: s.k.KHO().RootAddr(), MemorySize: s.k.MemoryFile().Size(),
		LiveupdateNumber: s.k.LUO().LiveupdateNumber(), Version: s.opts.Version}
	ch.SetDeadline(time.Now().Add(5 * time.Second))
	var ok supervisor.Registered
	err = ch.Send(&reg, mem, s.guestFile, s.controlFile)
	if err == nil {
		var files []*os.File
		files, err = ch.Recv(&ok)
		for _, f := range files {
			f.Close()
		}
	}
	if err != nil {
		ch.Close()
		set(false)
		log.Warningf("registering with the supervisor: %v", err)
		return
	}
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
	set(true)
	go func() {
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
	}()
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

// supervisorPID returns the pid of the supervisor this sentry registered
// with, 0 if none.
func (s *Sentry) supervisorPID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.supervisor
}
