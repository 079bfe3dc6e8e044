package kho

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
)

// BenchmarkPreserveFolio measures PreserveFolio of order-0 folios spread
// over 1 GiB (the bitmaps are allocated in the first pass).
func BenchmarkPreserveFolio(b *testing.B) {
	k, mf := benchKHO(b, 1<<30+1<<20)
	pages := mf.Pages() - 1
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := k.PreserveFolio(pgalloc.Folio{PFN: 1 + uint64(i)%pages}); err != nil {
			b.Fatal(err)
		}
	}
}

func benchKHO(b *testing.B, size uint64) (*KHO, *pgalloc.MemoryFile) {
	b.Helper()
	mf, err := pgalloc.New(pgalloc.Options{Size: size, NoHugepages: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { mf.Close() })
	k, err := New(mf)
	if err != nil {
		b.Fatal(err)
	}
	return k, mf
}

// layout is a set of preserved folios for the handover benchmarks.
type layout struct {
	name  string
	order int
	// stride is the distance between folio heads in pages.
	stride uint64
}

var layouts = []layout{
	{"order0-contiguous", 0, 1},
	{"order0-every-other-page", 0, 2},
	{"order9", pgalloc.HugeOrder, 1 << pgalloc.HugeOrder},
}

// BenchmarkHandover measures the blackout part of KHO for 1 GiB and 8 GiB
// of preserved memory in each layout and each format: FinalizeFormat in the
// old sentry, then Ingest (which validates the map or tree, builds the runs
// and runs pgalloc.AdoptBitmaps) in the new one. Preserving happens outside the
// timer, as it does outside the blackout. Metrics: finalize-ms, ingest-ms
// (Ingest including AdoptBitmaps), total-ms, ingest-ns/folio and total
// ns/folio.
func BenchmarkHandover(b *testing.B) {
	for _, format := range WriteFormats() {
		for _, l := range layouts {
			for _, gib := range []uint64{1, 8} {
				benchmarkHandover(b, format, l, gib)
			}
		}
	}
}

func benchmarkHandover(b *testing.B, format string, l layout, gib uint64) {
	b.Run(fmt.Sprintf("%s/%s/%dGiB", format, l.name, gib), func(b *testing.B) {
		preserved := gib << 30 >> abikho.PageShift // pages
		folios := preserved >> l.order
		span := folios * l.stride
		size := (span + 1<<pgalloc.MaxOrder + 1<<pgalloc.MaxOrder) << abikho.PageShift
		var fin, ing time.Duration
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			mf, err := pgalloc.New(pgalloc.Options{Size: size, NoHugepages: true})
			if err != nil {
				b.Fatal(err)
			}
			k, err := New(mf)
			if err != nil {
				b.Fatal(err)
			}
			// Folios start at 4 MiB, clear of the root page.
			base := uint64(1) << pgalloc.MaxOrder
			for j := uint64(0); j < folios; j++ {
				if err := k.PreserveFolio(pgalloc.Folio{PFN: base + j*l.stride, Order: l.order}); err != nil {
					b.Fatal(err)
				}
			}
			f, err := mf.DupFile()
			if err != nil {
				b.Fatal(err)
			}
			mf2, err := pgalloc.Open(f, pgalloc.Options{NoHugepages: true})
			if err != nil {
				b.Fatal(err)
			}
			// The previous iterations' files and runs are garbage; a new
			// sentry starts with a small heap, so collect it outside the
			// timer rather than inside Ingest.
			runtime.GC()
			b.StartTimer()
			t0 := time.Now()
			if err := k.FinalizeFormat(format); err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			k2, err := Ingest(mf2, k.RootAddr())
			if err != nil {
				b.Fatal(err)
			}
			t2 := time.Now()
			b.StopTimer()
			fin += t1.Sub(t0)
			ing += t2.Sub(t1)
			if st := mf2.Stats(); st.Folios[l.order] < folios {
				b.Fatalf("adopted %d folios of order %d, want at least %d", st.Folios[l.order], l.order, folios)
			}
			_ = k2
			mf2.Close()
			mf.Close()
			b.StartTimer()
		}
		n := float64(b.N)
		b.ReportMetric(float64(fin.Nanoseconds())/n/1e6, "finalize-ms")
		b.ReportMetric(float64(ing.Nanoseconds())/n/1e6, "ingest-ms")
		b.ReportMetric(float64((fin+ing).Nanoseconds())/n/1e6, "total-ms")
		b.ReportMetric(float64(ing.Nanoseconds())/n/float64(folios), "ingest-ns/folio")
		b.ReportMetric(float64((fin+ing).Nanoseconds())/n/float64(folios), "ns/folio")
		b.ReportMetric(0, "ns/op")
	})
}

