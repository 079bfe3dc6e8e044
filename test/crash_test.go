package test

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SIGKILL of the serving sentry: the supervisor brings the sandbox back by
// itself on the same memory file, and the relaunched guest retrieves and
// verifies every preserved byte.
func TestASentryKilledWhileServingComesBackWithItsMemory(t *testing.T) {
	c := newCLI(t)
	const id = "crash"
	c.must(append([]string{"run", "--detach", "--memory=128M", id, "--"}, guestArgs("8M", 21, true)...)...)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	before := c.state(id)
	if !before.Supervised {
		t.Fatalf("the sandbox is not supervised: %+v", before)
	}
	syscall.Kill(before.PID, syscall.SIGKILL)
	c.waitEvent(id, "verified", 1, 30*time.Second)
	st := c.state(id)
	if st.Status != "running" || st.PID == before.PID || st.Recoveries != 1 || st.LastRecovery == nil {
		t.Fatalf("after the crash: %+v", st)
	}
	// The recovered sandbox restarts live as any other.
	c.waitEvent(id, "preserved", 1, 30*time.Second)
	c.restart(id)
	c.waitEvent(id, "verified", 2, 30*time.Second)
	c.killAndDelete(id)
}

// SIGKILL of the supervisor is reported truthfully: the sentry goes on
// serving, and the state says a crash of it would now lose the sandbox.
func TestASupervisorKilledIsReported(t *testing.T) {
	c := newCLI(t)
	const id = "nosuper"
	c.must("run", "--detach", "--memory=64M", id, "--", "sleep", "600")
	var super int
	for _, pid := range processesMentioning(c.root) {
		if pids := processesMentioning("supervise\x00--id=" + id); len(pids) == 1 && pids[0] == pid {
			super = pid
		}
	}
	if super == 0 {
		t.Fatalf("no supervisor among %v", processesMentioning(c.root))
	}
	syscall.Kill(super, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for c.state(id).Supervised {
		if time.Now().After(deadline) {
			t.Fatal("the state still says supervised after the supervisor died")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st := c.state(id); st.Status != "running" {
		t.Fatalf("the sandbox after its supervisor died: %+v", st)
	}
	out := c.must("state", id)
	if !strings.Contains(out, `"supervised": false`) {
		t.Fatalf("state: %s", out)
	}
	c.must("kill", id)
}

// awaitSpare returns the pid of the sandbox's spare sentry other than
// not, once one runs.
func awaitSpare(t *testing.T, c *cli, not int) int {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		for _, pid := range processesMentioning("\x00--spare-fd=3") {
			if pid != not && slices.Contains(processesMentioning(c.root), pid) {
				return pid
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no spare sentry (other than %d) within 20 s", not)
		}
	}
}

// The supervisor keeps a spare sentry, started ahead of any crash, and a
// recovery hands the sandbox to it: the spare serves, and the relaunched
// guest verifies every byte. A spare that died is not used: the recovery
// starts a sentry instead, and a new spare follows. Nothing is left after
// kill and delete.
func TestASpareSentryTakesTheRecoveryAndADeadOneIsReplaced(t *testing.T) {
	c := newCLI(t)
	const id = "spare"
	c.must(append([]string{"run", "--detach", "--memory=128M", id, "--"}, guestArgs("8M", 23, true)...)...)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	spare := awaitSpare(t, c, 0)
	before := c.state(id)
	syscall.Kill(before.PID, syscall.SIGKILL)
	c.waitEvent(id, "verified", 1, 30*time.Second)
	st := c.state(id)
	if st.Status != "running" || st.PID != spare || st.Recoveries != 1 {
		t.Fatalf("after the crash: pid %d (the spare was %d), %+v", st.PID, spare, st)
	}
	log, _ := os.ReadFile(filepath.Join(c.root, id, "sentry.log"))
	if want := fmt.Sprintf("with spare sentry %d", spare); !strings.Contains(string(log), want) {
		t.Fatalf("sentry.log does not say %q:\n%s", want, log)
	}

	// A new spare; killed, it is not used.
	c.waitEvent(id, "preserved", 1, 30*time.Second)
	spare2 := awaitSpare(t, c, spare)
	syscall.Kill(spare2, syscall.SIGKILL)
	before = c.state(id)
	syscall.Kill(before.PID, syscall.SIGKILL)
	c.waitEvent(id, "verified", 2, 30*time.Second)
	st = c.state(id)
	if st.Status != "running" || st.PID == spare2 || st.PID == before.PID || st.Recoveries != 2 {
		t.Fatalf("after the second crash: pid %d (the dead spare was %d), %+v", st.PID, spare2, st)
	}
	awaitSpare(t, c, spare2)
	c.killAndDelete(id)
}

// A caller of "run --detach" that leaked an fd into it (here the write end
// of a pipe it then reads to its end) gets it back closed: the supervisor,
// a daemon that lives as long as the sandbox, closes what it inherited
// without being given it, and so the sentries never see it either.
func TestRunKeepsNoFdItsCallerLeaked(t *testing.T) {
	c := newCLI(t)
	const id = "leak"
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	cmd := exec.Command(runsc, "--root="+c.root, "run", "--detach", "--memory=64M", id, "--", "sleep", "600")
	// fd 5 of "run", not close-on-exec: whatever it starts inherits it
	// unless it closes it.
	cmd.ExtraFiles = []*os.File{null, null, pw}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("run: %v\n%s", err, out)
	}
	pw.Close()
	defer func() {
		c.must("kill", id)
		c.must("delete", id)
	}()
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(pr)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		pr.Close()
		t.Fatalf("the pipe's write end is still open 5 s after run returned: held by %v", processesMentioning(c.root))
	}
}

// crashWithDoomedSpare runs sandbox id with a spare sentry that SIGKILLs
// itself at point of its recovery, SIGKILLs the serving sentry once the
// spare is up, waits for the relaunched guest to verify every byte, and
// returns the spare's pid, the state before the crash and after.
func crashWithDoomedSpare(t *testing.T, c *cli, id, point string, seed uint64) (int, sandboxState, sandboxState) {
	t.Helper()
	cmd := exec.Command(runsc, append([]string{"--root=" + c.root, "run", "--detach", "--memory=128M", id, "--"}, guestArgs("8M", seed, true)...)...)
	cmd.Env = append(os.Environ(), "LIVESENTRY_TESTONLY_SPARE_CRASH_AT="+point)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("run: %v\n%s", err, out)
	}
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	spare := awaitSpare(t, c, 0)
	before := c.state(id)
	syscall.Kill(before.PID, syscall.SIGKILL)
	c.waitEvent(id, "verified", 1, 30*time.Second)
	return spare, before, c.state(id)
}

