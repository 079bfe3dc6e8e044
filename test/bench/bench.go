package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
)

// Method names, as -methods takes them.
const (
	methodTransfer   = "transfer"
	methodExec       = "exec"
	methodGVisor     = "gvisor"
	methodGVisorDir  = "gvisor-direct"
	methodGVisorBg   = "gvisor-background"
	methodCopyFloor  = "copy"
	folio4K, folio2M = "4K", "2M"
)

var allMethods = []string{methodTransfer, methodExec, methodGVisor, methodGVisorDir, methodGVisorBg, methodCopyFloor}

// Config is one benchmark run.
type Config struct {
	// Sizes are the preserved sizes in bytes.
	Sizes []uint64
	// Folios are the folio sizes of livesentry's memfds (folio4K,
	// folio2M).
	Folios []string
	// Methods are the methods to measure.
	Methods []string
	// Reps is the number of measured runs per size and method.
	Reps int
	// RunscLUO is the runsc-luo binary; Runsc gVisor's runsc ("" or
	// missing: the gVisor methods are skipped with the reason); Holder
	// the static program gVisor checkpoints.
	RunscLUO, Runsc, Holder string
	// WorkDir holds sandbox roots, bundles and checkpoint images.
	WorkDir string
	// Logf reports progress.
	Logf func(format string, args ...any)
	// Save, if set, is called with the results so far after each size,
	// so that a run cut short keeps what it measured.
	Save func(*Results)
	// Idle, if its Restarts is not 0, also measures the blackout's
	// spread over many transfer restarts of an idle guest.
	Idle IdleConfig
	// Interleave runs livesentry's sandboxes of every size at once, for
	// each method and folio size, and interleaves their restarts (see
	// measureInterleaved), if they fit in memory together; otherwise,
	// or if false, each size is measured alone in turn.
	Interleave bool
	// Quiet makes each livesentry restart wait until the machine is
	// quiet (see waitQuiet), after the row's idle gap.
	Quiet bool
}

// IdleConfig is the idle-guest measurement: Restarts transfer restarts
// of one sandbox holding Size bytes in Folio folios, each Gap after the
// guest has verified its data and preserved the next generation, so
// that the guest makes no call when the restart comes. It reports
// percentiles, which a handful of reps cannot.
type IdleConfig struct {
	Restarts int
	Size     uint64
	Folio    string
	Gap      time.Duration
}

// Sample is one measured value per run.
type Sample []time.Duration

func (s Sample) sorted() []time.Duration {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}

// Median is the median (the lower middle of an even count).
func (s Sample) Median() time.Duration {
	if len(s) == 0 {
		return 0
	}
	return s.sorted()[(len(s)-1)/2]
}

// Percentile is the nearest-rank p-th percentile (0 < p ≤ 100): the
// smallest value that at least p% of the sample is not above. The 99th
// of 100 values is the second largest, of 200 the third largest.
func (s Sample) Percentile(p float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := s.sorted()
	i := int(math.Ceil(p/100*float64(len(c)))) - 1
	return c[max(0, min(i, len(c)-1))]
}

// Min and Max are the extremes.
func (s Sample) Min() time.Duration { return slices.Min(s) }
func (s Sample) Max() time.Duration { return slices.Max(s) }

// Row is one method at one size: its measured runs or why it was skipped.
type Row struct {
	Size   uint64
	Method string
	// Folio is livesentry's folio size ("" for gVisor and the copy
	// floor, which use the host's 4 KiB pages).
	Folio string
	// Pause is the time the application cannot run: livesentry's
	// blackout, gVisor's app pause, the copy floor's copy.
	Pause Sample
	// Data is livesentry's time to data (blackout start → the relaunched
	// guest has retrieved everything and read the last byte).
	Data Sample
	// Relaunch is the part of Data before the relaunched guest program
	// runs (blackout start → its demo.Event.RunAt): the runtime's
	// relaunch of the entrypoint and the program's own start-up.
	Relaunch Sample
	// MetadataBytes is what livesentry hands over besides the data (see
	// metadata.go); 0 for the others.
	MetadataBytes uint64
	// Skipped says why nothing was measured.
	Skipped string
	// IdleGap is, for the idle-guest measurement (Config.Idle), the
	// wait before each restart after the guest preserved its
	// generation; 0 for the rows of the main table.
	IdleGap time.Duration `json:",omitempty"`
}

