package kho

import (
	"fmt"
	"sync"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
)

func TestConcurrentUse(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		k, mf := newKHO(t, 64<<20)
		const workers, each = 4, 200
		var wg sync.WaitGroup
		folios := make([][]pgalloc.Folio, workers)
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < each; i++ {
					f, err := k.AllocPreserve(1)
					if err != nil {
						t.Error(err)
						return
					}
					if i%2 == 1 {
						// Every other one is dropped again.
						if err := k.UnpreserveFree(f); err != nil {
							t.Error(err)
						}
						continue
					}
					folios[w] = append(folios[w], f)
					if i%50 == 0 {
						if err := k.AddSubtree(fmt.Sprintf("w%d-%d", w, i), f.Addr()); err != nil {
							t.Error(err)
						}
						k.Dump()
					}
				}
			}()
		}
		wg.Wait()
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		k2, err := Ingest(reopen(t, mf), k.RootAddr())
		if err != nil {
			t.Fatal(err)
		}
		for w := range folios {
			for i, f := range folios[w] {
				if g, err := k2.RestoreFolio(f.Addr()); err != nil || g != f {
					t.Fatalf("worker %d folio %d: RestoreFolio(%v) = %v, %v", w, i, f, g, err)
				}
			}
			if a, err := k2.RetrieveSubtree(fmt.Sprintf("w%d-0", w)); err != nil || a != folios[w][0].Addr() {
				t.Errorf("subtree of worker %d = %#x, %v", w, a, err)
			}
		}
		if n := k2.ReleaseUnrestored(); n != 0 {
			t.Errorf("ReleaseUnrestored = %d, want 0 (only kept folios were preserved)", n)
		}
	})
}
