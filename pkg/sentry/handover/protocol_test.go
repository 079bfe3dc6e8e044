package handover

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// world is the two sentries of one restart as the protocol sees them: each
// method checks that the protocol calls it only when a real sentry could
// take that call, and records the state the outcome is judged on.
type world struct {
	mu sync.Mutex

	t *testing.T
	// mem, guestLn and controlLn are the files the old sentry hands
	// over. (One field a line: checklocks misplaces the annotations of
	// later fields after a line that declares several.)
	mem       *os.File
	guestLn   *os.File
	controlLn *os.File
	// newReads are the formats the new sentry reads.
	newReads []string

	// The old sentry's state: paused, prepared, handedOff, oldDead.
	//
	// +checklocks:mu
	paused bool
	// +checklocks:mu
	prepared bool
	// +checklocks:mu
	handedOff bool
	// +checklocks:mu
	oldDead bool
	// handoffServing is what Handoff was told: the new sentry serves.
	//
	// +checklocks:mu
	handoffServing bool

	// The new sentry's state: booted, committed, serving, discarded,
	// newDead, and what it received.
	//
	// +checklocks:mu
	booted bool
	// +checklocks:mu
	committed bool
	// +checklocks:mu
	serving bool
	// +checklocks:mu
	discarded bool
	// +checklocks:mu
	newDead bool
	// +checklocks:mu
	received []*os.File
	// +checklocks:mu
	timing Timing
	// events are, in order, what the sides' fault hooks and calls
	// record: points, and "serving" for the new side's Serving.
	//
	// +checklocks:mu
	events []string
}

// record appends e to the world's events.
func (w *world) record(e string) {
	w.mu.Lock()
	w.events = append(w.events, e)
	w.mu.Unlock()
}

// worldState is a world's state at one moment.
type worldState struct {
	paused, prepared, handedOff, serving bool
	timing                               Timing
}

// snapshot returns the world's state, for the checks after a restart.
func (w *world) snapshot() worldState {
	w.mu.Lock()
	defer w.mu.Unlock()
	return worldState{paused: w.paused, prepared: w.prepared, handedOff: w.handedOff, serving: w.serving, timing: w.timing}
}

const memContents = "preserved bytes"

func newWorld(t *testing.T) *world {
	fd, err := unix.MemfdCreate("memory-file", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	mem := os.NewFile(uintptr(fd), "memory-file")
	if _, err := mem.WriteString(memContents); err != nil {
		t.Fatal(err)
	}
	g, c, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, mem: mem, guestLn: g, controlLn: c, newReads: []string{"kho-v1", "kho-v2"}}
	t.Cleanup(func() {
		mem.Close()
		g.Close()
		c.Close()
		w.mu.Lock()
		closeFiles(w.received)
		w.mu.Unlock()
	})
	return w
}

func (w *world) violate(format string, args ...any) {
	w.t.Helper()
	w.t.Errorf("protocol violation: "+format, args...)
}

// The old sentry: a Source.
type oldSide struct{ *world }

func (o oldSide) Pause(time.Time) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.paused || o.handedOff {
		o.violate("Pause while paused=%v handedOff=%v", o.paused, o.handedOff)
	}
	o.paused = true
	return nil
}

func (o oldSide) Prepare(d *Descriptor, peerReads []string) ([]*os.File, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.paused || o.prepared {
		o.violate("Prepare while paused=%v prepared=%v", o.paused, o.prepared)
	}
	if !slices.Contains(peerReads, "kho-v1") {
		return nil, fmt.Errorf("no common format: this sentry writes %q, the next reads %q", "kho-v1", peerReads)
	}
	o.prepared = true
	d.Root, d.LiveupdateNumber, d.MemorySize = 0x1000, 7, 1<<20
	d.Compatibles = []string{"kho-v1"}
	d.Timing.Freeze, d.Timing.Finalize = time.Millisecond, time.Millisecond
	return []*os.File{o.mem, o.guestLn, o.controlLn}, nil
}

