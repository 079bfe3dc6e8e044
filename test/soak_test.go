package test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The soak command, short: 20 restarts alternating modes, every 5th a
// SIGKILL of the serving sentry, while the guest rewrites a 32 MiB
// preserved memfd; every restart verified word by word, and the
// supervisor's and the sentry's fds, RSS and memory file flat (an fd
// leaked per recovery fails it).
func TestSoakShort(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	soak := filepath.Join(binDir, "soak")
	if out, err := exec.Command("go", "build", "-o", soak, "github.com/livesentry/livesentry/test/soak").CombinedOutput(); err != nil {
		t.Fatalf("building the soak command: %v\n%s", err, out)
	}
	out, err := exec.Command(soak, "-runsc="+runsc, "-n=20", "-size=32M", "-kill-every=5", "-report-every=5", "-fd-growth=2").CombinedOutput()
	t.Logf("%s", out)
	if err != nil || !strings.Contains(string(out), "soak: PASS") {
		t.Fatalf("soak: %v", err)
	}
}
