package boot

import (
	"strings"
	"testing"
)

// An exec-mode restart speaks the newest handover protocol both builds
// know, by what the new binary's "abi" says; a build whose oldest protocol
// is newer than this one's newest is refused, naming both ranges.
func TestExecSpeaksTheNewestProtocolBothBuildsKnow(t *testing.T) {
	tests := []struct {
		name string
		info ABIInfo
		want int
		err  string
	}{
		{"a build of protocol 3", ABIInfo{Protocol: 3}, 3, ""},
		{"a build of protocol 4", ABIInfo{Protocol: 3, NewestProtocol: 4}, 4, ""},
		{"this build", ThisABI("v"), 5, ""},
		{"a newer build that still speaks 3", ABIInfo{Protocol: 3, NewestProtocol: 7}, 5, ""},
		{"a build that speaks only newer ones", ABIInfo{Protocol: 6, NewestProtocol: 7}, 0, "speaks handover protocol 6 to 7, this sentry 3 to 5"},
		{"a build of protocol 2", ABIInfo{Protocol: 2}, 0, "speaks handover protocol 2 to 2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.info.speak()
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("speak: %d, %v; want an error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("speak: %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}
