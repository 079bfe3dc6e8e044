// Command bench measures what a restart costs the application, side by
// side: livesentry's live restart (transfer and exec modes, through the
// runsc-luo binary built from this checkout), real gVisor's runsc
// checkpoint + restore (defaults, --direct, restore --background), and
// the floor of any copying restart (copy_file_range of a memfd), for
// each preserved size. It writes a markdown page and a log–log plot.
//
//	go run ./test/bench                       # everything that fits, 5 reps
//	go run ./test/bench -build-runsc          # first build gVisor's runsc into .cache/bin
//	go run ./test/bench -smoke                # seconds: 64 MiB, 1 rep
//	go run ./test/bench -methods= -idle=200   # only the idle guest's blackout percentiles
//
// See docs/bench.md for the definitions.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if err := mainErr(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func mainErr() error {
	var (
		sizes      = flag.String("sizes", "64M,256M,1G,4G,16G", "comma-separated preserved sizes")
		folios     = flag.String("folios", "4K,2M", "livesentry folio sizes (4K, 2M)")
		methods    = flag.String("methods", strings.Join(allMethods, ","), "methods to measure")
		reps       = flag.Int("reps", 5, "measured runs per size and method")
		outMD      = flag.String("out-md", "", "write the markdown page here (e.g. docs/bench.md)")
		outPNG     = flag.String("out-png", "", "write the plot here (e.g. docs/bench.png)")
		runscPath  = flag.String("runsc", "", "gVisor's runsc (default: .cache/bin/runsc in the repository)")
		buildRunsc = flag.Bool("build-runsc", false, "build runsc from the gvisor module version in go.mod into .cache/bin if it is missing")
		workDir    = flag.String("work-dir", os.TempDir(), "where sandboxes, bundles and checkpoint images go (on disk: gVisor writes its image there)")
		smoke      = flag.Bool("smoke", false, "a seconds-long run: 64 MiB, 1 rep, livesentry and the copy floor; gVisor (defaults only) if a runsc is cached")
		quiet      = flag.Bool("q", false, "no progress lines")
		jsonOut    = flag.String("json", "", "also save the results (after each size) as JSON here, for -merge")
		merge      = flag.String("merge", "", "measure nothing: merge the comma-separated JSON files of earlier runs (-json) into one table, page and plot")
		idle       = flag.Int("idle", 100, "also restart an idle guest this many times (transfer mode) and report the blackout's percentiles; 0: no (the default with -smoke)")
		idleSize   = flag.String("idle-size", "1G", "preserved size of the idle guest")
		idleFolio  = flag.String("idle-folio", "2M", "folio size of the idle guest (4K, 2M)")
		idleGap    = flag.Duration("idle-gap", 500*time.Millisecond, "wait before each idle restart, after the guest preserved its generation")
		quietWait  = flag.Bool("quiet-wait", true, "start each livesentry restart once the machine's CPUs have been 95% idle for 300 ms (at most 10 s), so that no restart pays for the work the previous one left behind")
		interleave = flag.Bool("interleave", true, "run livesentry's sandboxes of every size at once and restart them in turn, so that a drift of the machine's speed weighs on every size alike (if they fit in memory together)")
	)
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *smoke {
		if !set["sizes"] {
			*sizes = "64M"
		}
		if !set["reps"] {
			*reps = 1
		}
		if !set["methods"] {
			*methods = strings.Join([]string{methodTransfer, methodExec, methodGVisor, methodCopyFloor}, ",")
		}
		if !set["idle"] {
			*idle = 0
		}
	}
	if *merge != "" {
		var runs []*Results
		for _, p := range strings.Split(*merge, ",") {
			r, err := LoadJSON(p)
			if err != nil {
				return err
			}
			runs = append(runs, r)
		}
		m := Merge(runs)
		var names []string
		for _, p := range strings.Split(*merge, ",") {
			names = append(names, filepath.Base(p))
		}
		m.Commands = append(m.Commands, fmt.Sprintf("go run ./test/bench -merge %s -out-md %s -out-png %s", strings.Join(names, ","), *outMD, *outPNG))
		return output(m, *outMD, *outPNG)
	}
	root, err := repoRoot()
	if err != nil {
		return err
	}
	if *runscPath == "" {
		*runscPath = filepath.Join(root, ".cache", "bin", "runsc")
	}
	if *buildRunsc {
		if err := buildGVisorRunsc(root, *runscPath); err != nil {
			return err
		}
	}
	c := Config{Reps: *reps, Runsc: *runscPath, WorkDir: *workDir, Interleave: *interleave, Quiet: *quietWait}
	if !*quiet {
		c.Logf = func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
		}
	}
	for _, s := range strings.Split(*sizes, ",") {
		n, err := ParseSize(s)
		if err != nil {
			return err
		}
		c.Sizes = append(c.Sizes, n)
	}
	c.Folios = strings.Split(strings.ToUpper(*folios), ",")
	if *idle != 0 {
		n, err := ParseSize(*idleSize)
		if err != nil {
			return fmt.Errorf("-idle-size: %w", err)
		}
		c.Idle = IdleConfig{Restarts: *idle, Size: n, Folio: strings.ToUpper(*idleFolio), Gap: *idleGap}
	}
	if *methods != "" {
		c.Methods = strings.Split(*methods, ",")
	}
	bin, err := os.MkdirTemp(*workDir, "bench-bin-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin)
	if c.RunscLUO, c.Holder, err = buildBinaries(root, bin); err != nil {
		return err
	}
	command := strings.TrimSpace("go run ./test/bench " + strings.Join(os.Args[1:], " "))
	if *jsonOut != "" {
		c.Save = func(r *Results) {
			r.Commands = []string{command}
			if err := r.SaveJSON(*jsonOut); err != nil {
				fmt.Fprintln(os.Stderr, "bench: saving the results:", err)
			}
		}
	}
	res, err := Run(c)
	if err != nil {
		return err
	}
	res.Commands = []string{command}
	if *jsonOut != "" {
		if err := res.SaveJSON(*jsonOut); err != nil {
			return err
		}
	}
	return output(res, *outMD, *outPNG)
}