// BenchmarkRestoreLookup compares the two ways to find a folio head's order
// at restore over 2^21 order-0 folios on every other page (8 GiB): the
// incoming bitmaps that KHO keeps (test up to MaxOrder+1 bits), and a side
// table, the sorted block list handed to Adopt, searched by binary search.
// The bitmaps cost 1 bit per folio slot (256 KiB here) and nothing to
// build, because Ingest reads them anyway; the side table costs 16 bytes per
// folio (32 MiB here) and must be kept after Adopt.
func BenchmarkRestoreLookup(b *testing.B) {
	const folios = 1 << 21
	pages := uint64(2*folios + 16)
	t := newMemTracker(pages)
	for i := uint64(0); i < folios; i++ {
		t.set(2+2*i, 0)
	}
	var blocks []pgalloc.Block
	t.forEach(func(pfn uint64, order int) { blocks = append(blocks, pgalloc.Block{PFN: pfn, Order: order}) })
	rng := rand.New(rand.NewPCG(1, 1))
	probes := make([]uint64, 1<<16)
	for i := range probes {
		probes[i] = 2 + 2*uint64(rng.IntN(folios))
	}
	b.Run("bitmaps", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if _, ok := t.headOrder(probes[i&(len(probes)-1)]); !ok {
				b.Fatal("not found")
			}
		}
	})
	b.Run("side-table", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			pfn := probes[i&(len(probes)-1)]
			if _, ok := slices.BinarySearchFunc(blocks, pfn, func(x pgalloc.Block, p uint64) int {
				switch {
				case x.PFN < p:
					return -1
				case x.PFN > p:
					return 1
				}
				return 0
			}); !ok {
				b.Fatal("not found")
			}
		}
	})
}

// BenchmarkRestoreFolio measures RestoreFolio (lookup, one-shot clear) per
// folio after a real ingest of 1 GiB of order-0 folios.
func BenchmarkRestoreFolio(b *testing.B) {
	const folios = 1 << 18
	for i := 0; i < b.N; i += folios {
		b.StopTimer()
		k, mf := benchKHO(b, (folios+2048)<<abikho.PageShift)
		if err := k.PreservePages(1024, folios); err != nil {
			b.Fatal(err)
		}
		// PreservePages makes large blocks; re-preserve as order-0 folios.
		k.UnpreservePages(1024, folios)
		for j := uint64(0); j < folios; j++ {
			k.PreserveFolio(pgalloc.Folio{PFN: 1024 + j})
		}
		if err := k.FinalizeFormat(abikho.CompatibleV2); err != nil {
			b.Fatal(err)
		}
		f, _ := mf.DupFile()
		mf2, err := pgalloc.Open(f, pgalloc.Options{NoHugepages: true})
		if err != nil {
			b.Fatal(err)
		}
		k2, err := Ingest(mf2, k.RootAddr())
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		for j := uint64(0); j < folios && i+int(j) < b.N; j++ {
			if _, err := k2.RestoreFolio((1024 + j) << abikho.PageShift); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		mf2.Close()
		b.StartTimer()
	}
}

// BenchmarkCopyFloor is the floor of every copying peer (gVisor
// checkpoint/restore, CRIU): memcpy of 256 MiB between two already faulted
// buffers, reported as ms per GiB, to compare with BenchmarkHandover in the
// same run.
func BenchmarkCopyFloor(b *testing.B) {
	const size = 256 << 20
	src, dst := make([]byte, size), make([]byte, size)
	for i := 0; i < size; i += abikho.PageSize {
		src[i], dst[i] = 1, 1
	}
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		copy(dst, src)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e6*4, "ms/GiB")
}