func (o oldSide) Abort() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.prepared || o.handedOff {
		o.violate("Abort while prepared=%v handedOff=%v", o.prepared, o.handedOff)
	}
	o.prepared = false
}

func (o oldSide) Resume() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.paused || o.prepared || o.handedOff {
		o.violate("Resume while paused=%v prepared=%v (Abort must come first) handedOff=%v", o.paused, o.prepared, o.handedOff)
	}
	if o.booted && !o.discarded && !o.newDead {
		o.violate("Resume while the new sentry is still alive with the state booted")
	}
	o.paused = false
}

func (o oldSide) Handoff(serving bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.handoffServing = serving
	if serving && !o.committed {
		o.violate("Handoff(serving) before the new sentry committed")
	}
	if !o.paused || !o.prepared || o.handedOff {
		o.violate("Handoff while paused=%v prepared=%v handedOff=%v", o.paused, o.prepared, o.handedOff)
	}
	o.handedOff = true
}

// The new sentry: a Target.
type newSide struct{ *world }

func (n newSide) Boot(d *Descriptor, files []*os.File, t *Timing) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.received = files
	buf := make([]byte, len(memContents))
	if _, err := files[0].ReadAt(buf, 0); err != nil || string(buf) != memContents {
		n.violate("the memory file received reads %q, %v", buf, err)
	}
	t.Map, t.Ingest, t.LUO = time.Microsecond, time.Microsecond, time.Microsecond
	n.booted = true
	return nil
}

func (n newSide) Commit(*Descriptor) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.booted || n.discarded || n.committed {
		n.violate("Commit while booted=%v discarded=%v committed=%v", n.booted, n.discarded, n.committed)
	}
	if !n.handedOff && !n.oldDead {
		// The Commit message is sent before Handoff runs; give it a
		// moment rather than racing the old side's goroutine.
		n.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
		n.mu.Lock()
	}
	if n.paused && !n.prepared {
		n.violate("Commit while the old sentry has rolled back")
	}
	n.committed = true
	return nil
}

func (n newSide) Serving(t Timing) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.committed {
		n.violate("Serving before Commit")
	}
	n.serving, n.timing = true, t
	n.events = append(n.events, "serving")
}

func (n newSide) Discard() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.booted || n.committed || n.discarded {
		n.violate("Discard while booted=%v committed=%v discarded=%v", n.booted, n.committed, n.discarded)
	}
	n.discarded = true
}

// outcome is how one restart ended.
type outcome struct {
	offerErr, acceptErr  error
	oldServes, newServes bool
	// holders is how many live sentries still hold the memory file.
	holders int
	// timing is what Offer returned.
	timing Timing
}

