// Command soak restarts one sandbox many times while its guest rewrites a
// preserved memfd without pause, and checks every restart: the relaunched
// guest verifies every byte of what the previous one wrote, up to its last
// store. Every kill-every-th restart is a SIGKILL of the serving sentry
// instead, which the supervisor recovers. Restarts alternate between
// transfer and exec mode. Every report-every restarts it prints the
// resident memory of the supervisor and the sentry, their open fds and the
// memory file's allocated bytes, and at the end the blackout percentiles;
// it fails if a restart fails, a guest finds a wrong byte, or a resource
// grows beyond its bound.
//
//	go run ./test/soak [-n 1000] [-size 256M] [-kill-every 50] [-report-every 100]
//
// The guest (this binary with -guest, the sandbox's entrypoint) fills a
// memfd of -size bytes through a shared mapping with a pattern of 8-byte
// words, each naming its generation and its round and carrying a hash of
// (seed, generation, round, index), preserves it, and then writes round
// after round over it, in order, until the restart kills it. So the memfd
// is at every instant a prefix of round r+1 and a suffix of round r, and
// the next generation checks exactly that, word by word.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"golang.org/x/sys/unix"
)

var (
	guestMode   = flag.Bool("guest", false, "run as the sandbox's guest (internal)")
	count       = flag.Int("n", 1000, "number of restarts")
	sizeFlag    = flag.String("size", "256M", "bytes of the preserved memfd the guest rewrites")
	memoryFlag  = flag.String("memory", "", "memory file size (default 3 × size + 64M)")
	killEvery   = flag.Int("kill-every", 50, "every Nth restart is a SIGKILL of the serving sentry (0: never)")
	reportEvery = flag.Int("report-every", 100, "print resources every N restarts")
	runscFlag   = flag.String("runsc", "", "runsc-luo binary (default: built from this module)")
	seed        = flag.Uint64("seed", 1, "seed of the guest's pattern")
	writePause  = flag.Duration("write-pause", 2*time.Millisecond, "the guest's pause after each MiB it writes (it shares the CPUs)")
	writers     = flag.Int("writers", 1, "concurrent writers in the guest, each rewriting its own preserved memfd of -size bytes")
	pwrite      = flag.Bool("pwrite", false, "the guests rewrite with pwrite calls (paused by a restart) rather than through a mapping")
	modes       = flag.String("modes", "transfer,exec", "restart modes, taken in turn")
	session     = flag.String("session", "soak", "the guest's session name (internal)")
	rssBound    = flag.String("rss-growth", "64M", "fail if a process's RSS grows more than this over the first report")
	fdBound     = flag.Int("fd-growth", 4, "fail if a process's open fds grow more than this over the first report")
)

