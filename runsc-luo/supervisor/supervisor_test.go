package supervisor

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"
)

func TestStatExitingReadsTheFlagsField(t *testing.T) {
	for _, c := range []struct {
		line string
		want bool
	}{
		{"12 (sentry) S 1 12 12 0 -1 4194560 1 0 0 0", false},
		{"12 (sentry) R 1 12 12 0 -1 4194564 1 0 0 0", true},
		// A command name with spaces and parentheses.
		{"12 (a) b (c)) D 1 12 12 0 -1 4 1 0", true},
		{"12 (a) b (c)) D 1 12 12 0 -1 64 1 0", false},
		{"12 (short) S 1", false},
		{"garbage", false},
	} {
		if got := statExiting([]byte(c.line)); got != c.want {
			t.Errorf("statExiting(%q) = %t, want %t", c.line, got, c.want)
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	if statExiting(b) {
		t.Errorf("this running process reads as exiting: %s", b)
	}
}

// One pass over /proc names the children of each parent asked for, with
// their parent and whether they still run.
func TestChildrenOfSeveralParents(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 30 & echo $!; wait")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var grandchild int
	if _, err := fmt.Fscan(out, &grandchild); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = exec.Command("kill", "-9", fmt.Sprint(grandchild)).Run() }()
	me, sh := os.Getpid(), cmd.Process.Pid
	got := children(me, sh)
	want := []child{{pid: sh, ppid: me, alive: true}, {pid: grandchild, ppid: sh, alive: true}}
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("children(%d, %d) = %+v, lacks %+v", me, sh, got, w)
		}
	}
	for _, c := range got {
		if c.ppid != me && c.ppid != sh {
			t.Errorf("children(%d, %d) has %+v", me, sh, c)
		}
	}
	// A killed child counts, as a zombie, until it is reaped.
	cmd.Process.Kill()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if slices.Contains(children(me), child{pid: sh, ppid: me}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the killed child %d is not listed as a zombie: %+v", sh, children(me))
		}
	}
}
