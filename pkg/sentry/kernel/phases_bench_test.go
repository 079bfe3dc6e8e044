package kernel

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
)

var phaseSizes = flag.String("phases.sizes", "64M,1G", "comma-separated preserved sizes (M or G suffix) for BenchmarkRestartPhases")

// phaseFixture is a kernel serving one guest that holds size bytes of
// random data in preserved memfds (3 files in 2 sessions, as the demo
// guest does), with 4 KiB or 2 MiB folios.
type phaseFixture struct {
	k       *Kernel
	l       *net.UnixListener
	done    chan error
	g       *guest.Conn
	size    uint64
	folios  uint64
	cleanup func()
}

// newPhaseFixture boots a kernel and fills and preserves the memfds.
func newPhaseFixture(b *testing.B, dir string, size uint64, smallFolios bool) *phaseFixture {
	b.Helper()
	k, err := New(Options{MemorySize: size + 64<<20})
	if err != nil {
		b.Fatalf("New: %v", err)
	}
	path := filepath.Join(dir, "guest.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		k.Shutdown()
		b.Fatalf("listen: %v", err)
	}
	f := &phaseFixture{k: k, l: l, done: make(chan error, 1), size: size}
	go func() { f.done <- k.Serve(l) }()
	f.cleanup = func() {
		if f.g != nil {
			f.g.Disconnect()
		}
		l.Close()
		<-f.done
		k.Shutdown()
	}
	if f.g, err = guest.Dial(path); err != nil {
		f.cleanup()
		b.Fatalf("Dial: %v", err)
	}
	if err := f.fill(smallFolios); err != nil {
		f.cleanup()
		b.Fatal(err)
	}
	return f
}

// fill writes random contents into 3 memfds totalling f.size bytes and
// preserves them in 2 sessions. With smallFolios every 2 MiB range is
// touched by a 1-byte write first, so that the page cache holds 4 KiB
// folios only; otherwise every aligned 2 MiB range is one 2 MiB folio.
func (f *phaseFixture) fill(smallFolios bool) error {
	g := f.g
	dev, err := g.OpenLiveUpdate()
	if err != nil {
		return fmt.Errorf("open /dev/liveupdate: %w", err)
	}
	var sess [2]int
	for i := range sess {
		if sess[i], err = g.CreateSession(dev, fmt.Sprintf("phases-%d", i)); err != nil {
			return fmt.Errorf("CreateSession: %w", err)
		}
	}
	rng := rand.NewChaCha8([32]byte{1})
	const chunk = 4 << 20
	buf := make([]byte, chunk)
	const files = 3
	per := f.size / files
	for i := range files {
		n := per
		if i == files-1 {
			n = f.size - per*(files-1)
		}
		fd, err := g.MemfdCreate(fmt.Sprintf("phases-%d", i), 0)
		if err != nil {
			return fmt.Errorf("memfd_create: %w", err)
		}
		if smallFolios {
			for off := uint64(0); off < n; off += 2 << 20 {
				if _, err := g.Pwrite(fd, buf[:1], int64(off)); err != nil {
					return fmt.Errorf("touching memfd %d at %d: %w", i, off, err)
				}
			}
		}
		for off := uint64(0); off < n; off += chunk {
			p := buf[:min(chunk, n-off)]
			rng.Read(p)
			if _, err := g.Pwrite(fd, p, int64(off)); err != nil {
				return fmt.Errorf("writing memfd %d at %d: %w", i, off, err)
			}
		}
		if err := g.PreserveFD(sess[i%len(sess)], fd, uint64(i+1)); err != nil {
			return fmt.Errorf("PreserveFD: %w", err)
		}
		if err := g.Close(fd); err != nil {
			return err
		}
	}
	// The number of folios preserved: 4 KiB ones, or 2 MiB ones plus the
	// 4 KiB tail folios of files whose size is not a multiple of 2 MiB.
	for i := range uint64(files) {
		n := per
		if i == files-1 {
			n = f.size - per*(files-1)
		}
		pages := (n + 4095) / 4096
		if smallFolios {
			f.folios += pages
		} else {
			f.folios += pages/512 + pages%512
		}
	}
	return nil
}

