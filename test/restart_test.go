package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
)

func TestRestartCarriesThreeMemfdsInTwoSessions(t *testing.T) {
	tests := []struct {
		name    string
		mode    string
		binary  string
		version string
	}{
		{name: "a transfer-mode restart into the same binary keeps every byte", mode: "transfer", binary: "", version: "livesentry-dev"},
		{name: "an exec-mode restart into the same binary keeps every byte", mode: "exec", binary: "", version: "livesentry-dev"},
		{name: "a transfer-mode restart into a new binary keeps every byte", mode: "transfer", binary: "v2", version: "livesentry-v2"},
		{name: "an exec-mode restart into a new binary keeps every byte", mode: "exec", binary: "v2", version: "livesentry-v2"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCLI(t)
			id := fmt.Sprintf("carry%d", i)
			seed := rand.Uint64()
			c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("3M", seed, false)...)...)
			pre := c.waitEvent(id, "preserved", 0, 30*time.Second)
			if pre.Files != 3 || pre.Sessions != 2 {
				t.Fatalf("preserved %+v", pre)
			}
			before := c.state(id)
			args := []string{"--mode=" + tc.mode}
			if tc.binary == "v2" {
				args = append(args, "--binary="+runscV2)
			}
			tm := c.restart(id, args...)
			if tm.NewVersion != tc.version || tm.LiveupdateNumber != 1 || tm.Blackout <= 0 {
				t.Errorf("timing %+v: want version %q, liveupdate number 1, a positive blackout", tm, tc.version)
			}
			if tc.mode == "exec" && tm.NewPID != before.PID || tc.mode == "transfer" && tm.NewPID == before.PID {
				t.Errorf("%s mode: sentry pid %d -> %d", tc.mode, before.PID, tm.NewPID)
			}
			v := c.waitEvent(id, "verified", 1, 30*time.Second)
			if v.Bytes != 3<<20 || v.Files != 3 {
				t.Fatalf("verified %+v, want 3 files of 3 MiB in total", v)
			}
			// A Go guest waits at a start gate (pkg/guest): a transfer
			// restart starts its next life before the pause.
			if lr := c.state(id).LastRestart; lr == nil || lr.EntrypointStartedEarly != (tc.mode == "transfer") {
				t.Errorf("%s mode: last restart %+v, want the entrypoint started early: %v", tc.mode, lr, tc.mode == "transfer")
			}
			st := c.waitStopped(id, 30*time.Second)
			if st.ExitStatus == nil || *st.ExitStatus != 0 {
				t.Fatalf("the relaunched guest's exit: %+v", st)
			}
			if tc.mode == "transfer" && processAlive(before.PID) {
				t.Errorf("the old sentry (pid %d) is still alive", before.PID)
			}
			if processAlive(before.EntrypointPID) {
				t.Errorf("the old entrypoint (pid %d) is still alive", before.EntrypointPID)
			}
			c.must("delete", id)
		})
	}
}