// restart runs both sides in this process over a socket pair, with the
// given fault hooks and the outgoing deadline; protos, if given, are the
// newest protocol versions the old and the new side speak.
func restart(t *testing.T, w *world, offerFault, acceptFault func(Point) error, deadline time.Duration, protos ...int) outcome {
	protos = append(protos, 0, 0)
	oldCh, newCh := channelPair(t)
	// A crash kills the process at the point itself.
	crashing := func(f func(Point) error, old bool) func(Point) error {
		if f == nil {
			return nil
		}
		return func(p Point) error {
			err := f(p)
			if errors.Is(err, ErrCrash) {
				w.mu.Lock()
				if old {
					w.oldDead = true
				} else {
					w.newDead = true
				}
				w.mu.Unlock()
			}
			return err
		}
	}
	offerFault, acceptFault = crashing(offerFault, true), crashing(acceptFault, false)
	acceptDone := make(chan error, 1)
	go func() {
		_, _, err := Accept(newCh, newSide{w}, Options{Version: "new", PID: 200, Reads: w.newReads, Fault: acceptFault, Protocol: protos[1]})
		acceptDone <- err
	}()
	var acceptErr error
	acceptFinished := false
	waitAccept := func() {
		if acceptFinished {
			return
		}
		select {
		case acceptErr = <-acceptDone:
			acceptFinished = true
		case <-time.After(10 * time.Second):
			t.Fatal("the incoming side hangs")
		}
	}
	stopPeer := func() {
		// SIGKILL: the process is gone, and its end of the channel
		// with it.
		w.mu.Lock()
		w.newDead = true
		w.mu.Unlock()
		newCh.Close()
		waitAccept()
	}
	tm, offerErr := Offer(oldCh, oldSide{w}, Options{Version: "old", PID: 100, Deadline: time.Now().Add(deadline), ServingTimeout: time.Second, StopPeer: stopPeer, Fault: offerFault, Protocol: protos[0]})
	waitAccept()
	w.mu.Lock()
	defer w.mu.Unlock()
	o := outcome{offerErr: offerErr, acceptErr: acceptErr, timing: tm}
	o.oldServes = !w.oldDead && !w.paused && !w.handedOff
	o.newServes = !w.newDead && w.serving && !w.discarded
	if !w.oldDead && !w.handedOff {
		o.holders++
	}
	if !w.newDead && w.booted && !w.discarded {
		o.holders++
	}
	return o
}

// at returns a fault hook that returns err at point p.
func at(p Point, err error) func(Point) error {
	return func(q Point) error {
		if q == p {
			return err
		}
		return nil
	}
}

var errInjected = errors.New("injected failure")

