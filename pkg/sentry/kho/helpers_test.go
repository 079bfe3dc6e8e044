package kho

import (
	"encoding/binary"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
)

// newFile returns a fresh memory file of the given size, closed at the end
// of the test.
func newFile(tb testing.TB, size uint64) *pgalloc.MemoryFile {
	tb.Helper()
	mf, err := pgalloc.New(pgalloc.Options{Size: size, NoHugepages: true})
	if err != nil {
		tb.Fatalf("pgalloc.New: %v", err)
	}
	tb.Cleanup(func() { mf.Close() })
	return mf
}

// reopen opens mf again through a new fd and mapping, as the next sentry
// does with the fd it receives: nothing is adopted yet.
func reopen(tb testing.TB, mf *pgalloc.MemoryFile) *pgalloc.MemoryFile {
	tb.Helper()
	f, err := mf.DupFile()
	if err != nil {
		tb.Fatalf("DupFile: %v", err)
	}
	next, err := pgalloc.Open(f, pgalloc.Options{NoHugepages: true})
	if err != nil {
		tb.Fatalf("pgalloc.Open: %v", err)
	}
	tb.Cleanup(func() { next.Close() })
	return next
}

// fill writes a pattern derived from seed into every 512-byte slot of b.
func fill(b []byte, seed uint64) {
	for off := 0; off+8 <= len(b); off += 512 {
		binary.LittleEndian.PutUint64(b[off:], seed*0x9e3779b97f4a7c15+uint64(off))
	}
}

// filled reports whether b holds fill(b, seed) and nothing else.
func filled(b []byte, seed uint64) bool {
	for off := 0; off < len(b); off += 8 {
		want := uint64(0)
		if off%512 == 0 {
			want = seed*0x9e3779b97f4a7c15 + uint64(off)
		}
		if binary.LittleEndian.Uint64(b[off:]) != want {
			return false
		}
	}
	return true
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// rootTree parses the outgoing root of k.
func rootTree(tb testing.TB, k *KHO) *fdt.Node {
	tb.Helper()
	out, _ := k.Dump()
	n, err := fdt.Parse(out, abikho.PageSize)
	if err != nil {
		tb.Fatalf("parsing the outgoing root: %v", err)
	}
	return n
}

// memMapAddr returns the preserved-memory-map of k's outgoing root.
func memMapAddr(tb testing.TB, k *KHO) uint64 {
	tb.Helper()
	v, err := rootTree(tb, k).U64(abikho.PropPreservedMemoryMap)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

// page returns the page at the byte address addr of mf.
func page(tb testing.TB, mf *pgalloc.MemoryFile, addr uint64) []byte {
	tb.Helper()
	b, err := mf.Slice(addr>>abikho.PageShift, 1)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// treeRoot returns the address of k's outgoing radix tree root, 0 if none.
func treeRoot(k *KHO) uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.out.tree.root.Addr()
}

// forEachFormat runs fn as a subtest for each format KHO writes.
func forEachFormat(t *testing.T, fn func(t *testing.T, format string)) {
	for _, f := range WriteFormats() {
		t.Run(f, func(t *testing.T) { fn(t, f) })
	}
}

// treePath returns the addresses of the kho-v2 tree nodes from root to the
// leaf of (pfn, order), root first: RadixTreeMaxDepth addresses.
func treePath(tb testing.TB, mf *pgalloc.MemoryFile, root, pfn uint64, order int) []uint64 {
	tb.Helper()
	key := abikho.RadixEncodeKey(pfn<<abikho.PageShift, order)
	path := []uint64{root}
	for level := abikho.RadixTreeMaxDepth - 1; level > 0; level-- {
		next := abikho.RadixNodeEntry(page(tb, mf, path[len(path)-1]), abikho.RadixTableIndex(key, level))
		if next == 0 {
			tb.Fatalf("no level-%d node on the way to pfn %#x order %d", level-1, pfn, order)
		}
		path = append(path, next)
	}
	return path
}
