package handover

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/cleanup"
)

// Source is the outgoing sentry as a restart drives it. Offer and OfferExec
// call Pause, then Prepare, then either Handoff (the restart committed) or,
// on any failure, Abort (if Prepare succeeded) and then Resume (if Pause
// succeeded), always after the new sentry has been stopped for good.
type Source interface {
	// Pause stops serving guests: no guest connection is accepted and no
	// guest call dispatched, waiting at most until deadline for the calls
	// in progress. On error nothing stays paused.
	Pause(deadline time.Time) error
	// Prepare freezes what crosses the restart (LUO serialize, KHO
	// finalize), writing per subsystem the newest format in peerReads
	// (the ABI strings the new sentry reads), and fills d's Root,
	// LiveupdateNumber, MemorySize, Compatibles (the formats it wrote),
	// Sandbox, OldGuests and Generation (a Previewer: the generation
	// finalized), and d.Timing's Freeze and Finalize. It
	// returns the files that cross, in order: the memory file, the guest
	// listener and the control listener; they stay the Source's. On error
	// (a subsystem with no format the new sentry reads among them) nothing
	// stays prepared.
	Prepare(d *Descriptor, peerReads []string) ([]*os.File, error)
	// Abort undoes a successful Prepare.
	Abort()
	// Resume undoes a successful Pause: the sentry serves again.
	Resume()
	// Handoff is called once the restart is committed (protocol 3: the
	// Commit is sent; 4: the new sentry won the decision word): the state
	// is the new sentry's. The Source forgets its guests without releasing
	// anything they hold and never serves again. serving says the new
	// sentry already serves (protocol 4, its ack read): nothing is left
	// for the old guests to wait for.
	Handoff(serving bool)
}

// Previewer is a Source that shows the new sentry, before the pause, what
// it will hand over (protocol 5, transfer mode).
type Previewer interface {
	// Preview fills p's Root, MemorySize and Generation for a new sentry
	// that reads peerReads and returns the memory file to attach, which
	// the caller closes once sent; or it returns nil, leaving p as it is,
	// when there is nothing to read ahead. It changes nothing.
	Preview(p *Preview, peerReads []string) *os.File
}

// Target is the incoming sentry as a restart drives it. Accept and
// AcceptExec call Boot, then Commit and Serving once the old sentry has
// committed (transfer) or at once (exec); Discard if the old sentry may
// still take the state back.
type Target interface {
	// Boot builds the new sentry from the handover: it maps the memory
	// file, ingests KHO and deserializes LUO, filling t's Map, Ingest and
	// LUO. files are the memory file, the guest listener and the control
	// listener; Boot owns them from now on, even when it fails. It must
	// change nothing the old sentry could still need: nothing is
	// scrubbed and no guest is served.
	Boot(d *Descriptor, files []*os.File, t *Timing) error
	// Commit is called once the old sentry can no longer roll back: the
	// memory that was not preserved may be scrubbed, and guests are
	// served.
	Commit(d *Descriptor) error
	// Serving is called with the finished timing once Commit returned,
	// before the old sentry is told (a state file is written here).
	Serving(t Timing)
	// Discard drops what Boot built without touching the memory file's
	// contents: the old sentry may be serving them again.
	Discard()
}

// PreviewTarget is a Target that reads ahead what the old sentry shows
// before the pause (protocol 5, transfer mode).
type PreviewTarget interface {
	// Preview reads ahead, in mem, what p shows (a validated Preview with
	// a non-zero Root); it owns mem from now on. It must change nothing
	// in mem: the old sentry still runs on it. Boot then decides, from
	// the descriptor, whether what it read still holds; a failure here
	// only costs the blackout what reading ahead would have saved.
	Preview(p *Preview, mem *os.File)
}

// Point names a step of either side, where Options.Fault may inject a
// failure or an abrupt end.
type Point string

