package boot

import (
	"os"
	"testing"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/supervisor"
)

// A stopping sentry tells its supervisor, with the exit status and the
// reason, before it tears anything down: a sentry killed in the middle of
// its stop then has the stop finished by the supervisor instead of being
// recovered into a sandbox whose entrypoint is gone.
func TestAStoppingSentryTellsTheSupervisorBeforeItTearsDown(t *testing.T) {
	s, _, _, _ := sandboxWithData(t)
	sup := fakeSupervisor(t, s)
	root, id := s.cfg.Root, s.cfg.ID

	// While the notice waits (for superMu), nothing is torn down yet.
	holdSuperMu(s, 300*time.Millisecond)
	go s.Stop(3, "the entrypoint exited")
	time.Sleep(150 * time.Millisecond)
	if _, err := os.Stat(sandbox.ControlPath(root, id)); err != nil {
		t.Errorf("the control socket is gone before the supervisor was told: %v", err)
	}
	if st, err := sandbox.ReadState(root, id); err != nil || st.Status != sandbox.StatusRunning {
		t.Errorf("before the supervisor was told, the state is %+v, %v; want running", st, err)
	}

	var n supervisor.Notice
	sup.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := sup.Recv(&n); err != nil {
		t.Fatalf("no notice from the stopping sentry: %v", err)
	}
	if n.Stop == nil || n.Stop.ExitStatus != 3 || n.Stop.Reason != "the entrypoint exited" {
		t.Fatalf("notice %+v (stop %+v), want a stop with exit status 3 and the reason", n, n.Stop)
	}
	if got := s.Wait(); got != 3 {
		t.Fatalf("the sentry exited with %d, want 3", got)
	}
	if st, err := sandbox.ReadState(root, id); err != nil || st.Status != sandbox.StatusStopped || st.ExitStatus == nil || *st.ExitStatus != 3 {
		t.Fatalf("after the stop the state is %+v, %v; want stopped with exit status 3", st, err)
	}
}