// restartOnce runs the old sentry's side of a transfer-mode restart up to
// the handover (pause, PrepareHandover) and the new sentry's boot from the
// handed-over file (NewFromHandover) in the same process, then rolls back:
// the new kernel is discarded uncommitted and the old one aborts and
// resumes, so that the next iteration hands over the same state again.
func (f *phaseFixture) restartOnce(b *testing.B, t *handover.Timing, peerReads []string) {
	if err := f.k.Pause(time.Time{}); err != nil {
		b.Fatal(err)
	}
	h, err := f.k.PrepareHandover(t, peerReads)
	if err != nil {
		b.Fatalf("PrepareHandover: %v", err)
	}
	file, err := f.k.MemoryFile().DupFile()
	if err != nil {
		b.Fatal(err)
	}
	k2, err := NewFromHandover(file, h.Root, Options{}, t)
	if err != nil {
		b.Fatalf("NewFromHandover: %v", err)
	}
	b.StopTimer()
	k2.Shutdown()
	if err := f.k.AbortHandover(); err != nil {
		b.Fatalf("AbortHandover: %v", err)
	}
	f.k.Resume()
	b.StartTimer()
}

func parsePhaseSize(s string) (uint64, error) {
	s = strings.ToUpper(strings.TrimSpace(s))
	shift := 0
	switch {
	case strings.HasSuffix(s, "M"):
		shift = 20
	case strings.HasSuffix(s, "G"):
		shift = 30
	default:
		return 0, fmt.Errorf("size %q: want a number with M or G", s)
	}
	n, err := strconv.ParseUint(s[:len(s)-1], 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("size %q: want a number with M or G", s)
	}
	return n << shift, nil
}

// BenchmarkRestartPhases times each phase of a restart inside the
// blackout that the kernel runs, for preserved memfds of each size in
// -phases.sizes with 4 KiB and 2 MiB folios: freeze (LUO serialize) and
// finalize (KHO finalize) in the old kernel, map (pgalloc.Open), ingest
// (KHO ingest and adopt) and luo (memfd handler and LUO deserialize) in
// the new one. Each is reported in ms per restart, ingest and luo also
// per preserved folio, so that benchstat shows a phase that regresses or
// starts growing with the memory preserved; phases-ms is their sum. Each
// size and folio size runs in both KHO formats (kho-v2, what a restart
// between two builds of today writes, and kho-v1). ns/op is the phases
// plus the pause and the fd dup (not the rollback that resets the state
// between iterations).
//
//	go test ./pkg/sentry/kernel -run '^$' -bench RestartPhases -benchtime 20x -count 5
//	go test ./pkg/sentry/kernel -run '^$' -bench RestartPhases -phases.sizes=64M,4G -cpuprofile cpu.prof
func BenchmarkRestartPhases(b *testing.B) {
	// The fixture outlives each sub-benchmark's first call (b.N = 1),
	// so its socket lives in the parent's directory.
	dir := b.TempDir()
	for _, s := range strings.Split(*phaseSizes, ",") {
		size, err := parsePhaseSize(s)
		if err != nil {
			b.Fatal(err)
		}
		for _, folio := range []struct {
			name  string
			small bool
		}{{"4KiB", true}, {"2MiB", false}} {
			var f *phaseFixture
			for _, format := range kho.WriteFormats() {
				// The next sentry reads every format of this build but
				// the KHO ones newer than format, so that format is the
				// one written.
				var peerReads []string
				for _, r := range Reads() {
					if !strings.HasPrefix(r, "kho-") || r <= format {
						peerReads = append(peerReads, r)
					}
				}
				name := fmt.Sprintf("%dMiB/folio=%s/%s", size>>20, folio.name, format)
				b.Run(name, func(b *testing.B) {
					if f == nil {
						b.StopTimer()
						f = newPhaseFixture(b, dir, size, folio.small)
						b.StartTimer()
					}
					var sum handover.Timing
					for range b.N {
						var t handover.Timing
						f.restartOnce(b, &t, peerReads)
						sum.Freeze += t.Freeze
						sum.Finalize += t.Finalize
						sum.Map += t.Map
						sum.Ingest += t.Ingest
						sum.LUO += t.LUO
					}
					n := float64(b.N)
					ms := func(d time.Duration) float64 { return float64(d) / 1e6 / n }
					b.ReportMetric(ms(sum.Freeze), "freeze-ms")
					b.ReportMetric(ms(sum.Finalize), "finalize-ms")
					b.ReportMetric(ms(sum.Map), "map-ms")
					b.ReportMetric(ms(sum.Ingest), "ingest-ms")
					b.ReportMetric(ms(sum.LUO), "luo-ms")
					b.ReportMetric(float64(sum.Ingest)/n/float64(f.folios), "ingest-ns/folio")
					b.ReportMetric(float64(sum.LUO)/n/float64(f.folios), "luo-ns/folio")
					b.ReportMetric(ms(sum.Freeze+sum.Finalize+sum.Map+sum.Ingest+sum.LUO), "phases-ms")
				})
			}
			if f != nil {
				f.cleanup()
			}
		}
	}
}
