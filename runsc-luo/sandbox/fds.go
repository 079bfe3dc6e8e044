package sandbox

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// EachFD calls fn with every open fd of this process above 2.
func EachFD(fn func(fd int)) {
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

// CloseInherited closes every fd above 2 that is not close-on-exec: at the
// start of a runsc-luo process that outlives its parent (a sentry, the
// supervisor), once it has taken (and marked close-on-exec) the fds it was
// given, anything else it inherited is a leak of whoever started it, such
// as the write end of a pipe its caller waits to see closed. It returns
// how many it closed.
func CloseInherited() int {
	n := 0
	EachFD(func(fd int) {
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && fl&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
			n++
		}
	})
	return n
}