// Name is the row's label in the table and the plot.
func (r *Row) Name() string {
	switch r.Method {
	case methodTransfer, methodExec:
		if r.IdleGap > 0 {
			return fmt.Sprintf("livesentry %s, idle guest, %s folios", r.Method, folioLabel(r.Folio))
		}
		return fmt.Sprintf("livesentry %s, %s folios", r.Method, folioLabel(r.Folio))
	case methodGVisor:
		return "gVisor checkpoint + restore"
	case methodGVisorDir:
		return "gVisor --direct"
	case methodGVisorBg:
		return "gVisor restore --background"
	case methodCopyFloor:
		return "copy floor (copy_file_range)"
	}
	return r.Method
}

func folioLabel(f string) string {
	if f == folio2M {
		return "2 MiB"
	}
	return "4 KiB"
}

// Results is a run's rows in the order measured, and the notes about it
// (or several runs' merged: Commands has one entry per run).
type Results struct {
	Rows     []*Row
	Notes    []string
	Commands []string
	// Load is each run's 1-minute load average when it started.
	Load  []string `json:",omitempty"`
	Start time.Time
	Took  time.Duration
}

func sizeLabel(n uint64) string {
	if n >= 1<<30 && n%(1<<30) == 0 {
		return fmt.Sprintf("%d GiB", n>>30)
	}
	return fmt.Sprintf("%d MiB", n>>20)
}

// ParseSize parses 64M, 1G, 4GiB and the like (sandbox.ParseSize), in
// whole pages.
func ParseSize(s string) (uint64, error) {
	v, err := sandbox.ParseSize(s)
	if err != nil {
		return 0, err
	}
	if v%4096 != 0 {
		return 0, fmt.Errorf("size %q: want a multiple of 4 KiB", s)
	}
	return v, nil
}

