package boot

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
)

// sandboxWithData boots a sentry cold in a new root and gives it, through
// a guest connection, 8 MiB in a memfd that is not preserved and one
// preserved memfd in session "keep".
func sandboxWithData(t *testing.T) (*Sentry, *guest.Conn, int, []byte) {
	t.Helper()
	// A short root: Unix socket paths are limited to 108 bytes.
	root, err := os.MkdirTemp("", "boot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	s, err := New(sandbox.Config{ID: "b", Root: root, MemorySize: 64 << 20}, Options{Version: "old"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(); err != nil {
		t.Fatal(err)
	}
	g, err := guest.Dial(sandbox.GuestPath(root, "b"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Disconnect() })
	unpreserved, err := g.MemfdCreate("unpreserved", 0)
	if err != nil {
		t.Fatal(err)
	}
	pat := bytes.Repeat([]byte{0xAB}, 8<<20)
	if n, err := g.Write(unpreserved, pat); err != nil || n != len(pat) {
		t.Fatalf("write: %d, %v", n, err)
	}
	dev, err := g.OpenLiveUpdate()
	if err != nil {
		t.Fatal(err)
	}
	sess, err := g.CreateSession(dev, "keep")
	if err != nil {
		t.Fatal(err)
	}
	p, err := g.MemfdCreate("p", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Write(p, []byte("preserved")); err != nil {
		t.Fatal(err)
	}
	if err := g.PreserveFD(sess, p, 1); err != nil {
		t.Fatal(err)
	}
	return s, g, unpreserved, pat
}

// restartInProcess runs both sides of a transfer-mode restart of s in this
// process: the real Source and Target over a socket pair. With holdNew, the
// new side, booted, waits before it decides until the old side stops it
// (handover.Options.StopPeer): it decides after the old side gave up.
func restartInProcess(t *testing.T, s *Sentry, deadline time.Duration, offerFault func(handover.Point) error, holdNew bool) (*incoming, handover.Timing, error) {
	t.Helper()
	ch, peer, err := handover.Pair()
	if err != nil {
		t.Fatal(err)
	}
	newCh, err := handover.NewChannel(peer)
	if err != nil {
		t.Fatal(err)
	}
	in := &incoming{opts: Options{Version: "new"}, control: prepareControl()}
	accepted := make(chan error, 1)
	stopping := make(chan struct{})
	acceptFault := func(p handover.Point) error {
		if holdNew && p == handover.AcceptBooted {
			select {
			case <-stopping:
			case <-time.After(10 * time.Second):
				t.Error("the old side never stopped the new one")
			}
		}
		return nil
	}
	go func() {
		_, _, err := handover.Accept(newCh, in, handover.Options{Version: "new", Reads: kernel.Reads(), Fault: acceptFault})
		accepted <- err
	}()
	var acceptErr error
	waited := false
	wait := func() {
		if !waited {
			acceptErr, waited = <-accepted, true
		}
	}
	tm, err := handover.Offer(ch, &outgoing{s: s, mode: handover.ModeTransfer, fault: offerFault}, handover.Options{
		Version: "old", Deadline: time.Now().Add(deadline), Fault: offerFault,
		StopPeer: func() {
			close(stopping)
			newCh.Close()
			wait()
		},
	})
	wait()
	if err == nil && acceptErr != nil {
		t.Fatalf("Offer succeeded, Accept: %v", acceptErr)
	}
	return in, tm, err
}

// A new sentry that comes to its decision only after the old sentry's
// deadline rolls back: the old one abandoned the decision word first, and
// the new sentry, booted, must not commit (scrub what was not preserved)
// or serve. Then a restart without the delay hands the preserved memfd
// over.
func TestANewSentryDecidingTooLateRollsBackWithNothingScrubbed(t *testing.T) {
	s, g, unpreserved, pat := sandboxWithData(t)
	in, _, err := restartInProcess(t, s, 300*time.Millisecond, nil, true)
	if err == nil {
		t.Fatal("the restart succeeded although the new sentry decided after the deadline")
	}
	if in.s == nil {
		t.Fatalf("the new sentry never booted: %v", err)
	}
	// The rolled-back sentry serves the same guest connection, with its
	// unpreserved memory intact.
	got := make([]byte, len(pat))
	if n, err := g.Pread(unpreserved, got, 0); err != nil || n != len(pat) {
		t.Fatalf("pread after the rollback: %d, %v", n, err)
	}
	if !bytes.Equal(got, pat) {
		t.Fatalf("the unpreserved memfd changed across the rolled-back restart: %d of %d bytes are zero", bytes.Count(got, []byte{0}), len(got))
	}
	if s.isHandedOver() {
		t.Fatal("the old sentry handed over")
	}

	in, tm, err := restartInProcess(t, s, 5*time.Second, nil, false)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	defer in.s.Stop(0, "test done")
	if !s.isHandedOver() || tm.LiveupdateNumber != 1 || tm.Blackout <= 0 || tm.OldVersion != "old" || tm.NewVersion != "new" {
		t.Fatalf("handed over %v, timing %+v", s.isHandedOver(), tm)
	}
	// The old sentry dropped its guests; a new guest reaches the new
	// sentry on the same socket and retrieves the preserved memfd.
	if _, err := g.Fstat(unpreserved); err == nil {
		t.Error("the old sentry still serves its guest after the handoff")
	}
	g2, err := guest.Dial(sandbox.GuestPath(s.cfg.Root, s.cfg.ID))
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Disconnect()
	dev, err := g2.OpenLiveUpdate()
	if err != nil {
		t.Fatal(err)
	}
	sess, err := g2.RetrieveSession(dev, "keep")
	if err != nil {
		t.Fatal(err)
	}
	fd, err := g2.RetrieveFD(sess, 1)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 9)
	if n, err := g2.Pread(fd, buf, 0); err != nil || string(buf[:n]) != "preserved" {
		t.Fatalf("the preserved memfd reads %q, %v", buf[:n], err)
	}
	st, err := sandbox.ReadState(s.cfg.Root, s.cfg.ID)
	if err != nil || st.PID != os.Getpid() || st.LastRestart == nil || st.LastRestart.Generation != 1 {
		t.Fatalf("state after the restart: %+v, %v", st, err)
	}
}