// The points of the outgoing side, then of the incoming side, in order.
// In exec mode OfferSent is just before execve, and AcceptServing is after
// the new image serves.
const (
	OfferReady      Point = "offer/ready"      // the new sentry said Ready; nothing is paused
	OfferPaused     Point = "offer/paused"     // guests are paused
	OfferFrozen     Point = "offer/frozen"     // LUO frozen; KHO finalize is next (inside Source.Prepare)
	OfferPrepared   Point = "offer/prepared"   // LUO frozen, KHO finalized
	OfferSent       Point = "offer/sent"       // the descriptor and files are sent; the ack is next
	OfferAcked      Point = "offer/acked"      // an accepted ack was read; the Commit is next (4: the ack says committed)
	OfferCommitted  Point = "offer/committed"  // the Commit is sent (4: the decision is the new sentry's): no rollback from here on
	OfferHandedOff  Point = "offer/handed-off" // Handoff done; waiting for Serving
	OfferConfirmed  Point = "offer/confirmed"  // the new sentry said Serving
	AcceptStart     Point = "accept/start"     // before Ready
	AcceptReady     Point = "accept/ready"     // Ready sent; waiting for the descriptor
	AcceptReceived  Point = "accept/received"  // the descriptor is received and valid; Boot is next
	AcceptIngested  Point = "accept/ingested"  // the memory file mapped, KHO ingested; LUO deserialize is next (inside Target.Boot)
	AcceptBooted    Point = "accept/booted"    // Boot done; the ack is next
	AcceptAcked     Point = "accept/acked"     // the accepted ack is sent; waiting for the Commit (4: after AcceptServing)
	AcceptCommitted Point = "accept/committed" // the Commit arrived (4: the decision word won); Commit (scrub, serve) is next
	AcceptServing   Point = "accept/serving"   // serving guests; Serving is next
	AcceptDone      Point = "accept/done"      // Serving sent
)

// Points are every Point, the outgoing side's first, each side's in order.
// Exec mode passes OfferPaused, OfferFrozen, OfferPrepared and OfferSent
// on the outgoing side, and AcceptReceived, AcceptIngested, AcceptBooted
// and AcceptServing on the incoming side. OfferFrozen and AcceptIngested
// are inside the Source's Prepare and the Target's Boot, which call the
// hook there themselves (Options.Fault, passed on).
var Points = []Point{
	OfferReady, OfferPaused, OfferFrozen, OfferPrepared, OfferSent, OfferAcked, OfferCommitted, OfferHandedOff, OfferConfirmed,
	AcceptStart, AcceptReady, AcceptReceived, AcceptIngested, AcceptBooted, AcceptAcked, AcceptCommitted, AcceptServing, AcceptDone,
}

// ErrCrash, returned by a Fault hook, ends that side at once, as SIGKILL
// would: no undo runs and its end of the channel closes.
var ErrCrash = errors.New("injected crash")

// ErrNotServing is returned by Offer when the old sentry committed but the
// new one never said it serves: the handover cannot be rolled back, and
// the sandbox may be lost.
var ErrNotServing = errors.New("the new sentry took the handover but never reported serving guests")

// Timeouts of the steps after the ack, which Options.Deadline does not
// bound.
const (
	// commitSendTimeout bounds sending the Commit (a few bytes into an
	// empty socket buffer).
	commitSendTimeout = 2 * time.Second
	// defaultServingTimeout is how long the old sentry waits for Serving.
	defaultServingTimeout = 5 * time.Second
)

// Options configures one side of a restart.
type Options struct {
	// Version is this sentry's version string.
	Version string
	// PID is this sentry's pid; 0 means os.Getpid().
	PID int
	// Deadline bounds the outgoing side until the ack is read: a new
	// sentry that is not ready, or has not acknowledged, by then is
	// stopped and the old one rolls back.
	Deadline time.Time
	// ServingTimeout bounds the outgoing side's wait for Serving after
	// the Commit; 0 means 5 s.
	ServingTimeout time.Duration
	// StopPeer stops the new sentry for good (kills it and waits for it)
	// before the outgoing side undoes anything, so that a late ack never
	// finds two sentries serving. Outgoing side, transfer mode.
	StopPeer func()
	// Reads are the ABI strings this sentry reads. Incoming side: they go
	// to the old sentry in Ready, and a descriptor using another is
	// refused.
	Reads []string
	// PeerReads are the ABI strings the new sentry reads. Outgoing side,
	// exec mode (transfer mode has them from Ready).
	PeerReads []string
	// Exec replaces the process image with the new sentry, env being the
	// descriptor's environment entry and fds the inherited fds it names
	// (FD_CLOEXEC cleared); it returns only on failure. Exec mode,
	// outgoing side.
	Exec func(env string, fds []int) error
	// BeforePause, if not nil, is called once the new sentry is ready,
	// just before the blackout starts, to end what the old sentry did
	// while the new one started. Outgoing side, transfer mode.
	BeforePause func()
	// Protocol, if not 0, is the newest protocol version this side
	// speaks, OldestProtocol to ProtocolVersion (tests: a build of an
	// older version).
	Protocol int
	// Fault, if not nil, is called at every Point of this side: ErrCrash
	// ends the side there; any other error makes the step that follows
	// fail. Tests use it; nil in production.
	Fault func(Point) error
}