// fits says whether size can be measured here: both livesentry (the old
// generation and the next one in the memory file) and gVisor (the
// sandbox's memory and the restored copy) hold about twice size, plus
// the checkpoint image in the page cache; and the image must fit on disk.
func fits(size uint64, dir string) (bool, string) {
	avail, err := memAvailable()
	if err != nil {
		return false, err.Error()
	}
	need := size*5/2 + 512<<20
	if need > avail {
		return false, fmt.Sprintf("needs about %s of memory (2.5× the size), %s available", sizeLabel(need), sizeLabel(avail))
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil {
		if free := st.Bavail * uint64(st.Bsize); size+size/4 > free {
			return false, fmt.Sprintf("the checkpoint image needs %s of disk, %s free", sizeLabel(size), sizeLabel(free))
		}
	}
	return true, ""
}

// fitTogether reports whether sandboxes of all sizes fit in memory at once
// (as fits, for their sum), and if not says why.
func fitTogether(sizes []uint64) (bool, string) {
	avail, err := memAvailable()
	if err != nil {
		return false, err.Error()
	}
	need := uint64(512 << 20)
	for _, s := range sizes {
		need += s * 5 / 2
	}
	if need > avail {
		return false, fmt.Sprintf("need about %s of memory, %s available", sizeLabel(need), sizeLabel(avail))
	}
	return true, ""
}

// rowKey names a size and folio size in maps of Run.
func rowKey(size uint64, folio string) string { return fmt.Sprintf("%d/%s", size, folio) }

func memAvailable() (uint64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var kb uint64
		if _, err := fmt.Sscanf(sc.Text(), "MemAvailable: %d kB", &kb); err == nil {
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no MemAvailable in /proc/meminfo")
}

func has(list []string, s string) bool { return slices.Contains(list, s) }

// Run measures every size, folio size and method of c.
func Run(c Config) (*Results, error) {
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
	if c.Reps < 1 {
		return nil, fmt.Errorf("reps must be at least 1")
	}
	if len(c.Methods) == 0 && c.Idle.Restarts == 0 {
		return nil, fmt.Errorf("nothing to measure: no method and no idle restarts")
	}
	if c.Idle.Restarts < 0 {
		return nil, fmt.Errorf("idle restarts must not be negative")
	}
	if c.Idle.Restarts > 0 {
		if c.Idle.Folio != folio4K && c.Idle.Folio != folio2M {
			return nil, fmt.Errorf("unknown idle folio size %q (want 4K or 2M)", c.Idle.Folio)
		}
		if c.Idle.Gap <= 0 {
			return nil, fmt.Errorf("the idle gap must be positive: the row is told apart by it")
		}
	}
	for _, m := range c.Methods {
		if !has(allMethods, m) {
			return nil, fmt.Errorf("unknown method %q (want some of %s)", m, strings.Join(allMethods, ","))
		}
	}
	for _, f := range c.Folios {
		if f != folio4K && f != folio2M {
			return nil, fmt.Errorf("unknown folio size %q (want 4K or 2M)", f)
		}
	}
	res := &Results{Start: time.Now(), Load: loadAverage()}
	gvisorWhy := ""
	if has(c.Methods, methodGVisor) || has(c.Methods, methodGVisorDir) || has(c.Methods, methodGVisorBg) {
		gvisorWhy = gvisorUsable(c)
		if gvisorWhy != "" {
			res.Notes = append(res.Notes, "gVisor skipped: "+gvisorWhy)
		}
	}
	sizes := c.Sizes
	if len(c.Methods) == 0 {
		sizes = nil
	}
	// The sizes measured, and the metadata of each with each folio size.
	var fitting []uint64
	meta := map[string]uint64{}
	for _, size := range sizes {
		if ok, why := fits(size, c.WorkDir); !ok {
			res.Notes = append(res.Notes, fmt.Sprintf("%s skipped: %s", sizeLabel(size), why))
			c.Logf("%s skipped: %s", sizeLabel(size), why)
			continue
		}
		fitting = append(fitting, size)
		for _, folio := range c.Folios {
			if has(c.Methods, methodTransfer) || has(c.Methods, methodExec) {
				c.Logf("%s, %s folios: measuring the metadata handed over", sizeLabel(size), folioLabel(folio))
				m, err := measureMetadata(size, folio == folio4K)
				if err != nil {
					return nil, fmt.Errorf("metadata of %s, %s folios: %w", sizeLabel(size), folio, err)
				}
				meta[rowKey(size, folio)] = m.Total()
				res.Notes = append(res.Notes, fmt.Sprintf("metadata at %s, %s folios: %s", sizeLabel(size), folioLabel(folio), m))
			}
		}
	}
	if c.Quiet && (has(c.Methods, methodTransfer) || has(c.Methods, methodExec)) {
		res.Notes = append(res.Notes, fmt.Sprintf("each livesentry restart started once the CPUs had been %.0f%% idle for %v (waiting at most %v): not in the middle of the work the previous restart left behind (old sentry and guest teardown, punching and reclaim of the generation the guest freed)", quietIdle*100, quietWindow, quietMax))
	}
	// livesentry's rows measured with their restarts interleaved, by
	// size, method and folio size.
	interleaved := map[string]*Row{}
	if c.Interleave && len(fitting) > 1 && (has(c.Methods, methodTransfer) || has(c.Methods, methodExec)) {
		if ok, why := fitTogether(fitting); !ok {
			res.Notes = append(res.Notes, "livesentry's restarts measured one size at a time: the sizes together "+why)
		} else {
			res.Notes = append(res.Notes, "livesentry's restarts of every size interleaved: the sandboxes of all sizes ran at once, restarted in turn (restart 1 of each size, then 2, ...)")
			for _, folio := range c.Folios {
				for _, mode := range []string{methodTransfer, methodExec} {
					if !has(c.Methods, mode) {
						continue
					}
					var rows []*Row
					for _, size := range fitting {
						r := &Row{Size: size, Method: mode, Folio: folio, MetadataBytes: meta[rowKey(size, folio)]}
						rows = append(rows, r)
						interleaved[rowKey(size, folio)+mode] = r
					}
					if err := measureInterleaved(c, rows, c.Reps); err != nil {
						return nil, fmt.Errorf("livesentry %s, %s folios: %w", mode, folio, err)
					}
				}
			}
		}
	}
	for _, size := range fitting {
		for _, folio := range c.Folios {
			for _, mode := range []string{methodTransfer, methodExec} {
				if !has(c.Methods, mode) {
					continue
				}
				if r := interleaved[rowKey(size, folio)+mode]; r != nil {
					res.Rows = append(res.Rows, r)
					continue
				}
				r := &Row{Size: size, Method: mode, Folio: folio, MetadataBytes: meta[rowKey(size, folio)]}
				if err := measureLivesentry(c, r, c.Reps); err != nil {
					return nil, fmt.Errorf("livesentry %s at %s, %s folios: %w", mode, sizeLabel(size), folio, err)
				}
				res.Rows = append(res.Rows, r)
			}
		}
		for _, m := range []string{methodGVisor, methodGVisorDir, methodGVisorBg} {
			if !has(c.Methods, m) {
				continue
			}
			r := &Row{Size: size, Method: m}
			if gvisorWhy != "" {
				r.Skipped = gvisorWhy
			} else if err := measureGVisor(c, r); err != nil {
				// One variant failing (a runsc error at one size) does
				// not lose the rest of the run.
				r.Skipped = err.Error()
				c.Logf("%s at %s failed: %v", r.Name(), sizeLabel(size), err)
			}
			res.Rows = append(res.Rows, r)
		}
		if has(c.Methods, methodCopyFloor) {
			r := &Row{Size: size, Method: methodCopyFloor}
			if err := measureCopyFloor(c, r); err != nil {
				return nil, fmt.Errorf("copy floor at %s: %w", sizeLabel(size), err)
			}
			res.Rows = append(res.Rows, r)
		}
		res.Took = time.Since(res.Start)
		if c.Save != nil {
			c.Save(res)
		}
	}
	if c.Idle.Restarts > 0 {
		r := &Row{Size: c.Idle.Size, Method: methodTransfer, Folio: c.Idle.Folio, IdleGap: c.Idle.Gap}
		if ok, why := fits(r.Size, c.WorkDir); !ok {
			r.Skipped = why
			c.Logf("%s skipped: %s", r.Name(), why)
		} else if err := measureLivesentry(c, r, c.Idle.Restarts); err != nil {
			return nil, fmt.Errorf("%s at %s: %w", r.Name(), sizeLabel(r.Size), err)
		}
		res.Rows = append(res.Rows, r)
	}
	res.Took = time.Since(res.Start)
	return res, nil
}

func ms(d time.Duration) string {
	v := float64(d) / 1e6
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func spread(s Sample) string {
	if len(s) == 0 {
		return "—"
	}
	if len(s) == 1 {
		return ms(s[0])
	}
	return fmt.Sprintf("%s (%s–%s)", ms(s.Median()), ms(s.Min()), ms(s.Max()))
}

func kib(n uint64) string {
	if n == 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f KiB", float64(n)/1024)
}

// find returns the measured row of method (and folio) at size, or nil.
func (r *Results) find(size uint64, method, folio string) *Row {
	for _, row := range r.Rows {
		if row.Size == size && row.Method == method && row.Folio == folio && row.IdleGap == 0 && row.Skipped == "" && len(row.Pause) > 0 {
			return row
		}
	}
	return nil
}

func (r *Results) sizes() []uint64 {
	var s []uint64
	for _, row := range r.Rows {
		if !slices.Contains(s, row.Size) {
			s = append(s, row.Size)
		}
	}
	return s
}

// WriteTable writes the results as markdown: one table of every row,
// then the ratios per size.
func (r *Results) WriteTable(w io.Writer) {
	var timed, idle []*Row
	for _, row := range r.Rows {
		if row.IdleGap > 0 {
			idle = append(idle, row)
		} else {
			timed = append(timed, row)
		}
	}
	if len(timed) > 0 {
		r.writeMain(w, timed)
	}
	if len(idle) > 0 {
		if len(timed) > 0 {
			fmt.Fprintf(w, "\n")
		}
		fmt.Fprintf(w, "Blackouts of transfer restarts of an idle guest, in ms: each restart the stated gap after the guest preserved its next generation (nearest-rank percentiles).\n\n")
		fmt.Fprintf(w, "| size | method | gap | p50 | p90 | p99 | max | restarts |\n|---|---|---|---|---|---|---|---|\n")
		for _, row := range idle {
			if row.Skipped != "" {
				fmt.Fprintf(w, "| %s | %s | %v | skipped: %s | | | | 0 |\n", sizeLabel(row.Size), row.Name(), row.IdleGap, strings.ReplaceAll(row.Skipped, "|", "/"))
				continue
			}
			p := row.Pause
			fmt.Fprintf(w, "| %s | %s | %v | %s | %s | %s | %s | %d |\n", sizeLabel(row.Size), row.Name(), row.IdleGap,
				ms(p.Percentile(50)), ms(p.Percentile(90)), ms(p.Percentile(99)), ms(p.Max()), len(p))
		}
	}
	if len(r.Notes) > 0 {
		fmt.Fprintf(w, "\n")
		for _, n := range r.Notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

// writeMain writes the table of every size and method, then the ratios
// per size.
func (r *Results) writeMain(w io.Writer, rows []*Row) {
	fmt.Fprintf(w, "Times in ms: median (min–max) of the runs counted in the last column.\n\n")
	fmt.Fprintf(w, "| size | method | app pause / blackout | time to data | of which before the guest runs | metadata handed over | runs |\n|---|---|---|---|---|---|---|\n")
	for _, row := range rows {
		if row.Skipped != "" {
			fmt.Fprintf(w, "| %s | %s | skipped: %s | | | | 0 |\n", sizeLabel(row.Size), row.Name(), strings.ReplaceAll(row.Skipped, "|", "/"))
			continue
		}
		data, relaunch := "—", "—"
		if len(row.Data) > 0 {
			data = spread(row.Data)
		}
		if len(row.Relaunch) > 0 {
			relaunch = spread(row.Relaunch)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %d |\n", sizeLabel(row.Size), row.Name(), spread(row.Pause), data, relaunch, kib(row.MetadataBytes), len(row.Pause))
	}
	fmt.Fprintf(w, "\nRatios of medians (4 KiB folios for livesentry).\n\n")
	fmt.Fprintf(w, "| size | gVisor ÷ transfer blackout | gVisor --direct ÷ transfer blackout | gVisor --background ÷ transfer blackout | copy floor ÷ transfer blackout | gVisor ÷ transfer time to data | exec ÷ transfer blackout |\n|---|---|---|---|---|---|---|\n")
	for _, size := range r.sizes() {
		tr := r.find(size, methodTransfer, folio4K)
		if tr == nil {
			continue
		}
		ratio := func(m string, data bool) string {
			folio := ""
			if m == methodExec {
				folio = folio4K
			}
			o := r.find(size, m, folio)
			if o == nil {
				return "—"
			}
			den := tr.Pause.Median()
			if data {
				den = tr.Data.Median()
			}
			return fmt.Sprintf("%.0f×", float64(o.Pause.Median())/float64(den))
		}
		exec := "—"
		if o := r.find(size, methodExec, folio4K); o != nil {
			exec = fmt.Sprintf("%.1f×", float64(o.Pause.Median())/float64(tr.Pause.Median()))
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", sizeLabel(size), ratio(methodGVisor, false), ratio(methodGVisorDir, false),
			ratio(methodGVisorBg, false), ratio(methodCopyFloor, false), ratio(methodGVisor, true), exec)
	}
}

// repoRoot is the directory of the go.mod above the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Merge returns the rows and notes of several runs as one result.
func Merge(runs []*Results) *Results {
	out := &Results{}
	for i, r := range runs {
		if i == 0 || r.Start.Before(out.Start) {
			out.Start = r.Start
		}
		out.Rows = append(out.Rows, r.Rows...)
		out.Notes = append(out.Notes, r.Notes...)
		out.Commands = append(out.Commands, r.Commands...)
		out.Load = append(out.Load, r.Load...)
		out.Took += r.Took
	}
	return out
}

// SaveJSON writes r to path.
func (r *Results) SaveJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// LoadJSON reads results SaveJSON wrote.
func LoadJSON(path string) (*Results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// loadAverage returns the 1-minute load average, as one string in a
// slice, nil if it cannot be read.
func loadAverage() []string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return nil
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return nil
	}
	return f[:1]
}
