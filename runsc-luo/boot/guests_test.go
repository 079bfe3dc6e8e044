package boot

import (
	"slices"
	"testing"
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
