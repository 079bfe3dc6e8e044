package boot

import (
	"os/exec"
	"sync"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
)

// Every fd of this process is close-on-exec except the three standard ones:
// a guest or a new sentry inherits only what it is given. Two gVisor calls
// the control server uses make fds without O_CLOEXEC (the eventfd of each
// unet.Socket, and the files urpc receives without MSG_CMSG_CLOEXEC), and a
// previous image may have left some; fdMu and the sweeps below close that
// gap: each launch sweeps (marks every fd close-on-exec) and forks under
// fdMu, and each control connection sweeps under fdMu right after it is
// set up, so no such fd is open outside fdMu without FD_CLOEXEC. What the
// sweeps cannot cover is an fd gVisor makes in another goroutine between a
// launch's sweep and its fork (tens of microseconds): then the fd is
// inherited by that one child.
var fdMu sync.Mutex

// startCmd starts cmd with no fd inherited but its own (stdio and
// ExtraFiles): every other fd is marked close-on-exec first.
func startCmd(cmd *exec.Cmd) error {
	fdMu.Lock()
	defer fdMu.Unlock()
	markCloseOnExec()
	return cmd.Start()
}

// markCloseOnExec sets FD_CLOEXEC on every fd above 2.
//
// Preconditions: fdMu is locked.
func markCloseOnExec() {
	sandbox.EachFD(func(fd int) {
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && fl&unix.FD_CLOEXEC == 0 {
			unix.FcntlInt(uintptr(fd), unix.F_SETFD, fl|unix.FD_CLOEXEC)
		}
	})
}

// closeInherited closes what this sentry inherited by mistake
// (sandbox.CloseInherited).
func closeInherited() int { return sandbox.CloseInherited() }
