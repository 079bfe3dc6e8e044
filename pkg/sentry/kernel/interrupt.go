package kernel

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"golang.org/x/sys/unix"
)

// Interrupting calls at the pause
//
// A call whose length the guest controls (it sends a write's payload, or
// drains a read's data, at its own pace) must not hold a restart's Pause:
// Linux's freezer does not wait for a task blocked in an interruptible
// sleep either, it wakes it with a fake signal and the syscall returns
// -ERESTARTSYS, to be restarted once the task is thawed. Here such calls
// run their I/O with the guest inside an interruptible section. Pause
// interrupts every call inside one by moving its connection's deadline to
// now; the blocked I/O returns, the call stops where it is and leaves the
// dispatch gate with what it has done (bytes written to the file, or data
// frames sent), and only then, outside the gate, finishes its exchange
// with the guest: it drains the payload the guest still sends, completes
// a data frame cut in the middle (from a copy: the memory file may belong
// to the next sentry by then), and answers with
// abiguest.ErrnoRestart and the bytes done. The guest library restarts
// the call for what is left when the kernel resumes, so no acknowledged
// byte is lost and none is applied twice. Guests of protocol version 2 or
// older get what Linux gives a call interrupted by a signal without
// SA_RESTART instead: the count done if it is not zero, else EINTR.

// errRestart is a call's error when Pause interrupted it; its result is
// the number of bytes done.
var errRestart = errors.New("interrupted by a pause (ERESTARTSYS)")

// interruptState is a Process's part in interrupting calls.
type interruptState struct {
	mu sync.Mutex
	// inSection is set while the process's call is inside an
	// interruptible section.
	//
	// +checklocks:mu
	inSection bool
	// interrupted is set (under mu) when Pause interrupted the call in
	// progress; the call clears it when it is done with the guest. Read
	// without mu by the I/O paths.
	interrupted atomic.Bool
}

// beginInterruptible starts an interruptible section of the call in
// progress. If the kernel is pausing already, the call is interrupted at
// once (its first blocking I/O returns).
func (p *Process) beginInterruptible() {
	p.intr.mu.Lock()
	defer p.intr.mu.Unlock()
	p.intr.inSection = true
	if p.k.pausing.Load() {
		p.interruptLocked()
	}
}

// endInterruptible ends an interruptible section and reports whether the
// call was interrupted in it.
func (p *Process) endInterruptible() bool {
	p.intr.mu.Lock()
	defer p.intr.mu.Unlock()
	p.intr.inSection = false
	return p.intr.interrupted.Load()
}

// interrupt interrupts the process's call if it is inside an
// interruptible section. Called by Pause.
func (p *Process) interrupt() {
	p.intr.mu.Lock()
	defer p.intr.mu.Unlock()
	if p.intr.inSection {
		p.interruptLocked()
	}
}

// +checklocks:p.intr.mu
func (p *Process) interruptLocked() {
	if p.intr.interrupted.Swap(true) {
		return
	}
	p.k.interrupts.Add(1)
	p.conn.SetDeadline(time.Now())
}

// Interrupts returns the number of guest calls that pauses have
// interrupted since the kernel booted.
func (k *Kernel) Interrupts() uint64 { return k.interrupts.Load() }

// interruptedBy reports whether err is the end of a blocked I/O that Pause
// interrupted.
func (p *Process) interruptedBy(err error) bool {
	return err != nil && p.intr.interrupted.Load() && errors.Is(err, os.ErrDeadlineExceeded)
}

// clearInterrupt forgets an interruption once the call is out of the
// dispatch gate, and gives the connection back a deadline for the bytes
// still to exchange.
func (p *Process) clearInterrupt() {
	p.intr.interrupted.Store(false)
	p.callStart, p.callBytes = time.Now(), 0
	p.allow(0)
}

// restartResult is the result frame of a call interrupted after done
// bytes, in the guest's protocol version.
func (p *Process) restartResult(done int64) abiguest.ResponseHeader {
	rh := abiguest.ResponseHeader{Kind: abiguest.KindResult, Result: done}
	switch {
	case p.version >= abiguest.RestartVersion:
		rh.Errno = abiguest.ErrnoRestart
	case done == 0:
		rh.Errno, rh.Result = uint32(unix.EINTR), -1
	}
	return rh
}