// newest returns the newest protocol version this side speaks.
func (o *Options) newest() int {
	if o.Protocol != 0 {
		return o.Protocol
	}
	return ProtocolVersion
}

// speak returns the version this side, the old sentry, speaks with a new
// sentry that said ready: the newest both know.
func (o *Options) speak(ready *Ready) (int, error) {
	v, err := negotiate(ready.Protocol, ready.Newest, o.newest())
	if err != nil {
		return 0, fmt.Errorf("the new sentry %q %w", ready.Version, err)
	}
	return v, nil
}

// Negotiate returns the newest protocol version this build and a peer
// that speaks oldest to newest (newest 0: only oldest, as builds of
// protocol 3 say) both speak; an error names both ranges if there is none.
func Negotiate(oldest, newest int) (int, error) {
	return negotiate(oldest, newest, ProtocolVersion)
}

func negotiate(oldest, newest, ours int) (int, error) {
	newest = max(oldest, newest)
	v := min(newest, ours)
	if v < max(oldest, OldestProtocol) {
		return 0, fmt.Errorf("speaks handover protocol %d to %d, this sentry %d to %d", oldest, newest, OldestProtocol, ours)
	}
	return v, nil
}

// servingTimeout returns ServingTimeout, or its default.
func (o *Options) servingTimeout() time.Duration {
	if o.ServingTimeout > 0 {
		return o.ServingTimeout
	}
	return defaultServingTimeout
}

func (o *Options) pid() int {
	if o.PID != 0 {
		return o.PID
	}
	return os.Getpid()
}

// known reports whether c is one of o.Reads.
func (o *Options) known(c string) bool {
	for _, r := range o.Reads {
		if r == c {
			return true
		}
	}
	return false
}

func (o *Options) fault(p Point) error {
	if o.Fault == nil {
		return nil
	}
	if err := o.Fault(p); err != nil {
		return fmt.Errorf("at %s: %w", p, err)
	}
	return nil
}