func main() {
	flag.Parse()
	size, err := sandbox.ParseSize(*sizeFlag)
	if err != nil || size%8 != 0 || size == 0 {
		fmt.Fprintf(os.Stderr, "soak: -size %q: %v (a non-zero multiple of 8)\n", *sizeFlag, err)
		os.Exit(2)
	}
	if *guestMode {
		if err := runGuest(int64(size)); err != nil {
			emit(event{Event: "failed", Generation: guest.LiveupdateNumber(), Error: err.Error()})
			os.Exit(1)
		}
		return
	}
	if err := soak(size); err != nil {
		fmt.Fprintf(os.Stderr, "soak: FAIL: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("soak: PASS")
}

// event is one line of the guest's output.
type event struct {
	Event      string `json:"event"`
	Generation uint64 `json:"generation"`
	// Rounds are the rounds found by a verification: the prefix's and
	// the suffix's.
	Rounds [2]uint64 `json:"rounds,omitempty"`
	Error  string    `json:"error,omitempty"`
}

func emit(e event) {
	b, _ := json.Marshal(e)
	fmt.Println(string(b))
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// key is the pattern's key for round r of generation gen of writer w's
// memfd.
func key(w int, gen, r uint64) uint64 {
	return splitmix64(*seed ^ uint64(w)<<56 ^ splitmix64(gen<<32^r))
}

// word is the pattern's word at index i of the round with key k: the
// round, the generation's low byte, and 32 bits that depend on the index
// and the key (cheap: a restart rewrites and reads hundreds of MiB).
func word(gen, r, k, i uint64) uint64 {
	return r<<40 | (gen&0xff)<<32 | ((i*0x9e3779b97f4a7c15)^k)>>32
}

// fill writes round r of generation gen of writer w over b, which starts
// at word i0, in order.
func fill(b []byte, w int, gen, r, i0 uint64) {
	k := key(w, gen, r)
	for j := 0; j+8 <= len(b); j += 8 {
		binary.LittleEndian.PutUint64(b[j:], word(gen, r, k, i0+uint64(j/8)))
	}
}

const chunk = 1 << 20

// runGuest is the guest: it verifies what the previous generation
// preserved, preserves -writers new memfds in one session, and rewrites
// each forever from its own goroutine (with -pwrite, on its own
// connection, which has a copy of the fd table).
func runGuest(size int64) error {
	gen := guest.LiveupdateNumber()
	c, err := guest.Dial("")
	if err != nil {
		return err
	}
	dev, err := c.OpenLiveUpdate()
	if err != nil {
		return fmt.Errorf("open /dev/liveupdate: %w", err)
	}
	if gen > 0 {
		sess, err := c.RetrieveSession(dev, *session)
		if err != nil {
			return fmt.Errorf("retrieving session %s: %w", *session, err)
		}
		var rounds [2]uint64
		for w := 0; w < *writers; w++ {
			fd, err := c.RetrieveFD(sess, uint64(w+1))
			if err != nil {
				return fmt.Errorf("retrieving memfd %d: %w", w, err)
			}
			if rounds, err = verify(c, fd, w, gen-1, size); err != nil {
				return fmt.Errorf("memfd %d: %w", w, err)
			}
			c.Close(fd)
		}
		if err := c.FinishSession(sess); err != nil {
			return fmt.Errorf("finishing the session: %w", err)
		}
		c.Close(sess)
		emit(event{Event: "verified", Generation: gen, Rounds: rounds})
	}
	sess, err := c.CreateSession(dev, *session)
	if err != nil {
		return err
	}
	fds := make([]int, *writers)
	maps := make([][]byte, *writers)
	for w := range fds {
		if fds[w], err = c.MemfdCreate(fmt.Sprintf("soak-%d", w), 0); err != nil {
			return err
		}
		if err := c.Ftruncate(fds[w], size); err != nil {
			return err
		}
		if maps[w], err = c.Mmap(fds[w], 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
			return fmt.Errorf("mmap: %w", err)
		}
		fill(maps[w], w, gen, 0, 0)
		if err := c.PreserveFD(sess, fds[w], uint64(w+1)); err != nil {
			return fmt.Errorf("preserve: %w", err)
		}
	}
	// Each pwrite writer but the first on a connection of its own.
	conns := make([]*guest.Conn, *writers)
	for w := range conns {
		conns[w] = c
		if *pwrite && w > 0 {
			tok, err := c.ForkToken()
			if err != nil {
				return fmt.Errorf("fork token: %w", err)
			}
			if conns[w], err = guest.Dial(""); err != nil {
				return err
			}
			if err := conns[w].Attach(tok); err != nil {
				return fmt.Errorf("attach: %w", err)
			}
		}
	}
	// Round after round, in order, until the restart stops this process
	// (the session fd stays open: closing it would unpreserve).
	errs := make(chan error, *writers)
	for w := range fds {
		go func() { errs <- rewrite(conns[w], fds[w], maps[w], w, gen, size) }()
	}
	emit(event{Event: "writing", Generation: gen})
	return <-errs
}

// rewrite writes round after round of writer w's pattern over its memfd,
// through the mapping m or, with -pwrite, with pwrite calls on c.
func rewrite(c *guest.Conn, fd int, m []byte, w int, gen uint64, size int64) error {
	buf := make([]byte, chunk)
	for r := uint64(1); ; r++ {
		for off := int64(0); off < size; off += chunk {
			end := min(off+chunk, size)
			if *pwrite {
				b := buf[:end-off]
				fill(b, w, gen, r, uint64(off/8))
				n, err := c.Pwrite(fd, b, off)
				var ce *guest.ConnError
				if errors.As(err, &ce) {
					// The sentry handed over and dropped this
					// connection; the restart kills this process
					// next.
					select {}
				}
				if err != nil || n != len(b) {
					return fmt.Errorf("pwrite of %d bytes at %d: %d, %v", len(b), off, n, err)
				}
			} else {
				fill(m[off:end], w, gen, r, uint64(off/8))
			}
			if *writePause > 0 {
				time.Sleep(*writePause)
			}
		}
	}
}

// verify checks every word of writer w's memfd fd of generation gen: a
// prefix of round r+1 and a suffix of round r (or one round throughout).
func verify(c *guest.Conn, fd, w int, gen uint64, size int64) ([2]uint64, error) {
	var rounds [2]uint64
	st, err := c.Fstat(fd)
	if err != nil || st.Size != size {
		return rounds, fmt.Errorf("the retrieved memfd: size %d, want %d (%v)", st.Size, size, err)
	}
	buf := make([]byte, 4<<20)
	var first, cur, k uint64
	cut := false
	for off := int64(0); off < size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), size-off)]
		if n, err := c.Pread(fd, b, off); err != nil || n != len(b) {
			return rounds, fmt.Errorf("reading %d bytes at %d: %d, %v", len(b), off, n, err)
		}
		for j := 0; j+8 <= len(b); j += 8 {
			i := uint64(off/8) + uint64(j/8)
			v := binary.LittleEndian.Uint64(b[j:])
			r := v >> 40
			if i == 0 {
				first, cur, k = r, r, key(w, gen, r)
			}
			if v != word(gen, r, k, i) {
				if r+1 == cur && !cut {
					k = key(w, gen, r)
				}
				if v != word(gen, r, k, i) {
					return rounds, fmt.Errorf("byte %d: word %#x is no word of generation %d (round %d would be %#x)", i*8, v, gen, r, word(gen, r, key(w, gen, r), i))
				}
			}
			switch {
			case r == cur:
			case !cut && r+1 == cur:
				cut, cur = true, r
			default:
				return rounds, fmt.Errorf("byte %d: round %d after round %d (rounds from %d): not a prefix of one round over the previous", i*8, r, cur, first)
			}
		}
	}
	return [2]uint64{first, cur}, nil
}