func TestTwentyRestartsInARowAlternatingModes(t *testing.T) {
	c := newCLI(t)
	const id = "twenty"
	seed := rand.Uint64()
	// --debug: the supervisor logs each new sentry that stands by.
	c.must(append([]string{"--debug", "run", "--detach", "--memory=64M", id, "--"}, guestArgs("1M", seed, true)...)...)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	for gen := uint64(1); gen <= 20; gen++ {
		mode := []string{"transfer", "exec"}[gen%2]
		tm := c.restart(id, "--mode="+mode)
		if tm.LiveupdateNumber != gen {
			t.Fatalf("restart %d: liveupdate number %d", gen, tm.LiveupdateNumber)
		}
		// The guest waits for the restart, its generation preserved:
		// nothing changes the KHO tree between the preview and the
		// pause, so a transfer restart boots from the tree read ahead.
		if tm.ReadAhead != (mode == "transfer") {
			t.Errorf("restart %d (%s mode): read ahead %v, map %v", gen, mode, tm.ReadAhead, tm.Map)
		}
		// The relaunched guest checks generation gen-1's contents byte for
		// byte, then writes generation gen's and preserves them.
		c.waitEvent(id, "verified", gen, 30*time.Second)
		c.waitEvent(id, "preserved", gen, 30*time.Second)
	}
	st := c.state(id)
	if st.LiveupdateNumber != 20 {
		t.Fatalf("liveupdate number after 20 restarts: %d", st.LiveupdateNumber)
	}
	// Every new sentry registered with the supervisor (stood by, in
	// transfer mode before the blackout and in exec mode beside its
	// boot, then registered with one message at its commit), and no old
	// sentry's exit was taken for a crash.
	if !st.Supervised || st.Recoveries != 0 {
		t.Fatalf("after 20 restarts: supervised %t, %d recoveries", st.Supervised, st.Recoveries)
	}
	log, err := os.ReadFile(filepath.Join(c.root, id, "sentry.log"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(log), " stands by"); n != 20 {
		t.Errorf("%d new sentries stood by with the supervisor, want 20 (one per restart):\n%s", n, log)
	}
	for _, bad := range []string{"standing by with the supervisor", "registering with the supervisor", "died after committing", "recovering sandbox"} {
		if strings.Contains(string(log), bad) {
			t.Errorf("sentry.log says %q:\n%s", bad, log)
		}
	}
	c.must("kill", id)
	c.must("delete", id)
}

// luoStatus is what "luo status" prints.
type luoStatus = luo.Status

func TestRefusedRestartsRollBackWithEverySessionIntact(t *testing.T) {
	c := newCLI(t)
	const id = "rollback"
	seed := rand.Uint64()
	c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("2M", seed, false)...)...)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	before := c.state(id)

	exits := filepath.Join(binDir, "exits-at-boot")
	os.WriteFile(exits, []byte("#!/bin/sh\necho dying during boot >&2\nexit 3\n"), 0o755)
	hangs := filepath.Join(binDir, "never-ready")
	os.WriteFile(hangs, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"a new binary that exits during boot is rolled back", []string{"--binary=" + exits}, "did not become ready"},
		{"a new binary that never becomes ready is rolled back at the timeout", []string{"--binary=" + hangs, "--timeout=500ms"}, "did not become ready"},
		{"a transfer to a binary whose memfd format is memfd-v9 is refused and rolled back", []string{"--binary=" + runscV9}, `no format both sentries know: file 0x1 of session "demo-session-0" (memfd): this sentry writes ["memfd-v2" "memfd-v1"], the next one reads`},
		{"an exec to a binary whose memfd format is memfd-v9 is refused before execve", []string{"--mode=exec", "--binary=" + runscV9}, `no format both sentries know: file 0x1 of session "demo-session-0" (memfd)`},
		{"an exec to a binary that does not exist is refused", []string{"--mode=exec", "--binary=" + exits + ".missing"}, "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := c.run(append(append([]string{"restart"}, tc.args...), id)...)
			if code == 0 {
				t.Fatalf("restart succeeded: %s", out)
			}
			if !strings.Contains(errOut, tc.want) {
				t.Errorf("stderr %q does not say %q", errOut, tc.want)
			}
			if !strings.Contains(errOut, "--binary") && !strings.Contains(errOut, "still serving") {
				t.Errorf("stderr %q does not say the old sentry is still serving", errOut)
			}
			st := c.state(id)
			if st.Status != "running" || st.PID != before.PID || st.LiveupdateNumber != 0 || st.EntrypointPID != before.EntrypointPID {
				t.Fatalf("after the refused restart: %+v, before: %+v", st, before)
			}
			var ls luoStatus
			if err := json.Unmarshal([]byte(c.must("luo", "status", id)), &ls); err != nil {
				t.Fatal(err)
			}
			files := 0
			for _, s := range ls.Sessions {
				for _, f := range s.Files {
					files++
					if f.State != "preserved" || f.Compatible != "memfd-v2" {
						t.Errorf("session %s file %d: %+v after the rollback", s.Name, f.Token, f)
					}
				}
			}
			if len(ls.Sessions) != 2 || files != 3 {
				t.Fatalf("after the rollback: %d sessions with %d files, want 2 with 3", len(ls.Sessions), files)
			}
			if left := withoutSupervisors(processesMentioning(c.root)); len(left) != 1 || left[0] != before.PID || !processAlive(before.EntrypointPID) {
				t.Errorf("processes of the sandbox after the rollback: %v (guest %d alive: %v), want only the old sentry %d and its guest", left, before.EntrypointPID, processAlive(before.EntrypointPID), before.PID)
			}
			// A transfer's new sentry may have started the guest's next
			// life, waiting at its start gate: it is gone, and never ran.
			lives := func() []int {
				// The sentries name it too, after "boot".
				var l []int
				for _, pid := range withoutSupervisors(processesMentioning(fmt.Sprintf("--seed=%d\x00", seed))) {
					if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); !bytes.Contains(b, []byte("\x00boot\x00")) {
						l = append(l, pid)
					}
				}
				return l
			}
			for deadline := time.Now().Add(5 * time.Second); len(lives()) > 1 && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			}
			if l := lives(); len(l) != 1 || l[0] != before.EntrypointPID {
				t.Errorf("guests after the rollback: %v, want only %d", l, before.EntrypointPID)
			}
		})
	}
	// The old sentry kept serving: a guest can call it, and a good restart
	// still carries every byte.
	g, err := guest.Dial(before.GuestSocket)
	if err != nil {
		t.Fatalf("dialing the old sentry after the rollbacks: %v", err)
	}
	if _, err := g.MemfdCreate("after-rollback", 0); err != nil {
		t.Fatalf("a call to the old sentry after the rollbacks: %v", err)
	}
	g.Disconnect()
	c.restart(id)
	c.waitEvent(id, "verified", 1, 30*time.Second)
	c.waitStopped(id, 30*time.Second)
	c.must("delete", id)
}