// Offer is the outgoing side of a transfer-mode restart, over ch (which it
// closes) to a new sentry that Accepts on the other end. It returns the
// restart's timing once the new sentry serves. On any failure before the
// Commit it stops the new sentry (StopPeer), undoes what it did in reverse
// (Abort, Resume) and returns the error: the old sentry goes on serving.
// After the Commit (protocol 4: once the new sentry won the decision word)
// it never rolls back; an error then wraps ErrNotServing.
func Offer(ch *Channel, src Source, opts Options) (Timing, error) {
	defer ch.Close()
	t := Timing{Mode: ModeTransfer, OldPID: opts.pid(), OldVersion: opts.Version}
	crashed, committed := false, false
	// On failure: the new sentry first, so that it is gone before
	// anything here resumes; then the undo stack, in reverse.
	var cu cleanup.Cleanup
	defer func() {
		if crashed || committed {
			return
		}
		if opts.StopPeer != nil {
			opts.StopPeer()
		}
		cu.Clean()
	}()
	fail := func(err error) (Timing, error) {
		crashed = errors.Is(err, ErrCrash)
		return t, err
	}

	ch.SetDeadline(opts.Deadline)
	var ready Ready
	if err := recvNoFiles(ch, &ready); err != nil {
		return fail(fmt.Errorf("the new sentry did not become ready: %w", err))
	}
	version, err := opts.speak(&ready)
	if err != nil {
		return fail(err)
	}
	var dec *decision
	if version >= commitProtocol {
		// Before the pause: a memfd and a mapping are no work for the
		// blackout.
		if dec, err = newDecision(); err != nil {
			return fail(err)
		}
		defer dec.close()
	}
	if err := opts.fault(OfferReady); err != nil {
		return fail(err)
	}
	if version >= previewProtocol {
		if err := sendPreview(ch, src, ready.Reads); err != nil {
			return fail(err)
		}
	}
	if opts.BeforePause != nil {
		opts.BeforePause()
	}

	// The blackout starts.
	t.PausedAt = Monotonic()
	if err := src.Pause(opts.Deadline); err != nil {
		return fail(err)
	}
	cu.Add(src.Resume)
	if err := opts.fault(OfferPaused); err != nil {
		return fail(err)
	}
	d := &Descriptor{Protocol: version, Mode: ModeTransfer, Version: opts.Version, PID: t.OldPID}
	d.Timing = t
	files, err := src.Prepare(d, ready.Reads)
	if err != nil {
		return fail(err)
	}
	if version < previewProtocol {
		d.Generation = 0
	}
	d.Timing.Formats = d.Compatibles
	cu.Add(src.Abort)
	if err := opts.fault(OfferPrepared); err != nil {
		return fail(err)
	}
	if len(files) != 3 {
		return fail(fmt.Errorf("the sentry gave %d files to hand over, want 3", len(files)))
	}
	d.Files = Files{MemoryFile: 0, GuestListener: 1, ControlListener: 2}
	if dec != nil {
		d.Files.Decision = 3
		files = append(files, dec.file)
	}
	d.Timing.SentAt = Monotonic()
	if err := ch.Send(d, files...); err != nil {
		return fail(fmt.Errorf("sending the handover: %w", err))
	}
	if dec != nil {
		return offerDecided(ch, src, opts, t, ready.PID, dec, fail, func() { committed = true })
	}
	if err := opts.fault(OfferSent); err != nil {
		return fail(err)
	}
	var ack Ack
	if err := recvNoFiles(ch, &ack); err != nil {
		return fail(fmt.Errorf("waiting for the new sentry's acknowledgement: %w", err))
	}
	if !ack.Accepted {
		return fail(fmt.Errorf("the new sentry %q refused the handover: %s", ack.Version, ack.Error))
	}
	if ack.PID != ready.PID {
		return fail(fmt.Errorf("an acknowledgement from pid %d, but the new sentry is pid %d", ack.PID, ready.PID))
	}
	if err := opts.fault(OfferAcked); err != nil {
		return fail(err)
	}
	// The ack was read within the deadline: commit. The new sentry
	// touches nothing before it has this message, so a failed send can
	// still be rolled back (the new one is stopped before anything
	// resumes here); once it is sent, this sentry never rolls back.
	ch.SetDeadline(time.Now().Add(commitSendTimeout))
	if err := ch.Send(&Commit{PID: t.OldPID}); err != nil {
		return fail(fmt.Errorf("committing the handover: %w", err))
	}
	committed = true
	return handOff(ch, src, opts, ack.Timing, false, fail)
}

// sendPreview shows the new sentry what src will hand over to a sentry
// that reads peerReads (protocol 5) and waits until it has read ahead.
func sendPreview(ch *Channel, src Source, peerReads []string) error {
	p := Preview{Kind: previewKind}
	var files []*os.File
	if pv, ok := src.(Previewer); ok {
		if f := pv.Preview(&p, peerReads); f != nil {
			defer f.Close()
			files = append(files, f)
		} else {
			p = Preview{Kind: previewKind}
		}
	}
	if err := ch.Send(&p, files...); err != nil {
		return fmt.Errorf("showing the handover to the new sentry: %w", err)
	}
	var answer Previewed
	if err := recvNoFiles(ch, &answer); err != nil {
		return fmt.Errorf("waiting for the new sentry to read the handover ahead: %w", err)
	}
	if answer.Error != "" {
		return fmt.Errorf("the new sentry refused the preview: %s", answer.Error)
	}
	return nil
}

