package memfd

import (
	"bytes"
	"fmt"
	"testing"
)

// TestLargeReadsGiveTheFileBytesWhicheverWayTheyAreCopied reads a file
// of written pages (with pwrite(2) and through the mapping), a hole, an
// allocated range nothing wrote and a 2 MiB folio, by ranges short and
// long, with Pread and ReadToAt, four times: the first copy out of a range
// goes through a buffer filled with pread(2), the next ones through the
// mapping (pgalloc.MemoryFile.CopyThroughMapping), and DropPageTables
// starts over. Every read must give the same bytes as the model.
func TestLargeReadsGiveTheFileBytesWhicheverWayTheyAreCopied(t *testing.T) {
	mf := newTestMemoryFile(t, 64<<20)
	f, err := Create(mf, "copyout", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.DecRef()
	const size = 8 << 20
	want := make([]byte, size)
	write := func(off, n, step int) {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte((off+i)*7 + (off+i)>>12)
		}
		for o := 0; o < n; o += step {
			k := min(step, n-o)
			if got, err := f.Pwrite(b[o:o+k], int64(off+o)); got != k || err != nil {
				t.Fatalf("Pwrite(%d bytes at %d) = %d, %v", k, off+o, got, err)
			}
		}
		copy(want[off:], b)
	}
	write(0, 3<<20, 1<<20)      // large writes: pwrite(2), not mapped here
	write(4<<20, 1<<20, 4096)   // 4 KiB writes: through the mapping
	write(6<<20, 2<<20, 2<<20)  // an aligned 2 MiB write: a 2 MiB folio
	write(3<<20+4096, 100, 100) // a short write inside the hole's page range
	if err := f.Fallocate(0, 5<<20, 512<<10); err != nil {
		t.Fatal(err) // allocated, never written: reads as zeros
	}
	ranges := [][2]int{
		{0, size}, {0, 64 << 10}, {4096, 64<<10 - 1}, {3<<20 - 100, 200 << 10},
		{5<<20 - 3, 1 << 20}, {6<<20 + 5, 2<<20 - 5}, {1 << 20, 5 << 20}, {7 << 20, 2 << 20},
	}
	check := func(round string) {
		for _, r := range ranges {
			off, n := r[0], r[1]
			end := min(off+n, size)
			var w bytes.Buffer
			if got, err := f.ReadToAt(&w, int64(n), int64(off)); got != int64(end-off) || err != nil {
				t.Fatalf("%s: ReadToAt(%d bytes at %d) = %d, %v", round, n, off, got, err)
			}
			if err := sameBytes(w.Bytes(), want[off:end]); err != nil {
				t.Fatalf("%s: ReadToAt(%d bytes at %d): %v", round, n, off, err)
			}
			dst := make([]byte, n)
			got, err := f.Pread(dst, int64(off))
			if got != end-off || err != nil {
				t.Fatalf("%s: Pread(%d bytes at %d) = %d, %v", round, n, off, got, err)
			}
			if err := sameBytes(dst[:got], want[off:end]); err != nil {
				t.Fatalf("%s: Pread(%d bytes at %d): %v", round, n, off, err)
			}
		}
	}
	for round := range 3 {
		check(fmt.Sprintf("round %d", round))
	}
	if err := mf.DropPageTables(); err != nil {
		t.Fatal(err)
	}
	check("after DropPageTables")
}

// sameBytes says where got and want first differ.
func sameBytes(got, want []byte) error {
	if len(got) != len(want) {
		return fmt.Errorf("%d bytes, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Errorf("byte %d is %#x, want %#x", i, got[i], want[i])
		}
	}
	return nil
}
