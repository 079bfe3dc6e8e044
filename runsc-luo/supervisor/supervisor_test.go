package supervisor

import (
	"fmt"
	"os"
	"testing"
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