// handOff is the end of Offer once the restart is committed and t is the
// new sentry's timing: the Source hands off (serving: to a new sentry that
// already serves), then the new sentry's Serving is awaited. Nothing is
// rolled back from here on; an error wraps ErrNotServing.
func handOff(ch *Channel, src Source, opts Options, t Timing, serving bool, fail func(error) (Timing, error)) (Timing, error) {
	if err := opts.fault(OfferCommitted); errors.Is(err, ErrCrash) {
		return fail(err)
	}
	src.Handoff(serving)
	if err := opts.fault(OfferHandedOff); errors.Is(err, ErrCrash) {
		return fail(err)
	}
	ch.SetDeadline(time.Now().Add(opts.servingTimeout()))
	var msg Serving
	if err := recvNoFiles(ch, &msg); err != nil {
		return t, fmt.Errorf("%w: %v", ErrNotServing, err)
	}
	if msg.At < t.ReceivedAt {
		return t, fmt.Errorf("%w: serving at %d, before the descriptor arrived at %d", ErrNotServing, msg.At, t.ReceivedAt)
	}
	t.AcceptingAt = msg.At
	t.Finish()
	if err := opts.fault(OfferConfirmed); errors.Is(err, ErrCrash) {
		return fail(err)
	}
	return t, nil
}

// offerDecided is the rest of Offer once the descriptor of a restart
// decided by the decision word (protocol 4) is sent. The new sentry serves
// the moment it wins the word, and then sends its Ack and Serving. Any
// other outcome — a refusal, the deadline, the channel ending, a fault —
// makes this side try to abandon the word: if that wins, the new sentry
// never commits, and the restart rolls back (fail runs the undo); if it
// loses, the new sentry committed and this side hands off (markCommitted
// stops the undo), whatever it was about to report.
func offerDecided(ch *Channel, src Source, opts Options, t Timing, peer int, dec *decision, fail func(error) (Timing, error), markCommitted func()) (Timing, error) {
	var ack Ack
	acked := false
	err := opts.fault(OfferSent)
	if err == nil {
		if err = recvNoFiles(ch, &ack); err != nil {
			err = fmt.Errorf("waiting for the new sentry's acknowledgement: %w", err)
		}
	}
	if err == nil {
		switch {
		case !ack.Accepted:
			err = fmt.Errorf("the new sentry %q refused the handover: %s", ack.Version, ack.Error)
		case !ack.Committed:
			err = fmt.Errorf("the new sentry %q accepted the handover without committing it (protocol %d)", ack.Version, commitProtocol)
		case ack.PID != peer:
			err = fmt.Errorf("an acknowledgement from pid %d, but the new sentry is pid %d", ack.PID, peer)
		case !dec.committed():
			// It commits before it acks: a peer that broke the
			// protocol, whose restart is abandoned below.
			err = fmt.Errorf("the new sentry %q says it committed, but the decision word does not", ack.Version)
		default:
			acked = true
		}
	}
	if err == nil {
		err = opts.fault(OfferAcked)
	}
	if errors.Is(err, ErrCrash) {
		return fail(err)
	}
	if err != nil && dec.abandon() {
		return fail(err)
	}
	// The new sentry committed (the word is not open, and only this
	// side abandons it): no rollback from here on.
	markCommitted()
	if !acked {
		// Committed before this side gave up: its ack is still to
		// come.
		ch.SetDeadline(time.Now().Add(opts.servingTimeout()))
		rerr := recvNoFiles(ch, &ack)
		if rerr == nil && (!ack.Accepted || !ack.Committed) {
			rerr = fmt.Errorf("its ack says accepted %v, committed %v: %s", ack.Accepted, ack.Committed, ack.Error)
		}
		if rerr != nil {
			if ferr := opts.fault(OfferCommitted); errors.Is(ferr, ErrCrash) {
				return fail(ferr)
			}
			src.Handoff(false)
			return t, fmt.Errorf("%w: it committed (while this side: %v), then %v", ErrNotServing, err, rerr)
		}
	}
	return handOff(ch, src, opts, ack.Timing, true, fail)
}