// A spare sentry that dies while it boots a recovery, before it registers
// (after KHO's ingest, or after its whole boot), is replaced by a started
// sentry on the root page as the supervisor saved it: the relaunched
// guest verifies every byte.
func TestASpareThatDiesInItsRecoveryIsReplaced(t *testing.T) {
	for _, point := range []string{"accept/ingested", "accept/booted"} {
		t.Run(strings.ReplaceAll(point, "/", "-"), func(t *testing.T) {
			c := newCLI(t)
			const id = "sparedies"
			spare, before, st := crashWithDoomedSpare(t, c, id, point, 29)
			if st.Status != "running" || st.PID == spare || st.PID == before.PID || st.Recoveries != 1 {
				t.Fatalf("after the crash: pid %d (the spare was %d), %+v", st.PID, spare, st)
			}
			log, _ := os.ReadFile(filepath.Join(c.root, id, "sentry.log"))
			for _, want := range []string{
				fmt.Sprintf("with spare sentry %d", spare),
				fmt.Sprintf("the recovering sentry (pid %d) exited", spare),
				fmt.Sprintf("recovering sandbox %s with sentry %d", id, st.PID),
			} {
				if !strings.Contains(string(log), want) {
					t.Errorf("sentry.log does not say %q:\n%s", want, log)
				}
			}
			c.killAndDelete(id)
		})
	}
}

// A spare that dies after it has committed, registered and served (its
// records carried unchanged, its scrub of what was not preserved begun) is
// replaced: as a serving sentry that died, or, if the supervisor had not
// read its registration yet, as a recovery that failed (the root page put
// back is the one the spare carried). Either way another sentry recovers
// the sandbox and the guest verifies every byte.
func TestASpareThatDiesAfterItServedIsRecoveredInTurn(t *testing.T) {
	c := newCLI(t)
	const id = "sparedies2"
	spare, before, st := crashWithDoomedSpare(t, c, id, "accept/serving", 31)
	if st.Status != "running" || st.PID == spare || st.PID == before.PID || st.Recoveries == 0 {
		t.Fatalf("after the crash: pid %d (the spare was %d), %+v", st.PID, spare, st)
	}
	log, _ := os.ReadFile(filepath.Join(c.root, id, "sentry.log"))
	if !strings.Contains(string(log), fmt.Sprintf("with spare sentry %d", spare)) ||
		!strings.Contains(string(log), fmt.Sprintf("sentry %d died", spare)) && !strings.Contains(string(log), fmt.Sprintf("the recovering sentry (pid %d) exited", spare)) {
		t.Errorf("sentry.log does not say that spare %d recovered the sandbox and died:\n%s", spare, log)
	}
	c.killAndDelete(id)
}

