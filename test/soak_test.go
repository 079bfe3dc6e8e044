package test

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

var (
	soakOnce sync.Once
	soakBin  string
	soakErr  error
)

// buildSoak builds the soak command once.
func buildSoak(t testing.TB) string {
	soakOnce.Do(func() {
		soakBin = filepath.Join(binDir, "soak")
		if out, err := exec.Command("go", "build", "-o", soakBin, "github.com/livesentry/livesentry/test/soak").CombinedOutput(); err != nil {
			soakErr = fmt.Errorf("building the soak command: %v\n%s", err, out)
		}
	})
	if soakErr != nil {
		t.Fatal(soakErr)
	}
	return soakBin
}

// runSoak runs the soak command on runsc with args; err is nil only if it
// passed.
func runSoak(soak string, args ...string) (string, error) {
	out, err := exec.Command(soak, append([]string{"-runsc=" + runsc}, args...)...).CombinedOutput()
	if err == nil && !strings.Contains(string(out), "soak: PASS") {
		err = fmt.Errorf("no PASS")
	}
	return string(out), err
}

// soakPercentiles returns the p50 and p99 blackout (ms) the soak printed
// for mode.
func soakPercentiles(t testing.TB, out, mode string) (p50, p99 float64) {
	for _, line := range strings.Split(out, "\n") {
		var m string
		var n int
		var max float64
		if k, _ := fmt.Sscan(line, &m, &n, &p50, &p99, &max); k == 5 && m == mode {
			return p50, p99
		}
	}
	t.Fatalf("no %s blackout in the soak's output", mode)
	return 0, 0
}

// The soak command, short: 20 restarts alternating modes, every 5th a
// SIGKILL of the serving sentry, while the guest rewrites a 32 MiB
// preserved memfd; every restart verified word by word, and the
// supervisor's and the sentry's fds, RSS and memory file flat (an fd
// leaked per recovery fails it).
func TestSoakShort(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	out, err := runSoak(buildSoak(t), "-n=20", "-size=32M", "-kill-every=5", "-report-every=5", "-fd-growth=2")
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("soak: %v", err)
	}
}