// Accept is the incoming side of a transfer-mode restart, over ch (which
// it closes). It says Ready, receives and validates the descriptor, boots
// dst from it and acknowledges; it commits dst and serves only after the
// old sentry's Commit. A handover it refuses is answered with a refusal,
// and dst is never committed; an error after the ack means the old sentry
// may have rolled back, and dst is discarded untouched. It returns the
// descriptor and the restart's timing.
func Accept(ch *Channel, dst Target, opts Options) (*Descriptor, Timing, error) {
	defer ch.Close()
	pid := opts.pid()
	if err := opts.fault(AcceptStart); err != nil {
		return nil, Timing{}, err
	}
	ready := &Ready{Protocol: OldestProtocol, Version: opts.Version, PID: pid, Reads: opts.Reads}
	if opts.newest() > OldestProtocol {
		ready.Newest = opts.newest()
	}
	if err := ch.Send(ready); err != nil {
		return nil, Timing{}, fmt.Errorf("saying ready: %w", err)
	}
	if err := opts.fault(AcceptReady); err != nil {
		return nil, Timing{}, err
	}
	d := new(Descriptor)
	files, err := recvDescriptor(ch, dst, d)
	received := Monotonic()
	if err != nil {
		// The old sentry went away or broke the protocol: nothing was
		// handed over.
		return nil, Timing{}, fmt.Errorf("receiving the handover: %w", err)
	}
	refuse := func(err error) (*Descriptor, Timing, error) {
		if !errors.Is(err, ErrCrash) {
			ch.Send(&Ack{Accepted: false, Error: err.Error(), Version: opts.Version, PID: pid})
		}
		return d, d.Timing, fmt.Errorf("handover refused: %w", err)
	}
	if d.Protocol > opts.newest() {
		closeFiles(files)
		return refuse(fmt.Errorf("handover descriptor: protocol %d, this sentry speaks %d to %d", d.Protocol, OldestProtocol, opts.newest()))
	}
	ordered, err := takeFiles(d, files, opts.known, ModeTransfer)
	if err != nil {
		return refuse(err)
	}
	var dec *decision
	if d.decidedByWord() {
		dec, err = openDecision(ordered[3])
		ordered = ordered[:3]
		if err != nil {
			closeFiles(ordered)
			return refuse(err)
		}
	}
	// Closed on every way out: the word is in the old sentry's file.
	defer dec.close()
	t := &d.Timing
	t.ReceivedAt, t.NewPID, t.NewVersion = received, pid, opts.Version
	t.LiveupdateNumber = d.LiveupdateNumber + 1
	if err := opts.fault(AcceptReceived); err != nil {
		closeFiles(ordered)
		return refuse(err)
	}
	if err := dst.Boot(d, ordered, t); err != nil {
		return refuse(err)
	}
	if err := opts.fault(AcceptBooted); err != nil {
		if !errors.Is(err, ErrCrash) {
			dst.Discard()
		}
		return refuse(err)
	}
	untouched := func(err error) (*Descriptor, Timing, error) {
		if !errors.Is(err, ErrCrash) {
			dst.Discard()
		}
		return d, *t, fmt.Errorf("%w (exiting untouched: the old sentry may have rolled back)", err)
	}
	if dec != nil {
		return acceptDecided(ch, dst, opts, d, t, dec, untouched)
	}
	// Until the old sentry has read this, it may still time out and roll
	// back: nothing may be scrubbed and no guest may run. A successful
	// send says only that the ack is in the socket buffer, so wait for
	// the old sentry's Commit, sent once it has read the ack and will
	// never roll back. If the channel ends instead, the old sentry
	// stopped this one too late, died, or rolled back: discard untouched.
	t.AcceptingAt = Monotonic()
	if err := ch.Send(&Ack{Accepted: true, Version: opts.Version, PID: pid, Timing: *t}); err != nil {
		return untouched(fmt.Errorf("acknowledging the handover: %w", err))
	}
	if err := opts.fault(AcceptAcked); err != nil {
		return untouched(err)
	}
	if err := ch.AwaitCommit(d.PID); err != nil {
		return untouched(err)
	}
	if err := opts.fault(AcceptCommitted); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	if err := serve(d, t, dst); err != nil {
		return d, *t, err
	}
	if err := opts.fault(AcceptServing); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	ch.SetDeadline(time.Now().Add(commitSendTimeout))
	if err := ch.Send(&Serving{At: t.AcceptingAt}); err != nil {
		// The old sentry has handed off; it reports the restart as not
		// confirmed, but this sentry serves.
		return d, *t, nil
	}
	if err := opts.fault(AcceptDone); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	return d, *t, nil
}