// A failure injected at each step of the old side before the decision
// rolls back onto a serving sentry whose preserved and unpreserved data
// are intact, and a later restart still hands over. (The new side, booted,
// decides only once the old one has given up.)
func TestEveryOutgoingFailureRollsBackOntoIntactData(t *testing.T) {
	s, g, unpreserved, pat := sandboxWithData(t)
	injected := errors.New("injected")
	for _, p := range []handover.Point{handover.OfferReady, handover.OfferPaused, handover.OfferPrepared, handover.OfferSent} {
		_, _, err := restartInProcess(t, s, 5*time.Second, func(q handover.Point) error {
			if q == p {
				return injected
			}
			return nil
		}, true)
		if !errors.Is(err, injected) {
			t.Fatalf("a failure at %s: %v", p, err)
		}
		got := make([]byte, len(pat))
		if n, err := g.Pread(unpreserved, got, 0); err != nil || n != len(pat) || !bytes.Equal(got, pat) {
			t.Fatalf("after a failure at %s: pread %d, %v, equal %v", p, n, err, bytes.Equal(got, pat))
		}
	}
	in, _, err := restartInProcess(t, s, 5*time.Second, nil, false)
	if err != nil {
		t.Fatalf("restart after the rollbacks: %v", err)
	}
	in.s.Stop(0, "test done")
}

// The new sentry serves control calls through the control server prepared
// before the pause (prepareControl), bound to it at the boot: urpc's
// registration is not paid inside the blackout.
func TestTheNewSentryServesControlCallsThroughThePreparedServer(t *testing.T) {
	s, _, _, _ := sandboxWithData(t)
	in, _, err := restartInProcess(t, s, 5*time.Second, nil, false)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	defer in.s.Stop(0, "test done")
	if prepared := in.control(); in.s.server != prepared.server || prepared.c.s != in.s {
		t.Fatal("the new sentry built a control server of its own inside the blackout")
	}
	var st sandbox.State
	if err := sandbox.Call(s.cfg.Root, s.cfg.ID, MethodState, &Empty{}, &st); err != nil {
		t.Fatalf("%s: %v", MethodState, err)
	}
	if st.LastRestart == nil || st.LastRestart.Generation != 1 || st.LastRestart.Timing.NewVersion != "new" {
		t.Fatalf("%s answers %+v, not the new sentry's state", MethodState, st.LastRestart)
	}
}

