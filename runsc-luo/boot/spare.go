package boot

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"gvisor.dev/gvisor/pkg/log"
)

// ErrNoRecovery is NewSpare's error when the supervisor closed the spare's
// channel without a recovery: the sandbox stopped, or the supervisor went
// away. The spare exits quietly.
var ErrNoRecovery = errors.New("the supervisor closed the spare's channel without a recovery")

// NewSpare runs a spare sentry: a process the supervisor starts ahead of
// any crash, so that a recovery does not pay for starting one. It does
// before the crash what a sentry does before a restart's Ready (signal
// handling, a rehearsed boot, the collector off and the heap faulted in,
// a grown stack), then waits
// on the channel at fd for the supervisor's recovery descriptor with the
// memory file and the listening sockets (handover.RecvRecovery) and boots
// from it as a recovering sentry started with the descriptor in its
// environment would; it registers on the same channel. It returns once
// the sentry serves guests; Run then relaunches the entrypoint.
func NewSpare(fd int, opts Options) (*Sentry, error) {
	ch, err := prepareBoot(fd, "spare")
	if err != nil {
		return nil, err
	}
	control := prepareControl()
	// No collection until the recovery's blackout is over (nothing
	// allocates while the spare waits), and the heap it will allocate
	// from faulted in.
	gcPercent := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(gcPercent)
	if _, err := populateHeap(); err != nil {
		log.Warningf("%v", err)
	}
	growStack()
	log.Debugf("spare sentry %d waits for a recovery", os.Getpid())
	d, files, err := handover.RecvRecovery(ch, reads)
	switch {
	case errors.Is(err, io.EOF):
		ch.Close()
		return nil, ErrNoRecovery
	case err != nil:
		ch.Close()
		return nil, fmt.Errorf("spare sentry: the supervisor's recovery: %w", err)
	}
	// The channel is this sentry's connection to the supervisor, as a
	// restart's new sentry's standby connection is: it registers on it
	// at its commit with one message (promote).
	crash := crashAtFromEnv()
	if c := spareCrashAtFromEnv(); c != nil {
		crash = c
	}
	hopts := handover.Options{Version: opts.Version, Reads: kernel.Reads(), Fault: crash.fault(os.Getpid, nil)}
	in := &incoming{opts: opts, standby: ch, fault: hopts.Fault, control: control}
	t, err := handover.AcceptExec(d, files, in, hopts)
	if in.standby != nil {
		// Boot did not take it: the recovery failed before.
		in.standby.Close()
	}
	if err != nil {
		// The supervisor sees this process exit before it registers,
		// and records the sandbox lost.
		return nil, fmt.Errorf("recovery refused: %w", err)
	}
	log.Warningf("sandbox %s: live-update boot (%s mode) from %q, liveupdate number %d, blackout %v (map %v, KHO %v, LUO %v), by the spare sentry", in.s.cfg.ID, d.Mode, d.Version, t.LiveupdateNumber, t.Blackout, t.Map, t.Ingest, t.LUO)
	return in.s, nil
}