// recvDescriptor receives the descriptor into d, with its files. From an
// old sentry of protocol 5 a Preview comes first: it is validated and
// handed to dst (if a PreviewTarget) to read ahead, and answered with
// Previewed once dst is done; a malformed one is answered with the error,
// which is returned.
func recvDescriptor(ch *Channel, dst Target, d *Descriptor) ([]*os.File, error) {
	var first json.RawMessage
	files, err := ch.Recv(&first)
	if err != nil {
		return nil, err
	}
	var kind struct {
		Kind *string `json:"kind"`
	}
	if json.Unmarshal(first, &kind) != nil || kind.Kind == nil {
		if err := json.Unmarshal(first, d); err != nil {
			closeFiles(files)
			return nil, fmt.Errorf("decoding %T: %w", d, err)
		}
		return files, nil
	}
	var p Preview
	err = json.Unmarshal(first, &p)
	if err == nil {
		err = p.Validate(len(files))
	}
	if err != nil {
		closeFiles(files)
		ch.Send(&Previewed{Error: err.Error()})
		return nil, err
	}
	if pt, ok := dst.(PreviewTarget); ok && p.Root != 0 {
		pt.Preview(&p, files[0])
	} else {
		closeFiles(files)
	}
	if err := ch.Send(&Previewed{}); err != nil {
		return nil, fmt.Errorf("answering the preview: %w", err)
	}
	return ch.Recv(d)
}

// acceptDecided is the rest of Accept once a handover decided by the
// decision word (protocol 4) is booted: the new sentry takes the word and,
// if it wins, serves at once, then sends its Ack, calls dst.Serving and
// sends Serving. If the old
// sentry abandoned the word first, the old one rolls back (or has): dst is
// discarded untouched. Once the word is won nothing is undone; a send that
// fails then (the old sentry died) is no error: this sentry serves.
func acceptDecided(ch *Channel, dst Target, opts Options, d *Descriptor, t *Timing, dec *decision, untouched func(error) (*Descriptor, Timing, error)) (*Descriptor, Timing, error) {
	if !dec.commit() {
		return untouched(errors.New("the old sentry abandoned the handover before this one could commit it"))
	}
	if err := opts.fault(AcceptCommitted); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	if err := commitTarget(d, t, dst); err != nil {
		return d, *t, err
	}
	if err := opts.fault(AcceptServing); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	// The ack first: the old sentry hands off (its guests are killed)
	// while this one records that it serves.
	ch.SetDeadline(time.Now().Add(commitSendTimeout))
	ackErr := ch.Send(&Ack{Accepted: true, Committed: true, Version: opts.Version, PID: opts.pid(), Timing: *t})
	if err := opts.fault(AcceptAcked); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	dst.Serving(*t)
	if ackErr != nil {
		return d, *t, nil
	}
	if err := ch.Send(&Serving{At: t.AcceptingAt}); err != nil {
		return d, *t, nil
	}
	if err := opts.fault(AcceptDone); errors.Is(err, ErrCrash) {
		return d, *t, err
	}
	return d, *t, nil
}

// serve commits dst and records the finished timing.
func serve(d *Descriptor, t *Timing, dst Target) error {
	if err := commitTarget(d, t, dst); err != nil {
		return err
	}
	dst.Serving(*t)
	return nil
}

// commitTarget commits dst (it serves from then on) and stamps the end of
// the blackout into t.
func commitTarget(d *Descriptor, t *Timing, dst Target) error {
	if err := dst.Commit(d); err != nil {
		return fmt.Errorf("serving after the commit: %w", err)
	}
	t.AcceptingAt = Monotonic()
	t.Finish()
	return nil
}

// takeFiles validates a descriptor that came over a channel with its
// files, which must be of mode, and returns the memory file, guest
// listener and control listener, and the decision file if the descriptor
// has one; the other files are closed. On error
// every file is closed.
func takeFiles(d *Descriptor, files []*os.File, known func(string) bool, mode string) ([]*os.File, error) {
	if err := d.Validate(len(files), known); err != nil {
		closeFiles(files)
		return nil, err
	}
	if d.Mode != mode {
		closeFiles(files)
		return nil, fmt.Errorf("handover descriptor: mode %q over a %s channel", d.Mode, mode)
	}
	ordered := []*os.File{files[d.Files.MemoryFile], files[d.Files.GuestListener], files[d.Files.ControlListener]}
	if d.decidedByWord() {
		ordered = append(ordered, files[d.Files.Decision])
	}
	for _, f := range files {
		if !slices.Contains(ordered, f) {
			f.Close()
		}
	}
	return ordered, nil
}

