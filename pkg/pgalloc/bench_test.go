package pgalloc

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkAllocFree measures one Allocate and one DecRef of a folio, the
// allocator's hot path. The releaser punches the freed pages out in the
// background on the other core.
func BenchmarkAllocFree(b *testing.B) {
	for _, order := range []int{0, HugeOrder} {
		b.Run(fmt.Sprintf("order=%d", order), func(b *testing.B) {
			f := newTestFile(b, 1<<30)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				fo, err := f.Allocate(order)
				if err != nil {
					b.Fatal(err)
				}
				f.DecRef(fo)
			}
		})
	}
}

// preservedSet returns n order-0 blocks, contiguous from PFN 1 or on every
// other page.
func preservedSet(n int, everyOther bool) []Block {
	bs := make([]Block, n)
	for i := range bs {
		if everyOther {
			bs[i] = Block{PFN: 1 + 2*uint64(i)}
		} else {
			bs[i] = Block{PFN: 1 + uint64(i)}
		}
	}
	return bs
}

// BenchmarkAdopt measures Adopt of 1 GiB and 8 GiB of preserved order-0
// folios, contiguous and on every other page (the worst case: one stale gap
// per folio), in a 16 GiB and a 256 GiB sparse file. The times for the two
// file sizes should be the same: Adopt is O(preserved set).
func BenchmarkAdopt(b *testing.B) {
	for _, fileGiB := range []uint64{16, 256} {
		for _, n := range []int{262144, 2097152} {
			for _, layout := range []string{"contiguous", "every-other"} {
				name := fmt.Sprintf("file=%dGiB/folios=%d/%s", fileGiB, n, layout)
				b.Run(name, func(b *testing.B) {
					blocks := preservedSet(n, layout == "every-other")
					base := newTestFile(b, fileGiB<<30)
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						b.StopTimer()
						file, err := base.DupFile()
						if err != nil {
							b.Fatal(err)
						}
						g, err := Open(file, Options{})
						if err != nil {
							b.Fatal(err)
						}
						b.StartTimer()
						if err := g.Adopt(blocks); err != nil {
							b.Fatal(err)
						}
						b.StopTimer()
						g.Close()
						b.StartTimer()
					}
					b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/folio")
					b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e6, "ms/adopt")
				})
			}
		}
	}
}

// BenchmarkAdoptBitmaps is BenchmarkAdopt for the same sets given as
// per-order bitmaps, the form KHO reads: its cost follows the bitmaps, not
// the blocks.
func BenchmarkAdoptBitmaps(b *testing.B) {
	for _, fileGiB := range []uint64{16, 256} {
		for _, n := range []int{262144, 2097152} {
			for _, layout := range []string{"contiguous", "every-other"} {
				name := fmt.Sprintf("file=%dGiB/folios=%d/%s", fileGiB, n, layout)
				b.Run(name, func(b *testing.B) {
					blocks := preservedSet(n, layout == "every-other")
					base := newTestFile(b, fileGiB<<30)
					var d time.Duration
					for i := 0; i < b.N; i++ {
						set := toBitmaps(base.Pages(), blocks)
						file, err := base.DupFile()
						if err != nil {
							b.Fatal(err)
						}
						g, err := Open(file, Options{})
						if err != nil {
							b.Fatal(err)
						}
						t0 := time.Now()
						if err := g.AdoptBitmaps(set); err != nil {
							b.Fatal(err)
						}
						d += time.Since(t0)
						g.Close()
					}
					b.ReportMetric(float64(d.Nanoseconds())/float64(b.N)/float64(n), "ns/folio")
					b.ReportMetric(float64(d.Nanoseconds())/float64(b.N)/1e6, "ms/adopt")
					b.ReportMetric(0, "ns/op")
				})
			}
		}
	}
}

// BenchmarkFillMetadata measures FillMetadata after AdoptBitmaps of a GiB
// of order-0 folios (contiguous, or every other page): the page metadata a
// sentry builds after a restart's blackout, while its relaunched guests
// start, in fresh memory.
func BenchmarkFillMetadata(b *testing.B) {
	const n = 262144 // 1 GiB of 4 KiB folios
	for _, layout := range []string{"contiguous", "every-other"} {
		b.Run(layout, func(b *testing.B) {
			blocks := preservedSet(n, layout == "every-other")
			base := newTestFile(b, 4<<30)
			var d time.Duration
			for i := 0; i < b.N; i++ {
				file, err := base.DupFile()
				if err != nil {
					b.Fatal(err)
				}
				g, err := Open(file, Options{})
				if err != nil {
					b.Fatal(err)
				}
				if err := g.AdoptBitmaps(toBitmaps(base.Pages(), blocks)); err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				g.FillMetadata()
				d += time.Since(t0)
				g.Close()
			}
			b.ReportMetric(float64(d.Nanoseconds())/float64(b.N)/n, "ns/folio")
			b.ReportMetric(float64(d.Nanoseconds())/float64(b.N)/1e6, "ms/fill")
			b.ReportMetric(0, "ns/op")
		})
	}
}