// The supervisor's frozen-root notice is in its socket before anything
// after the pause may rewrite the root page (LUO's freeze, KHO's finalize,
// the new sentry's ingest) and so before the descriptor leaves, however
// slow it is to send; and a rollback's Thawed comes after it, never
// before.
func TestTheFrozenNoticeComesBeforeTheDescriptorAndBeforeThawed(t *testing.T) {
	s, _, _, _ := sandboxWithData(t)
	sup := fakeSupervisor(t, s)
	root := make([]byte, pgalloc.PageSize)
	if err := s.k.MemoryFile().ReadPages(s.k.KHO().RootAddr()/pgalloc.PageSize, root); err != nil {
		t.Fatal(err)
	}
	injected := errors.New("injected")
	var atPrepared supervisor.Notice
	// The notice is held back for a while (notifySupervisor waits for
	// superMu), longer than the restart takes to reach OfferPrepared.
	holdSuperMu(s, 200*time.Millisecond)
	_, _, err := restartInProcess(t, s, 5*time.Second, func(p handover.Point) error {
		if p != handover.OfferPrepared {
			return nil
		}
		// Prepare has returned: the notice must be there already.
		sup.SetDeadline(time.Now().Add(10 * time.Millisecond))
		if _, err := sup.Recv(&atPrepared); err != nil {
			t.Errorf("no notice when Prepare returned: %v", err)
		}
		return injected
	}, true)
	if !errors.Is(err, injected) {
		t.Fatalf("restart: %v, want the injected failure", err)
	}
	if !bytes.Equal(atPrepared.Frozen, root) {
		t.Fatalf("the first notice is %+v, want the frozen root page", atPrepared)
	}
	var next supervisor.Notice
	sup.SetDeadline(time.Now().Add(time.Second))
	if _, err := sup.Recv(&next); err != nil || !next.Thawed {
		t.Fatalf("after the rollback: %+v, %v; want Thawed", next, err)
	}

	// A failure inside Prepare, between LUO's freeze and KHO's
	// finalize: the rollback's Thawed still comes second.
	holdSuperMu(s, 200*time.Millisecond)
	_, _, err = restartInProcess(t, s, 5*time.Second, func(p handover.Point) error {
		if p == handover.OfferFrozen {
			return injected
		}
		return nil
	}, true)
	if !errors.Is(err, injected) {
		t.Fatalf("restart: %v, want the injected failure", err)
	}
	for _, want := range []string{"frozen", "thawed"} {
		var n supervisor.Notice
		sup.SetDeadline(time.Now().Add(time.Second))
		if _, err := sup.Recv(&n); err != nil {
			t.Fatalf("waiting for the %s notice: %v", want, err)
		}
		if got := map[bool]string{true: "frozen", false: "thawed"}[n.Frozen != nil]; got != want || (want == "thawed" && !n.Thawed) {
			t.Fatalf("got %+v where the %s notice was due", n, want)
		}
	}
}

// fakeSupervisor connects s to a socket pair as if to its supervisor and
// returns the supervisor's end, which reads s's notices.
func fakeSupervisor(t *testing.T, s *Sentry) *handover.Channel {
	t.Helper()
	sup, peer, err := handover.Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sup.Close() })
	ch, err := handover.NewChannel(peer)
	if err != nil {
		t.Fatal(err)
	}
	s.superMu.Lock()
	s.superCh = ch
	s.superMu.Unlock()
	return sup
}

// holdSuperMu takes s.superMu and holds it for d on a goroutine of its
// own: the supervisor's notices wait that long.
func holdSuperMu(s *Sentry, d time.Duration) {
	held := make(chan struct{})
	go func() {
		s.superMu.Lock()
		close(held)
		time.Sleep(d)
		s.superMu.Unlock()
	}()
	<-held
}

// Once the new sentry is ready, a transfer-mode restart stops accepting
// before the pause, so that the wait for the accepting goroutines is no
// part of the blackout. A guest that connects meanwhile is not refused:
// it waits in the backlog and is served once a sentry accepts again.
func TestATransferRestartStopsAcceptingBeforeThePause(t *testing.T) {
	s, _, _, _ := sandboxWithData(t)
	defer s.Stop(0, "test done")
	ended := false
	s.beforeTransferPause(func() { ended = true })()
	if !ended {
		t.Fatal("the page-table drop was not ended before the pause")
	}
	s.mu.Lock()
	gl, cl := s.guestLn, s.controlLn
	s.mu.Unlock()
	if gl != nil || cl != nil {
		t.Fatalf("still accepting just before the pause (guest listener %v, control listener %v)", gl != nil, cl != nil)
	}
	served := make(chan error, 1)
	go func() {
		g, err := guest.Dial(sandbox.GuestPath(s.cfg.Root, s.cfg.ID))
		if err == nil {
			_, err = g.MemfdCreate("late", 0)
			g.Disconnect()
		}
		served <- err
	}()
	select {
	case err := <-served:
		t.Fatalf("a guest was served while the sentry did not accept (%v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := s.startAccepting(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("the guest that waited in the backlog: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the guest that waited in the backlog was not served once accepting started again")
	}
}