// RecvRecovery receives, on a spare sentry's channel, the descriptor of a
// recovery (ModeRecover) with its files, named by index: the memory file,
// the guest listener and the control listener, returned in that order.
// The spare then boots with AcceptExec, as a sentry that found the
// descriptor in its environment. On error every file is closed.
func RecvRecovery(ch *Channel, known func(string) bool) (*Descriptor, []*os.File, error) {
	d := new(Descriptor)
	files, err := ch.Recv(d)
	if err != nil {
		return nil, nil, err
	}
	files, err = takeFiles(d, files, known, ModeRecover)
	if err != nil {
		return nil, nil, err
	}
	return d, files, nil
}

// recvNoFiles receives a message that must carry no files.
func recvNoFiles(ch *Channel, msg any) error {
	files, err := ch.Recv(msg)
	if err != nil {
		return err
	}
	if len(files) != 0 {
		closeFiles(files)
		return fmt.Errorf("%T came with %d files", msg, len(files))
	}
	return nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// OfferExec is the outgoing side of an exec-mode restart: it pauses and
// prepares src, makes the files it gives inheritable and calls opts.Exec
// with the descriptor in an environment entry. It returns only if that
// failed, after undoing everything in reverse: the old image goes on
// serving. The new binary must have been checked before (see the "abi"
// command): after a successful execve there is no way back.
func OfferExec(src Source, opts Options) error {
	t := Timing{Mode: ModeExec, OldPID: opts.pid(), OldVersion: opts.Version}
	crashed := false
	var cu cleanup.Cleanup
	defer func() {
		if !crashed {
			cu.Clean()
		}
	}()
	fail := func(err error) error {
		crashed = errors.Is(err, ErrCrash)
		return err
	}
	t.PausedAt = Monotonic()
	if err := src.Pause(opts.Deadline); err != nil {
		return fail(err)
	}
	cu.Add(src.Resume)
	if err := opts.fault(OfferPaused); err != nil {
		return fail(err)
	}
	d := &Descriptor{Protocol: opts.newest(), Mode: ModeExec, Version: opts.Version, PID: t.OldPID, Timing: t}
	files, err := src.Prepare(d, opts.PeerReads)
	d.Generation = 0 // no Preview in exec mode
	if err != nil {
		return fail(err)
	}
	d.Timing.Formats = d.Compatibles
	cu.Add(src.Abort)
	if err := opts.fault(OfferPrepared); err != nil {
		return fail(err)
	}
	if len(files) != 3 {
		return fail(fmt.Errorf("the sentry gave %d files to hand over, want 3", len(files)))
	}
	var fds []int
	cu.Add(func() {
		for _, fd := range fds {
			unix.CloseOnExec(fd)
		}
	})
	for _, f := range files {
		fd, err := Inherit(f)
		if err != nil {
			return fail(err)
		}
		fds = append(fds, fd)
	}
	d.Files = Files{MemoryFile: fds[0], GuestListener: fds[1], ControlListener: fds[2]}
	d.Timing.SentAt = Monotonic()
	env, err := EncodeEnv(d)
	if err != nil {
		return fail(err)
	}
	if err := opts.fault(OfferSent); err != nil {
		return fail(err)
	}
	if opts.Exec == nil {
		return fail(fmt.Errorf("exec-mode restart: no exec function"))
	}
	// Still here after Exec: execve failed, and everything is undone.
	return fail(fmt.Errorf("execve: %w", opts.Exec(env, fds)))
}

// AcceptExec is the incoming side of an exec-mode restart: d and files come
// from DecodeEnv. There is no old sentry to roll back to, so dst is booted,
// committed and served at once; on error the caller must stop the old
// image's guests and report the sandbox lost.
func AcceptExec(d *Descriptor, files []*os.File, dst Target, opts Options) (Timing, error) {
	t := &d.Timing
	t.ReceivedAt, t.NewPID, t.NewVersion = Monotonic(), opts.pid(), opts.Version
	t.LiveupdateNumber = d.LiveupdateNumber + 1
	if err := opts.fault(AcceptReceived); err != nil {
		closeFiles(files)
		return *t, err
	}
	if err := dst.Boot(d, files, t); err != nil {
		return *t, err
	}
	if err := opts.fault(AcceptBooted); err != nil {
		dst.Discard()
		return *t, err
	}
	if err := serve(d, t, dst); err != nil {
		return *t, err
	}
	if err := opts.fault(AcceptServing); errors.Is(err, ErrCrash) {
		return *t, err
	}
	return *t, nil
}