func TestRestartOutcomeAtEveryFaultPoint(t *testing.T) {
	type want int
	const (
		same         want = iota // (want4 only) as in protocol 3
		oldServes                // rolled back: the old sentry serves, the restart failed
		newServes                // handed over: the new sentry serves, the restart succeeded
		lostReported             // neither serves, nobody holds the memory file, and Offer said so
		eitherOldOrLost
		eitherOldOrNew // the old side gave up while the new one decided: whichever won the decision word
		newDiesAfter   // the new sentry died after the restart completed
	)
	// slow makes a side sleep 400 ms at a point, past a 200 ms deadline.
	slow := func(p Point) func(Point) error {
		return func(q Point) error {
			if q == p {
				time.Sleep(400 * time.Millisecond)
			}
			return nil
		}
	}
	tests := []struct {
		name          string
		offer, accept func(Point) error
		// short: the old side's deadline is 200 ms.
		short bool
		// want is the outcome in protocol 3 (decided by the ack and the
		// Commit), want4 in protocol 4 (the decision word) if it
		// differs.
		want, want4 want
	}{
		{name: "a restart without faults hands over", want: newServes},
		{name: "a failure after ready rolls back", offer: at(OfferReady, errInjected), want: oldServes},
		{name: "a failure after pause rolls back", offer: at(OfferPaused, errInjected), want: oldServes},
		{name: "a failure after prepare rolls back", offer: at(OfferPrepared, errInjected), want: oldServes},
		{name: "a failure after the send rolls back (4: unless the new sentry won the word)", offer: at(OfferSent, errInjected), want: oldServes, want4: eitherOldOrNew},
		{name: "a failure after the ack rolls back (4: the new sentry had won the word)", offer: at(OfferAcked, errInjected), want: oldServes, want4: newServes},
		{name: "a failure after the commit changes nothing", offer: at(OfferCommitted, errInjected), want: newServes},
		{name: "a failure after the handoff changes nothing", offer: at(OfferHandedOff, errInjected), want: newServes},
		{name: "the old sentry dying after ready loses the sandbox, reported", offer: at(OfferReady, ErrCrash), want: lostReported},
		{name: "the old sentry dying paused loses the sandbox, reported", offer: at(OfferPaused, ErrCrash), want: lostReported},
		{name: "the old sentry dying prepared loses the sandbox, reported", offer: at(OfferPrepared, ErrCrash), want: lostReported},
		{name: "the old sentry dying after the send: the new one exits untouched (4: serves)", offer: at(OfferSent, ErrCrash), want: lostReported, want4: newServes},
		{name: "the old sentry dying after the ack: the new one exits untouched (4: serves)", offer: at(OfferAcked, ErrCrash), want: lostReported, want4: newServes},
		{name: "the old sentry dying after the commit: the new one serves", offer: at(OfferCommitted, ErrCrash), want: newServes},
		{name: "the old sentry dying after the handoff: the new one serves", offer: at(OfferHandedOff, ErrCrash), want: newServes},
		{name: "the old sentry dying after the confirmation: the new one serves", offer: at(OfferConfirmed, ErrCrash), want: newServes},
		{name: "the new sentry failing at start rolls back", accept: at(AcceptStart, errInjected), want: oldServes},
		{name: "the new sentry failing after ready rolls back", accept: at(AcceptReady, errInjected), want: oldServes},
		{name: "the new sentry refusing the descriptor rolls back", accept: at(AcceptReceived, errInjected), want: oldServes},
		{name: "the new sentry failing after boot rolls back", accept: at(AcceptBooted, errInjected), want: oldServes},
		{name: "the new sentry dying at start rolls back", accept: at(AcceptStart, ErrCrash), want: oldServes},
		{name: "the new sentry dying after ready rolls back", accept: at(AcceptReady, ErrCrash), want: oldServes},
		{name: "the new sentry dying with the descriptor rolls back", accept: at(AcceptReceived, ErrCrash), want: oldServes},
		{name: "the new sentry dying booted rolls back", accept: at(AcceptBooted, ErrCrash), want: oldServes},
		{name: "the new sentry dying after its ack: rolled back or lost, never silently", accept: at(AcceptAcked, ErrCrash), want: eitherOldOrLost},
		{name: "the new sentry dying after the commit is reported lost", accept: at(AcceptCommitted, ErrCrash), want: lostReported},
		{name: "the new sentry dying serving, before saying so, is reported lost", accept: at(AcceptServing, ErrCrash), want: lostReported},
		{name: "the new sentry dying after saying it serves is a later crash", accept: at(AcceptDone, ErrCrash), want: newDiesAfter},
		{
			name:  "an ack read after the deadline rolls back and the new sentry never serves (4: it had won the word)",
			offer: slow(OfferSent), short: true,
			want: oldServes, want4: newServes,
		},
		{
			name:   "a new sentry deciding after the deadline never serves",
			accept: slow(AcceptBooted), short: true,
			want: oldServes,
		},
	}
	for _, proto := range []int{OldestProtocol, commitProtocol, ProtocolVersion} {
		for _, tc := range tests {
			t.Run(fmt.Sprintf("protocol %d/%s", proto, tc.name), func(t *testing.T) {
				want := tc.want
				if proto >= commitProtocol && tc.want4 != same {
					want = tc.want4
				}
				w := newWorld(t)
				deadline := 5 * time.Second
				if tc.short {
					deadline = 200 * time.Millisecond
				}
				o := restart(t, w, tc.offer, tc.accept, deadline, proto, proto)
				if o.oldServes && o.newServes {
					t.Fatalf("both sentries serve: %+v", o)
				}
				if !o.oldServes && !o.newServes && o.holders > 0 {
					t.Fatalf("neither sentry serves while %d holds the memory file: %+v", o.holders, o)
				}
				if want == eitherOldOrNew {
					want = oldServes
					if o.newServes {
						want = newServes
					}
				}
				switch want {
				case oldServes:
					if !o.oldServes || o.offerErr == nil || errors.Is(o.offerErr, ErrNotServing) {
						t.Fatalf("want a rollback with the old sentry serving and an error: %+v", o)
					}
				case newServes:
					if !o.newServes {
						t.Fatalf("want the new sentry serving: %+v", o)
					}
					if o.offerErr != nil && !errors.Is(o.offerErr, ErrCrash) {
						t.Fatalf("the restart handed over but Offer says %v", o.offerErr)
					}
					if o.acceptErr != nil {
						t.Fatalf("Accept: %v", o.acceptErr)
					}
					if tm := w.snapshot().timing; tm.Blackout <= 0 || tm.NewPID != 200 || tm.OldPID != 100 || tm.LiveupdateNumber != 8 {
						t.Fatalf("timing %+v", tm)
					}
					if o.offerErr == nil && o.timing.Blackout != w.snapshot().timing.Blackout {
						t.Fatalf("the old side's blackout %v, the new side's %v", o.timing.Blackout, w.snapshot().timing.Blackout)
					}
				case lostReported:
					if o.oldServes || o.newServes || o.offerErr == nil {
						t.Fatalf("want neither serving and an error: %+v", o)
					}
				case eitherOldOrLost:
					if o.newServes || o.offerErr == nil {
						t.Fatalf("want a rollback or a reported loss: %+v", o)
					}
				case newDiesAfter:
					if o.offerErr != nil || !w.snapshot().serving {
						t.Fatalf("want a completed restart: %+v", o)
					}
				}
			})
		}
	}
}

