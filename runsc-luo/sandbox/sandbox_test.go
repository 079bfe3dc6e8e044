package sandbox

import (
	"strings"
	"testing"
)

func TestCheckIDAcceptsWhatRunscAccepts(t *testing.T) {
	long := strings.Repeat("a", 64)
	for _, id := range []string{"a", "A1", "9", "c1.b-2_x", long} {
		if err := CheckID(id); err != nil {
			t.Errorf("CheckID(%q) = %v, want nil", id, err)
		}
	}
	for _, id := range []string{"", ".a", "-a", "_a", "a/b", "a b", "é", long + "a", "a\x00", "..", "a:b"} {
		if err := CheckID(id); err == nil {
			t.Errorf("CheckID(%q) = nil, want an error", id)
		}
	}
}
