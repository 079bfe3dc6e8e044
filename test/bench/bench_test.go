package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"64M", 64 << 20, true},
		{"1G", 1 << 30, true},
		{"4GiB", 4 << 30, true},
		{"8K", 8 << 10, true},
		{"0M", 0, false},
		{"12345", 0, false}, // not a multiple of 4 KiB
		{"1X", 0, false},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSize(tc.in)
			if (err == nil) != tc.ok || got != tc.want {
				t.Fatalf("ParseSize(%q) = %d, %v; want %d, ok %v", tc.in, got, err, tc.want, tc.ok)
			}
		})
	}
}

func TestPercentileIsTheNearestRank(t *testing.T) {
	ms := time.Millisecond
	var s Sample
	for i := 100; i >= 1; i-- {
		s = append(s, time.Duration(i)*ms)
	}
	for _, tc := range []struct {
		p    float64
		want time.Duration
	}{{50, 50 * ms}, {90, 90 * ms}, {99, 99 * ms}, {100, 100 * ms}, {0.5, 1 * ms}} {
		if got := s.Percentile(tc.p); got != tc.want {
			t.Errorf("p%v of 1..100 ms: %v, want %v", tc.p, got, tc.want)
		}
	}
	if got := (Sample{3 * ms, 1 * ms, 2 * ms}).Percentile(99); got != 3*ms {
		t.Errorf("p99 of 3 values: %v, want the largest", got)
	}
	if got := (Sample{}).Percentile(50); got != 0 {
		t.Errorf("p50 of nothing: %v", got)
	}
}

func TestMedianOfAnOddAndAnEvenCount(t *testing.T) {
	ms := time.Millisecond
	if got := (Sample{5 * ms, 1 * ms, 3 * ms}).Median(); got != 3*ms {
		t.Errorf("median of 5, 1, 3 ms: %v", got)
	}
	if got := (Sample{4 * ms, 1 * ms, 3 * ms, 2 * ms}).Median(); got != 2*ms {
		t.Errorf("median of 4, 1, 3, 2 ms: %v (want the lower middle)", got)
	}
}

// sandboxTest skips a test that builds and runs sandboxes in -short mode,
// and returns the repository's root and a directory for the run.
func sandboxTest(t *testing.T) (root, dir string) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs sandboxes")
	}
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root, t.TempDir()
}

// TestSmokeRunMeasuresEveryMethod runs the benchmark's own code at a tiny
// size with one rep: real runsc-luo sandboxes restarted in both modes,
// the metadata walk, the copy floor and, if a runsc is cached in the
// repository and this runs as root, gVisor. It checks that every method
// produced a plausible measurement and that the table and the plot are
// written.
func TestSmokeRunMeasuresEveryMethod(t *testing.T) {
	root, dir := sandboxTest(t)
	c := Config{
		Sizes:   []uint64{8 << 20},
		Folios:  []string{folio4K},
		Methods: []string{methodTransfer, methodExec, methodCopyFloor},
		Reps:    1,
		Runsc:   filepath.Join(root, ".cache", "bin", "runsc"),
		WorkDir: dir,
		Logf:    t.Logf,
		Idle:    IdleConfig{Restarts: 3, Size: 8 << 20, Folio: folio2M, Gap: 20 * time.Millisecond},
	}
	var err error
	if c.RunscLUO, c.Holder, err = buildBinaries(root, dir); err != nil {
		t.Fatal(err)
	}
	if why := gvisorUsable(c); why == "" {
		c.Methods = append(c.Methods, methodGVisor)
	} else {
		t.Logf("gVisor not measured: %s", why)
	}
	res, err := Run(c)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Rows) != len(c.Methods)+1 {
		t.Fatalf("%d rows for %d methods and the idle guest: %+v", len(res.Rows), len(c.Methods), res.Rows)
	}
	idle := res.Rows[len(res.Rows)-1]
	if idle.IdleGap != c.Idle.Gap || idle.Folio != folio2M || idle.Skipped != "" || len(idle.Pause) != 3 || slices.Min(idle.Pause) <= 0 || idle.Pause.Max() > time.Minute {
		t.Errorf("idle row: %+v", idle)
	}
	for _, r := range res.Rows[:len(res.Rows)-1] {
		if r.Skipped != "" || len(r.Pause) != 1 || r.Pause[0] <= 0 || r.Pause[0] > time.Minute {
			t.Errorf("%s: pause %v, skipped %q", r.Name(), r.Pause, r.Skipped)
		}
		switch r.Method {
		case methodTransfer, methodExec:
			if len(r.Data) != 1 || r.Data[0] < r.Pause[0] {
				t.Errorf("%s: time to data %v shorter than the blackout %v", r.Name(), r.Data, r.Pause)
			}
			if len(r.Relaunch) != 1 || r.Relaunch[0] <= 0 || r.Relaunch[0] > r.Data[0] {
				t.Errorf("%s: the relaunched guest ran %v after the pause, want within the time to data %v", r.Name(), r.Relaunch, r.Data)
			}
			// 8 MiB of 4 KiB folios: 2048 memfd-v1 records of 16 bytes,
			// and at least one KHO chunk and one bitmap page.
			if r.MetadataBytes < 2048*16+2*4096 || r.MetadataBytes > 1<<20 {
				t.Errorf("%s: metadata %d bytes", r.Name(), r.MetadataBytes)
			}
		}
	}
	var table bytes.Buffer
	res.WriteTable(&table)
	for _, want := range []string{"| 8 MiB | livesentry transfer, 4 KiB folios |", "| 8 MiB | copy floor (copy_file_range) |",
		"| p50 | p90 | p99 | max | restarts |", "| 8 MiB | livesentry transfer, idle guest, 2 MiB folios | 20ms | "} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	png := filepath.Join(dir, "bench.png")
	if err := res.WritePlot(png); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(png)
	if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatalf("plot: %d bytes, %v; want a PNG", len(b), err)
	}
}

