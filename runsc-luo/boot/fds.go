package boot

import (
	"os"
	"strconv"
	"sync"

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

// eachFD calls fn with every open fd of this process above 2.
func eachFD(fn func(fd int)) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err == nil && fd > 2 {
			fn(fd)
		}
	}
}

// markCloseOnExec sets FD_CLOEXEC on every fd above 2.
//
// Preconditions: fdMu is locked.
func markCloseOnExec() {
	eachFD(func(fd int) {
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && fl&unix.FD_CLOEXEC == 0 {
			unix.FcntlInt(uintptr(fd), unix.F_SETFD, fl|unix.FD_CLOEXEC)
		}
	})
}

// closeInherited closes every fd above 2 that is not close-on-exec: at the
// start of a sentry, once it has taken (and marked close-on-exec) the fds
// it was given, anything else inherited is a leak of the process before it.
// It returns how many it closed.
func closeInherited() int {
	n := 0
	eachFD(func(fd int) {
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && fl&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
			n++
		}
	})
	return n
}