// output prints the table and writes the page and the plot if asked.
func output(res *Results, outMD, outPNG string) error {
	var table bytes.Buffer
	res.WriteTable(&table)
	fmt.Print(table.String())
	if outPNG != "" {
		if err := res.WritePlot(outPNG); err != nil {
			return fmt.Errorf("plot: %w", err)
		}
	}
	if outMD != "" {
		if err := os.WriteFile(outMD, []byte(res.page(table.String(), outMD, outPNG)), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// buildBinaries builds runsc-luo from the checkout and the holder (for
// gVisor) into dir, both static (CGO_ENABLED=0): a static runsc-luo
// starts a few milliseconds sooner on a VM where every page a new process
// touches costs a page-table fill (no dynamic loader, no libc), and an
// exec-mode restart and the relaunched demo guest both start it.
func buildBinaries(root, dir string) (runscLUO, holder string, err error) {
	runscLUO, holder = filepath.Join(dir, "runsc-luo"), filepath.Join(dir, "holder")
	for _, b := range []struct {
		out, pkg string
		env      []string
	}{
		{runscLUO, "./runsc-luo", []string{"CGO_ENABLED=0"}},
		{holder, "./test/bench/holder", []string{"CGO_ENABLED=0"}},
	} {
		cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), b.env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	return runscLUO, holder, nil
}

// buildGVisorRunsc builds runsc from the gvisor module version go.mod
// pins, in a module of its own under .cache (runsc needs modules this
// repository does not), with CGO_ENABLED=0 (a cgo runsc cannot re-exec
// itself into the sandbox). It does nothing if out exists.
func buildGVisorRunsc(root, out string) error {
	if _, err := os.Stat(out); err == nil {
		return nil
	}
	v, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "gvisor.dev/gvisor").Output()
	if err != nil {
		return fmt.Errorf("the gvisor version in go.mod: %w", err)
	}
	mod := filepath.Join(root, ".cache", "runsc-mod")
	if err := os.MkdirAll(mod, 0o755); err != nil {
		return err
	}
	gomod := fmt.Sprintf("module runscbuild\n\ngo %s\n\nrequire gvisor.dev/gvisor %s\n", strings.TrimPrefix(runtime.Version(), "go"), strings.TrimSpace(string(v)))
	tools := "//go:build tools\n\npackage tools\n\nimport _ \"gvisor.dev/gvisor/runsc\"\n"
	if err := os.WriteFile(filepath.Join(mod, "go.mod"), []byte(gomod), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(mod, "tools.go"), []byte(tools), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "building gVisor's runsc %s (minutes)\n", strings.TrimSpace(string(v)))
	for _, args := range [][]string{{"mod", "tidy"}, {"build", "-o", out, "gvisor.dev/gvisor/runsc"}} {
		cmd := exec.Command("go", args...)
		cmd.Dir = mod
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, b)
		}
	}
	return nil
}

