package test

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/handover"
)

var faultFull = flag.Bool("full", os.Getenv("LIVESENTRY_FAULT_FULL") != "", "run the whole fault matrix (also LIVESENTRY_FAULT_FULL=1), not its fast subset")

// faultCase is one cell of the fault matrix: a restart in mode with a
// process SIGKILLed at a point (restart --TESTONLY-crash-at=crash).
type faultCase struct {
	mode  string
	crash string
	// fast cases run by default; the others with -full.
	fast bool
}

// Verdicts of a fault case, as the matrix reports them.
const (
	// verdictVerified: the guest verified every preserved byte after
	// the fault.
	verdictVerified = "verified"
	// verdictReported: the data was lost, and restart said so (exit 4
	// or 5).
	verdictReported = "lost, reported by restart"
	// verdictRecorded: the new sentry died after the restart had
	// succeeded, and its incoming sessions were lost: the state's
	// last_recovery says so.
	verdictRecorded = "lost after the restart, recorded in state"
	// verdictReleased: the guest was killed before the pause, and its
	// death closed its session fds, which released the sessions and
	// their files, as in Linux: the restart had nothing of it to carry,
	// and the relaunched guest found no session.
	verdictReleased = "released by the guest's own exit before the pause"
)

// diesBeforeThePause are the cells whose guest is killed, and its death
// has its effects (the test hook waits for them), before the old sentry
// pauses its kernel: verdictReleased is their outcome.
var diesBeforeThePause = map[string]bool{"transfer guest@" + string(handover.OfferReady): true}

// faultCases is the matrix: every process of a restart (the old sentry,
// the new one, the guest, the supervisor) SIGKILLed at every point of the
// restart protocol it passes, between LUO freeze and KHO finalize
// (offer/frozen) and between KHO ingest and LUO deserialize
// (accept/ingested), and a delay after offer/paused (inside LUO freeze or
// KHO finalize, or after them) and after accept/received (inside the new
// sentry's map, KHO ingest or LUO deserialize), in both modes.
func faultCases() []faultCase {
	fast := map[string]bool{
		"transfer old@offer/prepared": true, "transfer old@offer/acked": true, "transfer old@offer/committed": true,
		"transfer new@accept/booted": true, "transfer new@accept/committed": true, "transfer guest@offer/paused": true,
		"transfer supervisor@offer/sent": true, "exec old@offer/prepared": true, "exec new@accept/booted": true,
		"exec new@accept/serving": true, "transfer old@offer/paused+300us": true, "exec new@accept/received+300us": true,
		"transfer old@offer/frozen": true, "transfer new@accept/ingested": true,
		"transfer new@accept/serving": true, "transfer new@accept/done": true,
	}
	var cs []faultCase
	add := func(mode, crash string) {
		cs = append(cs, faultCase{mode: mode, crash: crash, fast: fast[mode+" "+crash]})
	}
	offer := []handover.Point{handover.OfferReady, handover.OfferPaused, handover.OfferFrozen, handover.OfferPrepared, handover.OfferSent,
		handover.OfferAcked, handover.OfferCommitted, handover.OfferHandedOff, handover.OfferConfirmed}
	accept := []handover.Point{handover.AcceptStart, handover.AcceptReady, handover.AcceptReceived, handover.AcceptIngested, handover.AcceptBooted,
		handover.AcceptAcked, handover.AcceptCommitted, handover.AcceptServing, handover.AcceptDone}
	for _, p := range offer {
		add(handover.ModeTransfer, "old@"+string(p))
	}
	for _, p := range accept {
		add(handover.ModeTransfer, "new@"+string(p))
	}
	for _, d := range []string{"100us", "300us", "1ms"} {
		add(handover.ModeTransfer, "old@offer/paused+"+d)
		add(handover.ModeTransfer, "new@accept/received+"+d)
	}
	for _, who := range []string{"guest", "supervisor"} {
		for _, p := range offer {
			add(handover.ModeTransfer, who+"@"+string(p))
		}
	}
	execOffer := []handover.Point{handover.OfferPaused, handover.OfferFrozen, handover.OfferPrepared, handover.OfferSent}
	execAccept := []handover.Point{handover.AcceptReceived, handover.AcceptIngested, handover.AcceptBooted, handover.AcceptServing}
	for _, p := range execOffer {
		add(handover.ModeExec, "old@"+string(p))
	}
	for _, p := range execAccept {
		add(handover.ModeExec, "new@"+string(p))
	}
	for _, d := range []string{"100us", "300us", "1ms"} {
		add(handover.ModeExec, "old@offer/paused+"+d)
		add(handover.ModeExec, "new@accept/received+"+d)
	}
	for _, who := range []string{"guest", "supervisor"} {
		for _, p := range append(execOffer, execAccept...) {
			add(handover.ModeExec, who+"@"+string(p))
		}
	}
	return cs
}

