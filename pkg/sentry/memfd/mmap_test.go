package memfd

import (
	"testing"

	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// A memfd written front to back lies in few runs of the memory file, so a
// guest maps 1 GiB in a few dozen mmap calls at most: the allocator hands
// out ascending addresses, and a mapping merges adjacent folios.
func TestAMemfdWrittenInOrderMapsInFewRuns(t *testing.T) {
	for _, tc := range []struct {
		name  string
		chunk int
	}{{"2 MiB folios from 4 MiB writes", 4 << 20}, {"2 MiB folios from 1 MiB writes", 1 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 1 << 30
			mf := newTestMemoryFile(t, 2*size)
			f, err := Create(mf, "runs", 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.DecRef()
			buf := make([]byte, tc.chunk)
			for off := int64(0); off < size; off += int64(len(buf)) {
				if _, err := f.Pwrite(buf, off); err != nil {
					t.Fatal(err)
				}
			}
			m, err := f.Mmap(vfs.MmapOpts{Length: size, Prot: unix.PROT_READ, Flags: unix.MAP_SHARED})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Release()
			runs := m.Runs()
			var total uint64
			for _, r := range runs {
				total += r.Length
			}
			if total != size || len(runs) > 32 {
				t.Fatalf("1 GiB in %d runs covering %d bytes, want all of it in at most 32", len(runs), total)
			}
			t.Logf("1 GiB in %d runs", len(runs))
		})
	}
}
