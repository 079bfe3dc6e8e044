package test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
)

// A new sentry that comes to its decision only after the old sentry's
// deadline never commits: the old one abandons the decision word first and
// rolls back, and the new sentry must not have committed (scrubbed what was
// not preserved), served or relaunched anything.
func TestANewSentryDecidingTooLateRollsBackWithNothingScrubbed(t *testing.T) {
	c := newCLI(t)
	const id = "lateack"
	// The restart makes the new sentry sleep 1.5 s, booted, before it
	// decides.
	// The entrypoint's argument is unique, to count its copies.
	nap := fmt.Sprintf("600.%09d", rand.IntN(1e9))
	if out, errOut, code := c.run("run", "--detach", "--memory=64M", id, "--", "sleep", nap); code != 0 {
		t.Fatalf("run: exit %d\n%s\n%s", code, out, errOut)
	}
	before := c.state(id)
	g, err := guest.Dial(before.GuestSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Disconnect()
	// 32 MiB in a memfd that is not preserved: only the old sentry's
	// guests can use it, and a scrub by the new sentry would zero it.
	fd, err := g.MemfdCreate("unpreserved", 0)
	if err != nil {
		t.Fatal(err)
	}
	pat := bytes.Repeat([]byte{0xAB}, 32<<20)
	if n, err := g.Write(fd, pat); err != nil || n != len(pat) {
		t.Fatalf("write: %d, %v", n, err)
	}
	// And one preserved file, so that there is something to hand over.
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
	g.Write(p, []byte("preserved"))
	if err := g.PreserveFD(sess, p, 1); err != nil {
		t.Fatal(err)
	}

	out, errOut, code := c.run("restart", "--timeout=1s", "--TESTONLY-commit-delay=1500ms", "--binary="+runsc, id)
	if code == 0 {
		t.Fatalf("restart succeeded although the new sentry decided after the deadline: %s", out)
	}
	if !strings.Contains(errOut, "rolled back and is still serving") {
		t.Fatalf("restart: %q", errOut)
	}
	// Give a new sentry that went ahead anyway time to scrub.
	time.Sleep(500 * time.Millisecond)
	st := c.state(id)
	if st.Status != "running" || st.PID != before.PID || st.EntrypointPID != before.EntrypointPID || st.LiveupdateNumber != 0 {
		t.Fatalf("after the rollback: %+v, before: %+v", st, before)
	}
	got := make([]byte, len(pat))
	n, err := g.Pread(fd, got, 0)
	if err != nil || n != len(pat) {
		t.Fatalf("pread after the rollback: %d, %v", n, err)
	}
	if !bytes.Equal(got, pat) {
		zero := bytes.Count(got, []byte{0})
		t.Fatalf("the unpreserved memfd changed across the rolled-back restart: %d of %d bytes are zero", zero, len(got))
	}
	// Nothing of the new sentry is left: no process of it serves the
	// sandbox, and a second entrypoint was never launched.
	if left := withoutSupervisors(processesMentioning(c.root)); len(left) != 1 || left[0] != before.PID {
		t.Errorf("processes of the sandbox after the rollback: %v, want only the old sentry %d", left, before.PID)
	}
	// (The sentry's own command line names the entrypoint too.)
	if pids := withoutSupervisors(processesMentioning("sleep\x00" + nap)); len(pids) != 2 {
		t.Errorf("processes naming the entrypoint (sleep %s): %v, want the old sentry %d and its entrypoint %d", nap, pids, before.PID, before.EntrypointPID)
	}
	// The rolled-back sentry still restarts well.
	c.restart(id, "--binary="+runsc)
	c.must("kill", id)
	c.must("delete", id)
}