// TestFaultMatrix SIGKILLs each process of a live restart at each point of
// the protocol, in both modes, and checks what is left: the guest's
// preserved data verified byte for byte afterwards (a loss fails the cell,
// even one that restart or the state reports; a guest killed before the
// pause, whose death the hook lets take effect first, must instead have
// released its sessions, as a Linux process that exits before a live
// update does: diesBeforeThePause); the state and list
// truthful; nothing of the sandbox left after kill and delete (no process,
// socket, holder of the memory file, or fd of the test). The fast subset
// runs by default; -full (or LIVESENTRY_FAULT_FULL=1) runs every cell and
// logs the table.
func TestFaultMatrix(t *testing.T) {
	var rows []string
	for i, fc := range faultCases() {
		if !fc.fast && !*faultFull {
			continue
		}
		name := fc.mode + " " + fc.crash
		t.Run(strings.NewReplacer("/", "-", "@", " at ").Replace(name), func(t *testing.T) {
			start := time.Now()
			code, verdict, landed := runFaultCase(t, i, fc)
			rows = append(rows, fmt.Sprintf("| %s | `%s` | %s | %d | %s | %.1f s |", fc.mode, fc.crash, landed, code, verdict, time.Since(start).Seconds()))
		})
	}
	t.Logf("fault matrix:\n| mode | SIGKILL | landed after | restart exit | data | time |\n|---|---|---|---|---|---|\n%s", strings.Join(rows, "\n"))
}