func TestMergeOfSavedRunsKeepsEveryRowAndCommand(t *testing.T) {
	dir := t.TempDir()
	a := &Results{Rows: []*Row{{Size: 64 << 20, Method: methodTransfer, Folio: folio4K, Pause: Sample{time.Millisecond}, Data: Sample{9 * time.Millisecond}, MetadataBytes: 4096}},
		Notes: []string{"a"}, Commands: []string{"go run ./test/bench -sizes=64M"}, Took: time.Second}
	b := &Results{Rows: []*Row{{Size: 4 << 30, Method: methodGVisor, Skipped: "no runsc"}},
		Notes: []string{"b"}, Commands: []string{"go run ./test/bench -sizes=4G"}, Took: 2 * time.Second}
	var runs []*Results
	for i, r := range []*Results{a, b} {
		p := filepath.Join(dir, fmt.Sprintf("%d.json", i))
		if err := r.SaveJSON(p); err != nil {
			t.Fatal(err)
		}
		l, err := LoadJSON(p)
		if err != nil {
			t.Fatal(err)
		}
		runs = append(runs, l)
	}
	m := Merge(runs)
	if len(m.Rows) != 2 || m.Rows[0].Data.Median() != 9*time.Millisecond || m.Rows[1].Skipped != "no runsc" ||
		len(m.Commands) != 2 || len(m.Notes) != 2 || m.Took != 3*time.Second {
		t.Fatalf("merged: %+v rows %+v %+v", m, m.Rows[0], m.Rows[1])
	}
	page := m.page(func() string { var w bytes.Buffer; m.WriteTable(&w); return w.String() }(), "docs/bench.md", "docs/bench.png")
	for _, want := range []string{a.Commands[0], b.Commands[0], "| 4 GiB | gVisor checkpoint + restore | skipped: no runsc |", "](bench.png)"} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q:\n%s", want, page)
		}
	}
}

// TestInterleavedRestartsTakeTurns checks that with Interleave the
// sandboxes of every size run at once and are restarted in turn, restart
// 1 of each size before restart 2 of any, and that each row still gets
// its own restarts.
func TestInterleavedRestartsTakeTurns(t *testing.T) {
	root, dir := sandboxTest(t)
	var order []string
	c := Config{
		Sizes:      []uint64{8 << 20, 12 << 20},
		Folios:     []string{folio4K},
		Methods:    []string{methodTransfer},
		Reps:       2,
		WorkDir:    dir,
		Interleave: true,
		Logf: func(format string, args ...any) {
			line := fmt.Sprintf(format, args...)
			t.Log(line)
			if i := strings.Index(line, ": blackout"); i > 0 && strings.Contains(line, "transfer restart") {
				order = append(order, line[:i])
			}
		},
	}
	var err error
	if c.RunscLUO, c.Holder, err = buildBinaries(root, dir); err != nil {
		t.Fatal(err)
	}
	res, err := Run(c)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"8 MiB 4 KiB: transfer restart 1", "12 MiB 4 KiB: transfer restart 1",
		"8 MiB 4 KiB: transfer restart 2", "12 MiB 4 KiB: transfer restart 2",
	}
	if !slices.Equal(order, want) {
		t.Errorf("restarts in the order\n%s\nwant\n%s", strings.Join(order, "\n"), strings.Join(want, "\n"))
	}
	if len(res.Rows) != 2 || res.Rows[0].Size != 8<<20 || res.Rows[1].Size != 12<<20 {
		t.Fatalf("rows %+v, want 8 MiB then 12 MiB", res.Rows)
	}
	for _, r := range res.Rows {
		if len(r.Pause) != 2 || r.MetadataBytes == 0 {
			t.Errorf("%s at %s: %d blackouts, metadata %d bytes; want 2 and the metadata", r.Name(), sizeLabel(r.Size), len(r.Pause), r.MetadataBytes)
		}
	}
	if !slices.ContainsFunc(res.Notes, func(n string) bool { return strings.Contains(n, "interleaved") }) {
		t.Errorf("no note says the restarts were interleaved: %q", res.Notes)
	}
}

// waitQuiet reads the CPUs' idle time: a machine is always at least 0%
// idle, at once, and never more than 100% idle, so that waiting for it
// ends at the limit.
func TestWaitQuietEndsAtOnceOrAtItsLimit(t *testing.T) {
	idle, total, err := cpuTimes()
	if err != nil || total == 0 || idle > total {
		t.Fatalf("cpuTimes: idle %d, total %d, %v", idle, total, err)
	}
	if waited, err := waitQuiet(0, 100*time.Millisecond, 5*time.Second); err != nil || waited > 2*time.Second {
		t.Errorf("waiting for 0%% idle: %v, %v; want about 100 ms", waited, err)
	}
	if waited, err := waitQuiet(1.01, 100*time.Millisecond, 300*time.Millisecond); err != nil || waited < 300*time.Millisecond {
		t.Errorf("waiting for 101%% idle: %v, %v; want the 300 ms limit", waited, err)
	}
}