// soakRun is the driver's state.
type soakRun struct {
	runsc, root, id string
	// events is how many guest events have been read.
	events int
}

func (s *soakRun) cli(args ...string) (string, error) {
	cmd := exec.Command(s.runsc, append([]string{"--root=" + s.root}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("runsc-luo %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (s *soakRun) state() (*sandbox.State, error) {
	out, err := s.cli("state", s.id)
	if err != nil {
		return nil, err
	}
	var st container.OCIState
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	if st.Livesentry == nil || st.Livesentry.State == nil {
		return nil, fmt.Errorf("state: no livesentry part in %s", out)
	}
	return st.Livesentry.State, nil
}

// await waits until the guest of generation gen has printed each of
// want.
func (s *soakRun) await(gen uint64, want ...string) error {
	deadline := time.Now().Add(2 * time.Minute)
	seen := map[string]int{}
	for {
		b, _ := os.ReadFile(filepath.Join(s.root, s.id, "entrypoint.log"))
		lines := strings.Split(string(b), "\n")
		// Only complete lines.
		for ; s.events < len(lines)-1; s.events++ {
			var e event
			if json.Unmarshal([]byte(lines[s.events]), &e) != nil || e.Event == "" {
				continue
			}
			if e.Event == "failed" {
				return fmt.Errorf("a guest of generation %d: %s", e.Generation, e.Error)
			}
			if e.Generation != gen {
				return fmt.Errorf("guest event %q of generation %d, waiting for generation %d", e.Event, e.Generation, gen)
			}
			seen[e.Event]++
		}
		done := true
		for _, w := range want {
			done = done && seen[w] >= 1
		}
		if done {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("generation %d: events %v within 2 minutes, want %v", gen, seen, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// resources are one report's measurements.
type resources struct {
	superRSS, sentryRSS uint64
	superFDs, sentryFDs int
	memFile             uint64
}

func procRSS(pid int) uint64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func procFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

// memFileBytes returns the bytes allocated to the memory file the sentry
// holds.
func memFileBytes(pid int) uint64 {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if l, _ := os.Readlink(filepath.Join(dir, e.Name())); strings.HasPrefix(l, "/memfd:livesentry-memory") {
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join(dir, e.Name()), &st) == nil {
				return uint64(st.Blocks) * 512
			}
		}
	}
	return 0
}

// supervisorOf returns the pid of the sandbox's supervisor.
func (s *soakRun) supervisorOf() int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.Contains(b, []byte("--root="+s.root+"\x00")) && bytes.Contains(b, []byte("\x00supervise\x00")) {
			return pid
		}
	}
	return 0
}

func (s *soakRun) measure(sentry int) resources {
	super := s.supervisorOf()
	return resources{superRSS: procRSS(super), sentryRSS: procRSS(sentry), superFDs: procFDs(super), sentryFDs: procFDs(sentry), memFile: memFileBytes(sentry)}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// soak is the driver.
func soak(size uint64) (err error) {
	memory := uint64(*writers)*3*size + 64<<20
	if *memoryFlag != "" {
		var err error
		if memory, err = sandbox.ParseSize(*memoryFlag); err != nil {
			return fmt.Errorf("-memory: %w", err)
		}
	}
	rssMax, err := sandbox.ParseSize(*rssBound)
	if err != nil {
		return fmt.Errorf("-rss-growth: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	root, err := os.MkdirTemp("", "ls-soak-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	s := &soakRun{runsc: *runscFlag, root: root, id: "soak"}
	if s.runsc == "" {
		s.runsc = filepath.Join(root, "runsc-luo")
		if out, err := exec.Command("go", "build", "-o", s.runsc, "github.com/livesentry/livesentry/runsc-luo").CombinedOutput(); err != nil {
			return fmt.Errorf("building runsc-luo: %v\n%s", err, out)
		}
	}
	if _, err := s.cli("run", "--detach", fmt.Sprintf("--memory=%d", memory), s.id, "--", self, "-guest", fmt.Sprintf("-size=%d", size), fmt.Sprintf("-seed=%d", *seed),
		fmt.Sprintf("-writers=%d", *writers), fmt.Sprintf("-write-pause=%v", *writePause), fmt.Sprintf("-pwrite=%t", *pwrite)); err != nil {
		return err
	}
	cleanup := func() {
		s.cli("kill", s.id, "KILL")
		s.cli("delete", "--force", s.id)
	}
	defer cleanup()
	defer func() {
		if err != nil {
			b, _ := os.ReadFile(filepath.Join(root, s.id, "sentry.log"))
			fmt.Fprintf(os.Stderr, "soak: sentry.log:\n%s\n", b)
		}
	}()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	go func() {
		<-sigs
		cleanup()
		os.RemoveAll(root)
		os.Exit(1)
	}()
	modeList := strings.Split(*modes, ",")
	if err := s.await(0, "writing"); err != nil {
		return err
	}
	how := "through its mapping"
	if *pwrite {
		how = "with pwrite"
	}
	fmt.Printf("soak: %d restarts (modes %s; every %dth a SIGKILL of the serving sentry) of a sandbox whose guest's %d writers each rewrite a %d MiB preserved memfd %s (memory file %d MiB)\n",
		*count, *modes, *killEvery, *writers, size>>20, how, memory>>20)
	fmt.Printf("%8s %14s %14s %10s %10s %14s %12s %12s %12s\n", "restarts", "super RSS MiB", "sentry RSS MiB", "super fds", "sentry fds", "memfile MiB", "p50 ms", "p99 ms", "max ms")
	blackouts := map[string][]time.Duration{}
	var all, recoveries []time.Duration
	var base *resources
	var failures []string
	for i := 1; i <= *count; i++ {
		st, err := s.state()
		if err != nil {
			return fmt.Errorf("restart %d: %w", i, err)
		}
		gen := st.LiveupdateNumber + 1
		if *killEvery > 0 && i%*killEvery == 0 {
			start := time.Now()
			if err := unix.Kill(st.PID, unix.SIGKILL); err != nil {
				return fmt.Errorf("restart %d: SIGKILL of sentry %d: %w", i, st.PID, err)
			}
			for {
				now, err := s.state()
				if err == nil && now.Status == "running" && now.PID != st.PID && now.Recoveries > st.Recoveries && now.LastRecovery != nil {
					break
				}
				if time.Since(start) > time.Minute {
					return fmt.Errorf("restart %d: the sandbox was not recovered within a minute after SIGKILL of sentry %d: %+v (%v)", i, st.PID, now, err)
				}
				time.Sleep(time.Millisecond)
			}
			recoveries = append(recoveries, time.Since(start))
		} else {
			mode := modeList[len(all)%len(modeList)]
			out, err := s.cli("restart", "--format=json", "--mode="+mode, s.id)
			if err != nil {
				return fmt.Errorf("restart %d (%s mode): %w", i, mode, err)
			}
			var t handover.Timing
			if err := json.Unmarshal([]byte(out), &t); err != nil {
				return fmt.Errorf("restart %d: timing %q: %w", i, out, err)
			}
			blackouts[mode] = append(blackouts[mode], t.Blackout)
			all = append(all, t.Blackout)
		}
		if err := s.await(gen, "verified", "writing"); err != nil {
			return fmt.Errorf("restart %d: %w", i, err)
		}
		if *reportEvery > 0 && i%*reportEvery == 0 || i == *count {
			now, err := s.state()
			if err != nil {
				return err
			}
			r := s.measure(now.PID)
			fmt.Printf("%8d %14.1f %14.1f %10d %10d %14.1f %12.2f %12.2f %12.2f\n", i, mib(r.superRSS), mib(r.sentryRSS), r.superFDs, r.sentryFDs, mib(r.memFile),
				ms(percentile(all, 0.5)), ms(percentile(all, 0.99)), ms(percentile(all, 1)))
			if base == nil {
				base = &r
				continue
			}
			check := func(what string, grew bool, detail string) {
				if grew {
					failures = append(failures, fmt.Sprintf("after %d restarts, %s: %s", i, what, detail))
				}
			}
			check("supervisor RSS", r.superRSS > base.superRSS+rssMax, fmt.Sprintf("%.1f MiB, first %.1f MiB", mib(r.superRSS), mib(base.superRSS)))
			check("sentry RSS", r.sentryRSS > base.sentryRSS+rssMax, fmt.Sprintf("%.1f MiB, first %.1f MiB", mib(r.sentryRSS), mib(base.sentryRSS)))
			check("supervisor fds", r.superFDs > base.superFDs+*fdBound, fmt.Sprintf("%d, first %d", r.superFDs, base.superFDs))
			check("sentry fds", r.sentryFDs > base.sentryFDs+*fdBound, fmt.Sprintf("%d, first %d", r.sentryFDs, base.sentryFDs))
			// At most two generations' memfds (the retrieved one is
			// freed in the background) and 64 MiB of the sentry's own.
			bound := uint64(*writers)*2*size + 64<<20
			check("memory file", r.memFile > bound, fmt.Sprintf("%.1f MiB allocated, bound %.1f MiB", mib(r.memFile), mib(bound)))
		}
	}
	fmt.Printf("blackout (ms)    %8s %8s %8s %8s\n", "n", "p50", "p99", "max")
	for _, mode := range modeList {
		ds := blackouts[mode]
		fmt.Printf("  %-14s %8d %8.2f %8.2f %8.2f\n", mode, len(ds), ms(percentile(ds, 0.5)), ms(percentile(ds, 0.99)), ms(percentile(ds, 1)))
	}
	fmt.Printf("  %-14s %8d %8.2f %8.2f %8.2f   (SIGKILL to serving again, polled by the CLI)\n", "recovery", len(recoveries), ms(percentile(recoveries, 0.5)), ms(percentile(recoveries, 0.99)), ms(percentile(recoveries, 1)))
	fmt.Printf("bounds: RSS growth ≤ %s, fd growth ≤ %d over the first report; memory file ≤ 2 × writers × size + 64 MiB\n", *rssBound, *fdBound)
	if len(failures) > 0 {
		return errors.New(strings.Join(failures, "; "))
	}
	return nil
}
