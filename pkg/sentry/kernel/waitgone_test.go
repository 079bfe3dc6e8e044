package kernel

import (
	"os"
	"testing"
	"time"
)

func TestWaitGoneWaitsForTheGuestsConnectionUnlessTheKernelIsPaused(t *testing.T) {
	s := newSandbox(t)
	pid := []int{os.Getpid()} // the guests dialled from this test
	g := s.dial(t)
	if _, err := g.MemfdCreate("held", 0); err != nil {
		t.Fatal(err)
	}
	// Connected: WaitGone gives up after its timeout.
	start := time.Now()
	s.k.WaitGone(pid, 50*time.Millisecond)
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("WaitGone returned after %v with the guest still connected", d)
	}
	// Paused: the guest's death would be held, so it does not wait.
	if err := s.k.Pause(time.Time{}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	s.k.WaitGone(pid, 10*time.Second)
	if d := time.Since(start); d > time.Second {
		t.Fatalf("WaitGone on a paused kernel took %v", d)
	}
	s.k.Resume()
	// Disconnected: it returns once the kernel has closed its fds.
	g.Disconnect()
	start = time.Now()
	s.k.WaitGone(pid, 10*time.Second)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("WaitGone took %v after the guest disconnected", d)
	}
	s.k.mu.Lock()
	left := len(s.k.procs)
	s.k.mu.Unlock()
	if left != 0 {
		t.Errorf("%d guest processes left after WaitGone", left)
	}
}
