package boot

import (
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

func TestWithPreloadPutsTheShimFirst(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		want []string
	}{
		{name: "no LD_PRELOAD gets the shim alone", env: []string{"A=1"}, want: []string{"A=1", "LD_PRELOAD=/s.so"}},
		{name: "an LD_PRELOAD keeps its libraries after the shim", env: []string{"LD_PRELOAD=/x.so", "B=2"}, want: []string{"B=2", "LD_PRELOAD=/s.so:/x.so"}},
		{name: "the last of two LD_PRELOADs wins, as for execve", env: []string{"LD_PRELOAD=/x.so", "LD_PRELOAD=/y.so"}, want: []string{"LD_PRELOAD=/s.so:/y.so"}},
		{name: "an empty LD_PRELOAD gets the shim alone", env: []string{"LD_PRELOAD="}, want: []string{"LD_PRELOAD=/s.so"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := withPreload(tc.env, "/s.so"); !slices.Equal(got, tc.want) {
				t.Errorf("withPreload(%q) = %q, want %q", tc.env, got, tc.want)
			}
		})
	}
}

func TestProcWaitWakesAtTheReapOrAtTheExit(t *testing.T) {
	for _, exited := range []bool{false, true} {
		cmd := exec.Command("sleep", "0.1")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pid := cmd.Process.Pid
		start := sandbox.StartTime(pid)
		w := openProcWait(pid, start, exited)
		if w.fd < 0 {
			t.Skip("no pidfd for a child on this kernel")
		}
		// Reaped 300 ms after its start, 200 ms after its exit.
		reaped := make(chan struct{})
		go func() {
			time.Sleep(300 * time.Millisecond)
			cmd.Wait()
			close(reaped)
		}()
		t0 := time.Now()
		w.wait(5 * time.Second)
		took := time.Since(t0)
		w.close()
		if took >= 5*time.Second {
			<-reaped
			t.Skip("the kernel reports no POLLHUP on a pidfd when its process is reaped (before Linux 6.9)")
		}
		if exited {
			if took >= 250*time.Millisecond || !exists(pid, start) {
				t.Errorf("a wait for the exit returned after %v, reaped already %v: want at the exit, before the reap", took, !exists(pid, start))
			}
		} else if took < 250*time.Millisecond || exists(pid, start) {
			t.Errorf("a wait for the reap returned after %v, the process still there %v: want once it is reaped", took, exists(pid, start))
		}
		<-reaped
	}
}

func TestProcWaitOfAProcessGoneOrReplacedIsASleep(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if w := openProcWait(cmd.Process.Pid, 1, false); w.fd >= 0 {
		w.close()
		t.Fatal("a pidfd for a process that is gone")
	}
	// A live process whose start time is not the one recorded: another
	// process now has the pid.
	if w := openProcWait(os.Getpid(), sandbox.StartTime(os.Getpid())+1, false); w.fd >= 0 {
		w.close()
		t.Fatal("a pidfd for a process that started at another time than the one recorded")
	}
}
