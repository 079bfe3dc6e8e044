package pgalloc

import (
	"testing"
	"time"
)

func TestHoldReleasesKeepsFreedPagesUntilResumed(t *testing.T) {
	tests := []struct {
		name  string
		order int
	}{
		{name: "a freed 4 KiB folio is not punched while releases are held", order: 0},
		{name: "a freed 4 MiB folio is not punched while releases are held", order: MaxOrder},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFile(t, 64<<20)
			// Seen through a second mapping, as the next sentry sees it.
			other := reopen(t, f)
			fo, err := f.Allocate(tc.order)
			if err != nil {
				t.Fatalf("Allocate: %v", err)
			}
			b := f.Bytes(fo)
			for i := range b {
				b[i] = 0xa5
			}
			view, err := other.Slice(fo.PFN, fo.Pages())
			if err != nil {
				t.Fatalf("Slice: %v", err)
			}
			f.HoldReleases()
			f.DecRef(fo)
			time.Sleep(4 * releaseDelay)
			if s := f.Stats(); s.ReleasingPages != fo.Pages() {
				t.Errorf("while held: %d pages releasing, want %d", s.ReleasingPages, fo.Pages())
			}
			if view[0] != 0xa5 || view[len(view)-1] != 0xa5 {
				t.Fatalf("while held: the freed folio was punched out (first byte %#x, last %#x)", view[0], view[len(view)-1])
			}
			f.ResumeReleases()
			deadline := time.Now().Add(5 * time.Second)
			for f.Stats().ReleasingPages != 0 {
				if time.Now().After(deadline) {
					t.Fatalf("after ResumeReleases: %d pages still releasing", f.Stats().ReleasingPages)
				}
				time.Sleep(time.Millisecond)
			}
			if view[0] != 0 || view[len(view)-1] != 0 {
				t.Errorf("after ResumeReleases: the freed folio still holds data (first byte %#x, last %#x)", view[0], view[len(view)-1])
			}
		})
	}
}