// runFaultCase runs one cell and returns restart's exit status, the
// verdict on the data, and the last point of the restart the killing
// process had reached when the SIGKILL went out ("-" if it never did).
func runFaultCase(t *testing.T, i int, fc faultCase) (int, string, string) {
	c := newCLI(t)
	id := fmt.Sprintf("fault%d", i)
	fdsBefore := openFDs(t)
	c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("4M", uint64(100+i), true)...)...)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	before := c.state(id)
	mem := memoryFileOf(t, before.PID)

	events := len(guestEvents(c, id))
	out, errOut, code := c.run("restart", "--format=json", "--timeout=5s", "--mode="+fc.mode, "--TESTONLY-crash-at="+fc.crash, id)
	t.Logf("restart: exit %d\n%s%s", code, out, errOut)
	landed := "-"
	log, _ := os.ReadFile(filepath.Join(c.root, id, "sentry.log"))
	if _, after, ok := strings.Cut(string(log), "TESTONLY: SIGKILL"); ok {
		if _, p, ok := strings.Cut(after, "last point reached "); ok {
			landed, _, _ = strings.Cut(p, "\n")
		}
	}
	switch code {
	case 0, 4:
	case 3:
		// Rolled back: the old sentry serves as before, and a restart
		// without fault carries every byte.
		st := c.state(id)
		if st.Status != "running" || st.PID != before.PID || st.LiveupdateNumber != before.LiveupdateNumber {
			t.Fatalf("restart exited 3 (rolled back), but the state is %+v (before %+v)", st, before)
		}
		c.restart(id)
	case 5:
		if st := c.state(id); st.Status != "stopped" || !strings.Contains(st.Error, "lost") {
			t.Fatalf("restart exited 5 (lost), but the state is %+v", st)
		}
	default:
		t.Fatalf("restart exited %d", code)
	}
	verified, failure := false, ""
	if code != 5 {
		verified, failure = settle(t, c, id, events)
	}
	st := c.state(id)
	if code == 4 && (st.Recoveries == 0 || st.LastRecovery == nil) {
		t.Fatalf("restart exited 4 (recovered), but the state says no recovery: %+v", st)
	}
	verdict := verdictVerified
	switch {
	case diesBeforeThePause[fc.mode+" "+fc.crash]:
		if verified || code != 0 || !strings.Contains(failure, "retrieving session") || !strings.Contains(failure, "no such file or directory") {
			t.Fatalf("the guest died before the pause: want its sessions released (restart exit 0, the relaunched guest finding no session), got exit %d, verified %v, %q", code, verified, failure)
		}
		verdict = verdictReleased
	case verified:
	case code == 4 || code == 5:
		verdict = verdictReported
	case st.LastRecovery != nil && strings.Contains(st.LastRecovery.Reason, "lost"):
		verdict = verdictRecorded
	default:
		t.Fatalf("the preserved data was lost, restart exited %d, and the state does not say so: %+v", code, st)
	}
	// No cell loses data any more: the old sentry's state is recovered
	// before its commit, and a new sentry carries its incoming sessions
	// from its ingest on (docs/crash.md). A loss, even reported, fails;
	// a guest that dies before the pause releases its own sessions.
	if verdict != verdictVerified && verdict != verdictReleased {
		t.Errorf("the preserved data was lost (%s, restart exited %d): a crash at any point must keep it", verdict, code)
	}
	if strings.HasPrefix(fc.crash, "supervisor@") && code == 0 {
		if st.Supervised {
			t.Errorf("the supervisor was killed, but the state says supervised: %+v", st)
		}
	}
	if verdict == verdictReleased {
		// The relaunched guest found nothing, failed and exited, and
		// the sandbox stopped with it.
		if st := c.waitStopped(id, 10*time.Second); st.LiveupdateNumber != 1 {
			t.Errorf("stopped after the released restart: %+v", st)
		}
	} else {
		checkList(t, c, id)
		c.must("kill", id)
	}
	c.must("delete", id)
	checkNothingLeft(t, c, mem, fdsBefore)
	return code, verdict, landed
}