// Builds of protocol 3 and 4 restart into each other, speaking 3 (and two
// of protocol 4 speak 4): the
// upgrade to a build deciding by the decision word, and the way back.
func TestSentriesSpeakTheNewestProtocolBothKnow(t *testing.T) {
	for _, tc := range []struct{ old, new int }{{3, 4}, {4, 3}, {4, 4}} {
		t.Run(fmt.Sprintf("old %d, new %d", tc.old, tc.new), func(t *testing.T) {
			w := newWorld(t)
			record := func(p Point) error {
				w.record(string(p))
				return nil
			}
			o := restart(t, w, nil, record, 5*time.Second, tc.old, tc.new)
			if !o.newServes || o.offerErr != nil || o.acceptErr != nil {
				t.Fatalf("want a handover: %+v", o)
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			// Protocol 3 acks before it commits, and its old side hands
			// off before the new one serves; 4 commits first, then
			// acks, and its old side hands off to a serving sentry.
			// Both ack before they record that they serve (Serving,
			// the state file).
			acked, committed, serving := slices.Index(w.events, string(AcceptAcked)), slices.Index(w.events, string(AcceptCommitted)), slices.Index(w.events, "serving")
			decided := min(tc.old, tc.new) >= commitProtocol
			if decided != (committed < acked) || acked > serving || decided != w.handoffServing {
				t.Fatalf("events %v, handoff to a serving sentry %v: decided by the word %v", w.events, w.handoffServing, decided)
			}
		})
	}
}

func TestExecRestartRollsBackAtEveryFaultPoint(t *testing.T) {
	for _, p := range []Point{OfferPaused, OfferPrepared, OfferSent, ""} {
		for _, crash := range []bool{false, true} {
			if p == "" && crash {
				continue
			}
			name := fmt.Sprintf("a failure at %s", p)
			if p == "" {
				name = "a failed execve"
			}
			if crash {
				name = fmt.Sprintf("a crash at %s", p)
			}
			t.Run(name, func(t *testing.T) {
				w := newWorld(t)
				fault := func(Point) error { return nil }
				if p != "" {
					e := errInjected
					if crash {
						e = ErrCrash
					}
					fault = at(p, e)
				}
				var env string
				err := OfferExec(oldSide{w}, Options{Version: "old", PID: 100, Deadline: time.Now().Add(time.Second), PeerReads: w.newReads, Fault: fault, Exec: func(e string, _ []int) error {
					env = e
					return unix.ENOENT
				}})
				if err == nil {
					t.Fatal("OfferExec returned nil")
				}
				if crash {
					return
				}
				if st := w.snapshot(); st.paused || st.prepared || st.handedOff {
					t.Fatalf("not rolled back: paused=%v prepared=%v handedOff=%v", st.paused, st.prepared, st.handedOff)
				}
				for _, f := range []*os.File{w.mem, w.guestLn, w.controlLn} {
					if fl, _ := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
						t.Errorf("fd %d lost FD_CLOEXEC after the rollback", f.Fd())
					}
				}
				if p == "" {
					if !errors.Is(err, unix.ENOENT) || !strings.HasPrefix(env, EnvDescriptor+"=") {
						t.Fatalf("err %v, env %q", err, env)
					}
				}
			})
		}
	}
}

