package sandbox

import "testing"

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"4096", 4096}, {"64M", 64 << 20}, {"64MiB", 64 << 20}, {"1g", 1 << 30}, {"4GiB", 4 << 30}, {"2T", 2 << 40},
		{"0", 0}, {"-1M", 0}, {"1X", 0}, {"", 0}, {"2000T", 0},
	} {
		got, err := ParseSize(tc.in)
		if (err != nil) != (tc.want == 0) || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}