// A sentry SIGKILLed while it stops the sandbox is not recovered: its
// supervisor finishes the stop (guests killed, state stopped with the exit
// status the stop was for) and nothing of the sandbox is left.
func TestASentryKilledWhileItStopsIsNotRecovered(t *testing.T) {
	c := newCLI(t)
	const id = "dying"
	// The guest ignores SIGTERM: the stop waits stopGrace (5 s) for it.
	// The signal is sent only once the shell says it ignores it: sent
	// before (a slow start, under the race detector), it would end the
	// guest and the stop with it before the sentry could be killed.
	c.must("run", "--detach", "--memory=64M", id, "--", "/bin/sh", "-c", `trap "" TERM; echo ignoring TERM; sleep 6137`)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log")); strings.Contains(string(b), "ignoring TERM") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the guest never said it ignores SIGTERM")
		}
	}
	before := c.state(id)
	kill := exec.Command(runsc, "--root="+c.root, "kill", id, "SIGTERM")
	if err := kill.Start(); err != nil {
		t.Fatal(err)
	}
	// Once the sentry has the signal (its guests got it), kill it.
	time.Sleep(time.Second)
	if err := syscall.Kill(before.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("killing the sentry %d: %v", before.PID, err)
	}
	if err := kill.Wait(); err != nil {
		t.Fatalf("kill SIGTERM: %v", err)
	}
	stoppedBySupervisor(t, c, id, syscall.SIGTERM, "sleep\x006137")
}

// TestKillOfASentryThatDoesNotAnswerStopsTheSandbox: kill signals a sentry
// that does not answer its control call (here stopped with SIGSTOP; in
// practice, an exec-mode restart's new image before it serves) directly.
// The supervisor is told first, so the sentry's end stops the sandbox
// rather than being taken for a crash and recovered.
func TestKillOfASentryThatDoesNotAnswerStopsTheSandbox(t *testing.T) {
	c := newCLI(t)
	const id = "unanswering"
	c.must("run", "--detach", "--memory=64M", id, "--", "/bin/sh", "-c", "sleep 6138")
	// Registered with its supervisor first (a sentry stopped before that
	// is another case: the supervisor finishes the stop when it dies).
	before := c.state(id)
	for deadline := time.Now().Add(10 * time.Second); !before.Supervised; before = c.state(id) {
		if time.Now().After(deadline) {
			t.Fatalf("the sentry never registered with its supervisor: %+v", before)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(before.PID, syscall.SIGSTOP); err != nil {
		t.Fatalf("stopping the sentry %d: %v", before.PID, err)
	}
	// The control call times out (5 s), then kill SIGKILLs the sentry.
	c.must("kill", id, "SIGKILL")
	stoppedBySupervisor(t, c, id, syscall.SIGKILL, "sleep\x006138")
}

// stoppedBySupervisor checks that sandbox id stopped with the exit status
// of sig, through a stop the supervisor finished rather than a recovery,
// and that its delete leaves no process of the sandbox and no guest
// (whose command line has guest in it).
func stoppedBySupervisor(t *testing.T, c *cli, id string, sig syscall.Signal, guest string) {
	t.Helper()
	st := c.state(id)
	if st.Status != "stopped" || st.Recoveries != 0 || st.ExitStatus == nil || *st.ExitStatus != 128+int(sig) ||
		!strings.Contains(st.Error, "the supervisor finished the stop") {
		t.Fatalf("sandbox %s after its sentry ended: %+v (exit status %v), want stopped by the supervisor with status %d", id, st, st.ExitStatus, 128+int(sig))
	}
	c.must("delete", id)
	deadline := time.Now().Add(5 * time.Second)
	for len(processesMentioning(c.root)) != 0 || len(processesMentioning(guest)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("left after delete: %v, guests %v", processesMentioning(c.root), processesMentioning(guest))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