// BenchmarkPreserveUnpreserve measures PreserveFolio followed by
// UnpreserveFolio of order-0 folios spread over 1 GiB, per folio, with the
// kho-v2 radix tree in memory-file pages (the outgoing tracker) against the
// kho-v1 tracker it replaced, per-order bitmaps in the heap behind the same
// lock and checks. The tree's leaves exist after the first pass in both.
func BenchmarkPreserveUnpreserve(b *testing.B) {
	b.Run("radix-tree", func(b *testing.B) {
		k, mf := benchKHO(b, 1<<30+1<<20)
		pages := mf.Pages() - 1
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			f := pgalloc.Folio{PFN: 1 + uint64(i*7919)%pages}
			if err := k.PreserveFolio(f); err != nil {
				b.Fatal(err)
			}
			if err := k.UnpreserveFolio(f); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/folio")
	})
	b.Run("bitmaps", func(b *testing.B) {
		k, mf := benchKHO(b, 1<<30+1<<20)
		pages := mf.Pages() - 1
		var mu sync.Mutex
		var t heapBitmaps
		for o := range t {
			t[o] = make([]*bitmap, (mf.Pages()>>o)/abikho.PreserveBits+1)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			f := pgalloc.Folio{PFN: 1 + uint64(i*7919)%pages}
			if err := k.checkBlock(f.PFN, f.Order); err != nil {
				b.Fatal(err)
			}
			mu.Lock()
			t.set(f.PFN, f.Order)
			mu.Unlock()
			if err := k.checkBlock(f.PFN, f.Order); err != nil {
				b.Fatal(err)
			}
			mu.Lock()
			ok := t.clear(f.PFN, f.Order)
			mu.Unlock()
			if !ok {
				b.Fatal("not set")
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/folio")
	})
}

// BenchmarkHandoverCostV2 measures KHO's share of a restart's blackout
// with kho-v2, FinalizeFormat("kho-v2") in the old sentry and Ingest in the
// new one, for 1 GiB and 16 GiB of preserved order-0 folios on every other
// page, against kho-v1 with the same set in the same run. Metrics:
// finalize-ms, ingest-ms (Ingest of a fresh pgalloc.Open of the file,
// adopting included) and kho-ms, their sum (Abort, outside the timer,
// reopens the map between iterations).
func BenchmarkHandoverCostV2(b *testing.B) {
	for _, gib := range []uint64{1, 16} {
		folios := gib << 30 >> abikho.PageShift
		size := (2*folios + 2<<pgalloc.MaxOrder) << abikho.PageShift
		mf, err := pgalloc.New(pgalloc.Options{Size: size, NoHugepages: true})
		if err != nil {
			b.Fatal(err)
		}
		k, err := New(mf)
		if err != nil {
			b.Fatal(err)
		}
		base := uint64(1) << pgalloc.MaxOrder
		for j := uint64(0); j < folios; j++ {
			if err := k.PreserveFolio(pgalloc.Folio{PFN: base + 2*j}); err != nil {
				b.Fatal(err)
			}
		}
		for _, format := range WriteFormats() {
			b.Run(fmt.Sprintf("%s/%dGiB", format, gib), func(b *testing.B) {
				var fin, ing time.Duration
				for i := 0; i < b.N; i++ {
					f, err := mf.DupFile()
					if err != nil {
						b.Fatal(err)
					}
					mf2, err := pgalloc.Open(f, pgalloc.Options{NoHugepages: true})
					if err != nil {
						b.Fatal(err)
					}
					runtime.GC()
					t0 := time.Now()
					if err := k.FinalizeFormat(format); err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					if _, err := Ingest(mf2, k.RootAddr()); err != nil {
						b.Fatal(err)
					}
					t2 := time.Now()
					fin += t1.Sub(t0)
					ing += t2.Sub(t1)
					mf2.Close()
					if err := k.Abort(); err != nil {
						b.Fatal(err)
					}
				}
				n := float64(b.N)
				b.ReportMetric(float64(fin.Nanoseconds())/n/1e6, "finalize-ms")
				b.ReportMetric(float64(ing.Nanoseconds())/n/1e6, "ingest-ms")
				b.ReportMetric(float64((fin+ing).Nanoseconds())/n/1e6, "kho-ms")
				b.ReportMetric(0, "ns/op")
			})
		}
		mf.Close()
	}
}

// heapBitmaps is the outgoing tracker the kho-v2 tree replaced: per-order
// bitmaps in the heap, set at preserve and cleared at unpreserve.
type heapBitmaps [pgalloc.MaxOrder + 1][]*bitmap

func (h *heapBitmaps) set(pfn uint64, order int) {
	idx, w, m := locate(pfn, order)
	if h[order][idx] == nil {
		h[order][idx] = new(bitmap)
	}
	h[order][idx][w] |= m
}

func (h *heapBitmaps) clear(pfn uint64, order int) bool {
	idx, w, m := locate(pfn, order)
	b := h[order][idx]
	if b == nil || b[w]&m == 0 {
		return false
	}
	b[w] &^= m
	return true
}