func TestMalformedGuestFramesAndKilledGuestsLeaveTheSandboxServing(t *testing.T) {
	c := newCLI(t)
	const id = "frames"
	c.must("run", "--detach", "--memory=64M", id)
	st := c.state(id)
	good, err := guest.Dial(st.GuestSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Disconnect()
	fd, err := good.MemfdCreate("good", 0)
	if err != nil {
		t.Fatal(err)
	}
	good.Write(fd, []byte("unharmed"))
	tests := []struct {
		name string
		raw  []byte
	}{
		{"garbage instead of a hello", []byte("this is not the guest protocol at all")},
		{"a hello then an unknown op", append(hello(), header(77, 0)...)},
		{"a hello then a write cut off mid-payload by the guest's death", append(append(hello(), memfdCreate()...), append(header(abiguest.OpWrite, 1<<20), make([]byte, 100<<10)...)...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("unix", st.GuestSocket)
			if err != nil {
				t.Fatal(err)
			}
			conn.Write(tc.raw)
			time.Sleep(20 * time.Millisecond)
			conn.Close()
			got := make([]byte, 8)
			if n, err := good.Pread(fd, got, 0); err != nil || string(got[:n]) != "unharmed" {
				t.Fatalf("the other guest afterwards: %q, %v", got[:n], err)
			}
		})
	}
	// A guest process killed in the middle of its calls.
	victim := command(t, runsc, "demo-guest", "--size=64M", "--seed=5")
	victim.Env = append(os.Environ(), abiguest.EnvSocket+"="+st.GuestSocket)
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	victim.Process.Kill()
	victim.Wait()
	if st2 := c.state(id); st2.Status != "running" || st2.PID != st.PID {
		t.Fatalf("the sandbox after a guest died mid-call: %+v", st2)
	}
	if _, err := good.MemfdCreate("still", 0); err != nil {
		t.Fatalf("a call after a guest died mid-call: %v", err)
	}
}

func TestKillAndDeleteLeaveNothingBehind(t *testing.T) {
	tests := []struct {
		name   string
		signal []string
	}{
		{name: "kill with the default SIGTERM", signal: nil},
		{name: "kill with SIGKILL", signal: []string{"KILL"}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCLI(t)
			id := fmt.Sprintf("kill%d", i)
			c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("1M", 1, false)...)...)
			c.waitEvent(id, "preserved", 0, 30*time.Second)
			// A second guest through exec, which blocks until killed.
			ex := command(t, runsc, "--root="+c.root, "exec", id, "--", "sleep", "60")
			if err := ex.Start(); err != nil {
				t.Fatal(err)
			}
			st := c.state(id)
			for deadline := time.Now().Add(10 * time.Second); len(withoutSupervisors(processesMentioning(c.root))) < 2; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("processes before the kill: %v, want the sentry and exec", processesMentioning(c.root))
				}
			}
			if !processAlive(st.EntrypointPID) {
				t.Fatalf("the entrypoint %d is not running", st.EntrypointPID)
			}
			c.must(append([]string{"kill", id}, tc.signal...)...)
			stopped := c.state(id)
			if stopped.Status != "stopped" || processAlive(st.PID) || processAlive(st.EntrypointPID) {
				t.Fatalf("after kill: %+v (sentry alive %v, guest alive %v)", stopped, processAlive(st.PID), processAlive(st.EntrypointPID))
			}
			ex.Wait()
			for _, p := range []string{st.GuestSocket, st.ControlSocket} {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("%s still exists after kill (%v)", p, err)
				}
			}
			c.must("delete", id)
			if _, err := os.Stat(filepath.Join(c.root, id)); !os.IsNotExist(err) {
				t.Errorf("the sandbox directory survived delete (%v)", err)
			}
			if left := processesMentioning(c.root); len(left) != 0 {
				t.Errorf("processes left after kill and delete: %v", left)
			}
			if out := c.must("list", "-q"); strings.TrimSpace(out) != "" {
				t.Errorf("list after delete: %q", out)
			}
		})
	}
	t.Run("delete --force of a running sandbox kills it first", func(t *testing.T) {
		c := newCLI(t)
		c.must("run", "--detach", "--memory=64M", "forced")
		st := c.state("forced")
		if _, _, code := c.run("delete", "forced"); code == 0 {
			t.Fatal("delete of a running sandbox without --force succeeded")
		}
		c.must("delete", "--force", "forced")
		if processAlive(st.PID) {
			t.Fatalf("sentry %d alive after delete --force", st.PID)
		}
		if _, err := os.Stat(filepath.Join(c.root, "forced")); !os.IsNotExist(err) {
			t.Errorf("the sandbox directory survived delete --force")
		}
	})
}

func TestRunWithoutDetachShowsTheEntrypointAndItsExitStatus(t *testing.T) {
	c := newCLI(t)
	out, _, code := c.run("run", "--memory=64M", "fg", "--", "sh", "-c", `echo "socket=$LIVESENTRY_GUEST_SOCKET"; exit 7`)
	if code != 7 {
		t.Fatalf("run exit status %d, want the entrypoint's 7", code)
	}
	if want := "socket=" + filepath.Join(c.root, "fg", "guest.sock"); !strings.Contains(out, want) {
		t.Errorf("run output %q does not contain %q", out, want)
	}
	if _, err := os.Stat(filepath.Join(c.root, "fg")); !os.IsNotExist(err) {
		t.Errorf("run left the sandbox behind (%v)", err)
	}
	if _, errOut, code := c.run("restart", "--mode=teleport", "fg"); code == 0 || !strings.Contains(errOut, `--mode "teleport"`) {
		t.Errorf("restart with a bad mode: exit %d, %q", code, errOut)
	}
}