func TestExecRestartHandsOverThroughTheEnvironment(t *testing.T) {
	w := newWorld(t)
	var env string
	OfferExec(oldSide{w}, Options{Version: "old", PID: 100, Deadline: time.Now().Add(time.Second), PeerReads: w.newReads, Exec: func(e string, _ []int) error {
		env = e
		return unix.ENOENT
	}})
	// Replay what the new image would see: the variable and the fds
	// (still open here, as execve would have kept them).
	name, value, _ := strings.Cut(env, "=")
	t.Setenv(name, value)
	d, files, ok, err := DecodeEnv(func(c string) bool { return c == "kho-v1" })
	if !ok || err != nil {
		t.Fatalf("DecodeEnv: ok %v, %v", ok, err)
	}
	if _, set := os.LookupEnv(EnvDescriptor); set {
		t.Errorf("DecodeEnv left %s in the environment", EnvDescriptor)
	}
	// DecodeEnv wraps the inherited fds; they are the world's own here.
	files = files[:0]
	for _, f := range []*os.File{w.mem, w.guestLn, w.controlLn} {
		g, err := unix.Dup(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, os.NewFile(uintptr(g), "dup"))
	}
	var points []Point
	tm, err := AcceptExec(d, files, newSide{w}, Options{Version: "new", PID: 100, Fault: func(p Point) error {
		points = append(points, p)
		return nil
	}})
	if err != nil {
		t.Fatalf("AcceptExec: %v", err)
	}
	if !w.snapshot().serving || tm.Mode != ModeExec || tm.LiveupdateNumber != 8 || tm.Blackout <= 0 {
		t.Fatalf("serving %v, timing %+v", w.snapshot().serving, tm)
	}
	if want := []Point{AcceptReceived, AcceptBooted, AcceptServing}; !slices.Equal(points, want) {
		t.Errorf("AcceptExec passed %v, want %v", points, want)
	}
}

func TestARestartToASentryReadingNoFormatOfOursRollsBack(t *testing.T) {
	w := newWorld(t)
	w.newReads = []string{"kho-v9"}
	o := restart(t, w, nil, nil, 5*time.Second)
	if !o.oldServes || o.newServes || o.offerErr == nil || !strings.Contains(o.offerErr.Error(), `"kho-v9"`) {
		t.Fatalf("want a rollback naming the new sentry's formats: %+v", o)
	}
}

func TestOfferRefusesAPeerOfAnotherProtocol(t *testing.T) {
	w := newWorld(t)
	oldCh, newCh := channelPair(t)
	defer newCh.Close()
	go newCh.Send(&Ready{Protocol: ProtocolVersion + 1, Version: "future", PID: 9})
	stopped := false
	_, err := Offer(oldCh, oldSide{w}, Options{Deadline: time.Now().Add(time.Second), StopPeer: func() { stopped = true }})
	if err == nil || !strings.Contains(err.Error(), "protocol") || !stopped || w.snapshot().paused {
		t.Fatalf("Offer: %v, peer stopped %v, paused %v", err, stopped, w.snapshot().paused)
	}
	var d Descriptor
	if _, err := newCh.Recv(&d); !errors.Is(err, io.EOF) {
		t.Fatalf("the peer received %v, want EOF", err)
	}
}