// settle waits for the guest's first event after the n it had printed
// before the fault (by the relaunched entrypoint, or by the one a restart
// after a rollback relaunched) and reports whether it verified every
// byte, and if not, the guest's error. A guest that failed, or that
// started from scratch (preserved generation 0 again: it found nothing to
// retrieve), or a sandbox that stopped without a guest verifying, lost
// the data.
func settle(t *testing.T, c *cli, id string, n int) (bool, string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		// (A supervised sentry that is gone is being recovered.) The
		// state is read first: a guest writes its event before it
		// exits, and so before its exit stops the sandbox.
		st := c.state(id)
		stopped := st.Status == "stopped" && !(st.Supervised && st.Error == "the sentry process is gone")
		if evs := guestEvents(c, id); len(evs) > n {
			e := evs[n]
			if e.Event == "failed" {
				t.Logf("the guest of generation %d: %s", e.Generation, e.Error)
			}
			return e.Event == "verified", e.Error
		}
		if stopped {
			return false, ""
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log"))
	t.Fatalf("no guest event within 30 s: %+v\n%s", c.state(id), b)
	return false, ""
}

// guestEvents returns the JSON events of the entrypoint log.
func guestEvents(c *cli, id string) []event {
	b, _ := os.ReadFile(filepath.Join(c.root, id, "entrypoint.log"))
	var evs []event
	for _, line := range strings.Split(string(b), "\n") {
		var e event
		if err := json.Unmarshal([]byte(line), &e); err == nil && e.Event != "" {
			evs = append(evs, e)
		}
	}
	return evs
}

// checkList checks that state and list agree, and that a running sandbox's
// sentry is alive and answers.
func checkList(t *testing.T, c *cli, id string) {
	t.Helper()
	st := c.state(id)
	if st.Status == "running" && !processAlive(st.PID) {
		t.Errorf("state says running, but its sentry %d is gone: %+v", st.PID, st)
	}
	var list []sandboxState
	if err := json.Unmarshal([]byte(c.must("list", "--format=json")), &list); err != nil {
		t.Fatal(err)
	}
	for _, l := range list {
		if l.ID == id {
			if l.Status != st.Status || l.PID != st.PID || l.LiveupdateNumber != st.LiveupdateNumber {
				t.Errorf("list says %s pid %d generation %d, state %s pid %d generation %d", l.Status, l.PID, l.LiveupdateNumber, st.Status, st.PID, st.LiveupdateNumber)
			}
			return
		}
	}
	t.Errorf("list does not name %s: %+v", id, list)
}

// memFile identifies a memory file by device and inode.
type memFile struct{ dev, ino uint64 }

// memoryFileOf returns the memory file the sentry pid holds.
func memoryFileOf(t *testing.T, pid int) memFile {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		link, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if strings.HasPrefix(link, "/memfd:livesentry-memory") {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(dir, e.Name()), &st); err == nil {
				return memFile{uint64(st.Dev), st.Ino}
			}
		}
	}
	t.Fatalf("sentry %d holds no memory file", pid)
	return memFile{}
}

// holdersOf returns the processes that hold m open or mapped.
func holdersOf(m memFile) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		held := false
		dir := filepath.Join("/proc", e.Name(), "fd")
		fds, _ := os.ReadDir(dir)
		for _, fd := range fds {
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join(dir, fd.Name()), &st) == nil && uint64(st.Dev) == m.dev && st.Ino == m.ino {
				held = true
				break
			}
		}
		if !held {
			maps, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "maps"))
			held = bytes.Contains(maps, []byte(fmt.Sprintf(" %d ", m.ino))) && bytes.Contains(maps, []byte("/memfd:livesentry-memory"))
		}
		if held {
			pids = append(pids, pid)
		}
	}
	return pids
}

// processesOf returns the live processes of a sandbox root: those naming
// it on their command line (supervisor, sentries) or in their environment
// (guests: the guest socket).
func processesOf(root string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		environ, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if (bytes.Contains(cmdline, []byte(root)) || bytes.Contains(environ, []byte(root+"/"))) && processAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// openFDs returns the number of fds of this process.
func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkNothingLeft checks that kill and delete left nothing of the
// sandbox: no process, no directory (sockets, state), no holder of its
// memory file, no fd of this process.
func checkNothingLeft(t *testing.T, c *cli, mem memFile, fdsBefore int) {
	t.Helper()
	// A killed process may take a moment to be reaped.
	deadline := time.Now().Add(5 * time.Second)
	for {
		procs, holders := processesOf(c.root), holdersOf(mem)
		if len(procs) == 0 && len(holders) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("after kill and delete: processes of the sandbox %v, holders of its memory file %v", procs, holders)
			for _, pid := range append(procs, holders...) {
				b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				t.Logf("pid %d: %q", pid, b)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	ents, _ := os.ReadDir(c.root)
	for _, e := range ents {
		t.Errorf("after delete, the root still has %s", e.Name())
	}
	if n := openFDs(t); n > fdsBefore {
		t.Errorf("the test process has %d fds, %d before the sandbox", n, fdsBefore)
	}
}
