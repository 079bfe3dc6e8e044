package pgalloc

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"unsafe"
)

// mappingRSS returns the resident kilobytes of f's mapping in this process,
// from /proc/self/smaps: the pages whose page-table entries are present.
func mappingRSS(t *testing.T, f *MemoryFile) uint64 {
	t.Helper()
	file, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no /proc/self/smaps: %v", err)
	}
	defer file.Close()
	prefix := fmt.Sprintf("%x-", uintptr(unsafe.Pointer(&f.mapping[0])))
	sc := bufio.NewScanner(file)
	found := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, prefix) {
			found = true
			continue
		}
		if found && strings.HasPrefix(line, "Rss:") {
			var kb uint64
			if _, err := fmt.Sscanf(line, "Rss: %d kB", &kb); err != nil {
				t.Fatalf("parsing %q: %v", line, err)
			}
			return kb
		}
	}
	t.Fatalf("the mapping at %s is not in /proc/self/smaps", prefix)
	return 0
}

func TestDropPageTablesUnmapsPagesButKeepsTheirContents(t *testing.T) {
	f := newTestFile(t, 64<<20)
	fo, err := f.Allocate(MaxOrder)
	if err != nil {
		t.Fatal(err)
	}
	fill(f.Bytes(fo), 42)
	if rss := mappingRSS(t, f); rss < fo.Size()>>10 {
		t.Fatalf("after writing %d KiB through the mapping its RSS is %d KiB", fo.Size()>>10, rss)
	}
	if err := f.DropPageTables(); err != nil {
		t.Fatal(err)
	}
	if rss := mappingRSS(t, f); rss != 0 {
		t.Fatalf("after DropPageTables the mapping's RSS is %d KiB, want 0", rss)
	}
	want := make([]byte, fo.Size())
	fill(want, 42)
	got := make([]byte, fo.Size())
	if err := f.ReadPages(fo.PFN, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the file's contents changed (%v)", err)
	}
	if !bytes.Equal(f.Bytes(fo), want) {
		t.Fatal("the contents read through the mapping changed")
	}
	f.Close()
	if err := f.DropPageTables(); err != nil {
		t.Fatalf("DropPageTables after Close: %v", err)
	}
}
