package sandbox

import (
	"bytes"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Proc is what /proc/PID/stat says of a host process, read once.
type Proc struct {
	// PID is the process id.
	PID int
	// State is the one-letter state (R, S, D, Z, X, ...).
	State byte
	// PPID is the parent's pid.
	PPID int
	// Start is the start time in clock ticks since boot (field 22): with
	// the pid, the process's identity, since a pid may be reused.
	Start uint64
}

// ReadProc parses /proc/PID/stat; ok is false if there is no such process.
func ReadProc(pid int) (p Proc, ok bool) {
	if pid <= 0 {
		return p, false
	}
	// Three system calls (os.ReadFile takes six): a supervisor reads every
	// process's stat when a sentry dies.
	var buf [1024]byte
	fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/stat", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return p, false
	}
	n, err := unix.Read(fd, buf[:])
	unix.Close(fd)
	if err != nil || n <= 0 {
		return p, false
	}
	b := buf[:n]
	// The fields after the command name, which ends at the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return p, false
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); field 22 is starttime.
	if len(fields) < 20 || len(fields[0]) != 1 {
		return p, false
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return p, false
	}
	ppid, err := strconv.Atoi(fields[1])
	if err != nil {
		return p, false
	}
	return Proc{PID: pid, State: fields[0][0], PPID: ppid, Start: start}, true
}

// Alive reports whether the process exists and is not a zombie.
func (p Proc) Alive() bool { return p.PID > 0 && p.State != 'Z' && p.State != 'X' }

// Alive reports whether pid exists and is not a zombie.
func Alive(pid int) bool {
	p, ok := ReadProc(pid)
	return ok && p.Alive()
}

// StartTime returns pid's start time, 0 if there is no such process.
func StartTime(pid int) uint64 {
	p, _ := ReadProc(pid)
	return p.Start
}

// Is reports whether pid is still the live process that started at start.
func Is(pid int, start uint64) bool {
	p, ok := ReadProc(pid)
	return ok && start != 0 && p.Start == start && p.Alive()
}

// IdleThread makes the calling thread SCHED_IDLE (see Idle); the caller
// has locked its goroutine to the thread, and ends it locked.
func IdleThread() {
	unix.SchedSetAttr(0, &unix.SchedAttr{Policy: unix.SCHED_IDLE}, 0)
}

// Idle makes every thread of pid SCHED_IDLE, so that the kernel's
// teardown of a process that is ending (its exit runs in its own threads,
// and unmapping gigabytes of memory-file pages takes tens of milliseconds
// per GiB) takes only the CPU time others leave: on a small machine it
// would otherwise take a CPU from the sentry that serves the sandbox now.
// Errors are ignored (a thread that is gone needs nothing).
func Idle(pid int) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			unix.SchedSetAttr(tid, &unix.SchedAttr{Policy: unix.SCHED_IDLE}, 0)
		}
	}
}
