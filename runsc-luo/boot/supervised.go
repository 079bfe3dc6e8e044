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
// sockets, and keeps the connection open for this process's life (its end
// tells the supervisor this sentry is gone). Without a supervisor (a
// sandbox started by an older build, or one whose supervisor died) a crash
// of this sentry loses the sandbox; the state file says so.
func (s *Sentry) register() {
	c := &s.cfg
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sandbox.SupervisorPath(c.Root, c.ID), Net: "unix"})
	if err != nil {
		s.setSupervised(false)
		if !errors.Is(err, os.ErrNotExist) {
			log.Warningf("no supervisor: %v", err)
		}
		return
	}
	f, err := conn.File()
	conn.Close()
	if err != nil {
		s.setSupervised(false)
		return
	}
	ch, err := handover.NewChannel(f)
	if err != nil {
		s.setSupervised(false)
		return
	}
	mem, err := s.k.MemoryFile().DupFile()
	if err != nil {
		ch.Close()
		s.setSupervised(false)
		return
	}
	defer mem.Close()
	reg := supervisor.Register{PID: os.Getpid(), Root: s.k.KHO().RootAddr(), MemorySize: s.k.MemoryFile().Size(),
		LiveupdateNumber: s.k.LUO().LiveupdateNumber(), Version: s.opts.Version}
	ch.SetDeadline(time.Now().Add(5 * time.Second))
	if err := ch.Send(&reg, mem, s.guestFile, s.controlFile); err != nil {
		ch.Close()
		s.setSupervised(false)
		log.Warningf("registering with the supervisor: %v", err)
		return
	}
	ch.SetDeadline(time.Time{})
	s.setSupervised(true)
	go func() {
		var none struct{}
		ch.Recv(&none)
		if !s.isHandedOver() {
			log.Warningf("the supervisor is gone: a crash of this sentry would now lose the sandbox")
			s.setSupervised(false)
		}
	}()
}

func (s *Sentry) setSupervised(v bool) {
	s.mu.Lock()
	s.supervised = v
	s.mu.Unlock()
	if err := s.writeState(""); err != nil {
		log.Warningf("%v", err)
	}
}
