package boot

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/unet"
)

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

// startAccepting opens this process's listeners and starts the accept
// loops.
func (s *Sentry) startAccepting() error {
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
func (s *Sentry) stopAccepting() {
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

func (s *Sentry) serveControl(l *net.UnixListener) {
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
		fdMu.Lock()
		sock, err := unet.NewSocket(fd)
		// unet's eventfd is not close-on-exec.
		markCloseOnExec()
		fdMu.Unlock()
		if err != nil {
			unix.Close(fd)
			continue
		}
		s.server.StartHandling(sock)
	}
}

// removeSockets closes and removes both sockets.
func (s *Sentry) removeSockets() {
	if s.guestFile != nil {
		s.guestFile.Close()
	}
	if s.controlFile != nil {
		s.controlFile.Close()
	}
	os.Remove(sandbox.GuestPath(s.cfg.Root, s.cfg.ID))
	os.Remove(sandbox.ControlPath(s.cfg.Root, s.cfg.ID))
}