func TestBeforePauseRunsOnceTheNewSentryIsReadyAndBeforeThePause(t *testing.T) {
	w := newWorld(t)
	oldCh, newCh := channelPair(t)
	// A peer that says Ready and then goes away: the restart rolls back
	// after the pause.
	go func() {
		newCh.Send(&Ready{Protocol: ProtocolVersion, Version: "new", PID: 9})
		answerPreview(newCh)
		var d Descriptor
		newCh.Recv(&d)
		newCh.Close()
	}()
	calls, pausedThen := 0, false
	_, err := Offer(oldCh, oldSide{w}, Options{
		Deadline: time.Now().Add(5 * time.Second),
		StopPeer: func() {},
		BeforePause: func() {
			calls++
			pausedThen = w.snapshot().paused
		},
	})
	if err == nil {
		t.Fatal("Offer to a peer that went away succeeded")
	}
	if calls != 1 || pausedThen {
		t.Fatalf("BeforePause was called %d times, the old side paused then: %v; want once, before the pause", calls, pausedThen)
	}
	if st := w.snapshot(); st.paused || st.handedOff {
		t.Fatalf("after the rollback the old side is paused %v, handed off %v", st.paused, st.handedOff)
	}
}

// answerPreview is a hand-made new side's answer to the Preview an old
// side of protocol 5 or later sends first.
func answerPreview(ch *Channel) {
	var p Preview
	files, _ := ch.Recv(&p)
	closeFiles(files)
	ch.Send(&Previewed{})
}

// decisionFile returns a memfd of size bytes with seals, holding word.
func decisionFile(t *testing.T, size int64, seals int, word uint32) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("decision", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "decision")
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], word)
	if _, err := f.WriteAt(b[:], 0); err != nil {
		t.Fatal(err)
	}
	if seals != 0 {
		if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, seals); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// A new sentry refuses, naming files.decision, a decision file that the
// old sentry could shrink under it (its access would fault), of another
// size, or already decided; it takes a good one.
func TestTheNewSentryRefusesABadDecisionFile(t *testing.T) {
	tests := []struct {
		name  string
		file  func(t *testing.T) *os.File
		wantE string
	}{
		{"a good one is taken", func(t *testing.T) *os.File { return decisionFile(t, 4096, decisionSeals, decisionOpen) }, ""},
		{"an unsealed memfd is refused", func(t *testing.T) *os.File { return decisionFile(t, 4096, 0, decisionOpen) }, "files.decision has seals 0x0"},
		{"a larger one is refused", func(t *testing.T) *os.File { return decisionFile(t, 8192, decisionSeals, decisionOpen) }, "files.decision is 8192 bytes"},
		{"one already abandoned is refused", func(t *testing.T) *os.File { return decisionFile(t, 4096, decisionSeals, decisionAbandoned) }, "files.decision holds 2"},
		{"a pipe is refused", func(t *testing.T) *os.File {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close(); w.Close() })
			return r
		}, "files.decision is not a memfd"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			oldCh, newCh := channelPair(t)
			done := make(chan error, 1)
			go func() {
				_, _, err := Accept(newCh, newSide{w}, Options{Version: "new", PID: 200, Reads: w.newReads})
				done <- err
			}()
			var ready Ready
			if _, err := oldCh.Recv(&ready); err != nil || ready.Newest != ProtocolVersion || ready.Protocol != OldestProtocol {
				t.Fatalf("ready %+v, %v", ready, err)
			}
			d := goodDescriptor()
			d.Compatibles = []string{"kho-v1"}
			d.Root, d.MemorySize = 0x1000, 1<<20
			if err := oldCh.Send(&d, w.mem, w.guestLn, w.controlLn, tc.file(t)); err != nil {
				t.Fatal(err)
			}
			var ack Ack
			if _, err := oldCh.Recv(&ack); err != nil {
				t.Fatal(err)
			}
			if tc.wantE == "" {
				if !ack.Accepted || !ack.Committed {
					t.Fatalf("ack %+v, want accepted and committed", ack)
				}
				if err := <-done; err != nil {
					t.Fatalf("Accept: %v", err)
				}
				return
			}
			if ack.Accepted || !strings.Contains(ack.Error, tc.wantE) {
				t.Fatalf("ack %+v, want a refusal containing %q", ack, tc.wantE)
			}
			if err := <-done; err == nil {
				t.Fatal("Accept returned nil after refusing")
			}
			if st := w.snapshot(); st.serving {
				t.Fatal("the new side serves after refusing")
			}
		})
	}
}

