package test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// A guest started with exec has its CLI waiting (WaitPID) on another
// control connection. A transfer-mode restart kills it at the handoff, so
// that call ends first; the old sentry must still answer the Restart call
// before it exits.
func TestRestartWithAnExecdGuestAnswersTheCLI(t *testing.T) {
	c := newCLI(t)
	const id = "execguest"
	c.must("run", "--detach", "--memory=64M", id, "--", "sleep", "600")
	nap := fmt.Sprintf("600.%09d", rand.IntN(1e9))
	ex := command(t, runsc, "--root="+c.root, "exec", id, "--", "sleep", nap)
	if err := ex.Start(); err != nil {
		t.Fatal(err)
	}
	defer ex.Wait()
	for deadline := time.Now().Add(10 * time.Second); len(processesMentioning("sleep\x00"+nap)) < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the exec'd guest did not start")
		}
	}
	for i := 0; i < 3; i++ {
		if i > 0 {
			ex = command(t, runsc, "--root="+c.root, "exec", id, "--", "sleep", nap)
			if err := ex.Start(); err != nil {
				t.Fatal(err)
			}
			defer ex.Wait()
			time.Sleep(100 * time.Millisecond)
		}
		// c.restart fails the test unless the CLI got its answer.
		tm := c.restart(id)
		if tm.LiveupdateNumber != uint64(i+1) {
			t.Fatalf("restart %d: %+v", i, tm)
		}
	}
	c.must("kill", id)
	if _, errOut, code := c.run("delete", id); code != 0 {
		out, _, _ := c.run("state", id)
		t.Fatalf("delete after kill: %s; state: %s; processes: %v", errOut, out, processesMentioning(c.root))
	}
}