// machine describes the host in one line.
func machine() string {
	var u unix.Utsname
	unix.Uname(&u)
	thp := "unknown"
	if b, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/shmem_enabled"); err == nil {
		for _, w := range strings.Fields(string(b)) {
			if strings.HasPrefix(w, "[") {
				thp = strings.Trim(w, "[]")
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb uint64
		fmt.Sscanf(string(b), "MemTotal: %d kB", &kb)
		mem = fmt.Sprintf(", %.0f GiB RAM", float64(kb)/(1<<20))
	}
	return fmt.Sprintf("%d CPUs%s, Linux %s, shmem THP %s", runtime.NumCPU(), mem, unix.ByteSliceToString(u.Release[:]), thp)
}

// page is the markdown page: what was measured and how, the table, the
// plot.
func (r *Results) page(table, mdPath, pngPath string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Restart cost: livesentry, gVisor checkpoint/restore, the copy floor\n\n")
	fmt.Fprintf(&b, "Generated by\n\n```\n%s\n```\n\n", strings.Join(r.Commands, "\n"))
	load := ""
	if len(r.Load) > 0 {
		load = "; load average " + strings.Join(r.Load, ", ") + " at the start of each run"
	}
	fmt.Fprintf(&b, "on %s (%s, %s%s). ", r.Start.UTC().Format("2006-01-02"), machine(), r.Took.Round(time.Second), load)
	b.WriteString(`Every run holds the same amount of random data and checks every byte after the restart.

- **livesentry transfer / exec**: ` + "`runsc-luo`" + ` built static (` + "`CGO_ENABLED=0`" + `); ` + "`runsc-luo run`" + ` of ` + "`demo-guest --cycle`" + ` (3 memfds in 2
  LUO sessions, 4 KiB folios with ` + "`--small-folios`" + `, else 2 MiB folios where a write covers an
  aligned 2 MiB range), then ` + "`runsc-luo restart --mode=M --format=json`" + ` once per run. *Blackout*
  is the sentries' own measure: guest calls paused in the old sentry → the new one accepting guests.
  *Time to data*: the same pause → the relaunched guest has retrieved every file and read its last
  byte (its ` + "`data_ready_at`" + `, CLOCK_MONOTONIC like the timing's ` + "`paused_at`" + `). *Of which
  before the guest runs*: the same pause → the relaunched guest program's first step (its
  ` + "`run_at`" + `). In transfer mode the new sentry started the guest's process before the pause,
  waiting at its start gate (docs/guests.md): this is the wait for the old sentry's guests to be
  reaped, then the gate's opening. In exec mode it is the new image's relaunch of the entrypoint and
  the start-up of a new process of the Go program. The rest is the guest's retrieve.
- **metadata handed over**: measured in process with the same layout: after ` + "`PrepareHandover`" + `,
  the KHO preserved-memory map read from the memory file (chunk and bitmap pages) plus every
  preserved page that holds no memfd data (KHO root, LUO records, memfd-v1 folio arrays). Nothing
  else crosses but the descriptor (a few hundred bytes) and three fds.
- **gVisor**: runsc built from the gvisor module version in go.mod (` + "`CGO_ENABLED=0`" + `, systrap
  platform, as root) runs a static program holding the data in anonymous memory and printing a
  line every millisecond; ` + "`runsc checkpoint --image-path`" + ` (image on disk) then ` + "`runsc restore`" + `.
  *App pause*: the last line read before the checkpoint → the first line read after the restore.
  Variants: defaults; ` + "`--direct`" + ` on both (O_DIRECT); ` + "`restore --background`" + ` (the sandbox
  runs while pages still load, so the data is not all back when it resumes). After each restore
  the program compares every byte with its seed's stream.
- **copy floor**: ` + "`copy_file_range`" + ` of a memfd of that size into a new memfd: what any restart that
  copies memory pays at least (4 KiB host pages).
- **idle guest**: the same demo sandbox restarted in transfer mode many times, each restart a fixed
  gap after the guest verified its data and preserved its next generation, so that no guest call
  is in flight when the pause comes: the blackout's spread (p50, p90, p99), which the few runs above
  cannot show. A restart's blackout meets, now and then, a moment when the host gives its CPU to
  another task; ` + "`go test ./pkg/sentry/handover -run '^$' -bench RunningThreadStalls`" + ` measures how
  often that happens here.

`)
	b.WriteString(table)
	if pngPath != "" {
		rel, err := filepath.Rel(filepath.Dir(mdPath), pngPath)
		if err != nil {
			rel = pngPath
		}
		fmt.Fprintf(&b, "\n![restart cost vs preserved memory](%s)\n", filepath.ToSlash(rel))
	}
	return b.String()
}