// openAgain opens the decision file of old as the new sentry does, through
// a file descriptor of its own.
func openAgain(t *testing.T, old *decision) *decision {
	t.Helper()
	fd, err := unix.FcntlInt(old.file.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	nw, err := openDecision(os.NewFile(uintptr(fd), "decision"))
	if err != nil {
		t.Fatal(err)
	}
	return nw
}

// The word decides once: whichever side swaps first wins, and the other's
// swap fails, across processes' mappings of one file as here across two.
func TestTheDecisionWordDecidesOnce(t *testing.T) {
	for _, newFirst := range []bool{true, false} {
		old, err := newDecision()
		if err != nil {
			t.Fatal(err)
		}
		nw := openAgain(t, old)
		if newFirst {
			if !nw.commit() || old.abandon() || !old.committed() {
				t.Fatal("the new side's commit did not win, or the old side could still abandon")
			}
		} else {
			if !old.abandon() || nw.commit() || nw.committed() {
				t.Fatal("the old side's abandon did not win, or the new side could still commit")
			}
		}
		old.close()
		nw.close()
	}
}

// The decision file's page exists before the pause, and the new sentry's
// mapping holds it from the start: no page is allocated, and no fault
// taken, for the word inside the blackout.
func TestTheDecisionPageIsInMemoryBeforeThePause(t *testing.T) {
	old, err := newDecision()
	if err != nil {
		t.Fatal(err)
	}
	defer old.close()
	var st unix.Stat_t
	if err := unix.Fstat(int(old.file.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks == 0 {
		t.Fatal("the decision file has no page allocated once the old sentry made it")
	}
	nw := openAgain(t, old)
	defer nw.close()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var before, after unix.Rusage
	unix.Getrusage(unix.RUSAGE_THREAD, &before)
	committed := nw.commit()
	unix.Getrusage(unix.RUSAGE_THREAD, &after)
	if !committed {
		t.Fatal("the commit lost on an open word")
	}
	if n := after.Minflt - before.Minflt; n != 0 {
		t.Errorf("the new sentry's commit took %d page faults: its mapping of the word was not populated", n)
	}
}

// An ack that says committed from a new sentry that never took the
// decision word is a broken peer: the old side abandons the word and rolls
// back, rather than handing off to it.
func TestAnAckClaimingACommitTheWordDoesNotShowRollsBack(t *testing.T) {
	w := newWorld(t)
	oldCh, newCh := channelPair(t)
	go func() {
		newCh.Send(&Ready{Protocol: OldestProtocol, Newest: ProtocolVersion, Version: "liar", PID: 9, Reads: w.newReads})
		answerPreview(newCh)
		var d Descriptor
		files, err := newCh.Recv(&d)
		closeFiles(files)
		if err == nil {
			newCh.Send(&Ack{Accepted: true, Committed: true, Version: "liar", PID: 9})
		}
	}()
	stopped := false
	_, err := Offer(oldCh, oldSide{w}, Options{Deadline: time.Now().Add(5 * time.Second), StopPeer: func() { stopped = true }})
	if err == nil || errors.Is(err, ErrNotServing) || !strings.Contains(err.Error(), "decision word does not") {
		t.Fatalf("Offer: %v; want a rollback naming the decision word", err)
	}
	if st := w.snapshot(); st.paused || st.prepared || st.handedOff || !stopped {
		t.Fatalf("after the rollback: paused %v, prepared %v, handed off %v, peer stopped %v", st.paused, st.prepared, st.handedOff, stopped)
	}
}
