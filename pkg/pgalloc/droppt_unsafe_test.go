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

func TestDropTouchedPageTablesDropsOnlyTheChunksTouchedThroughTheMapping(t *testing.T) {
	f := newTestFile(t, 64<<20)
	defer f.Close()
	data, err := f.Allocate(MaxOrder)
	if err != nil {
		t.Fatal(err)
	}
	records, err := f.Allocate(MaxOrder)
	if err != nil {
		t.Fatal(err)
	}
	// Both written through the mapping; only data is recorded as such,
	// as memfd's copies record theirs and LUO's record writes do not.
	fill(f.Bytes(data), 42)
	fill(f.Bytes(records), 7)
	f.TouchedThroughMapping(data.PFN, data.Pages())
	before := mappingRSS(t, f)
	if before < (data.Size()+records.Size())>>10 {
		t.Fatalf("after writing both through the mapping its RSS is %d KiB", before)
	}

	stopped := make(chan struct{})
	close(stopped)
	if err := f.DropTouchedPageTables(stopped); err != nil {
		t.Fatal(err)
	}
	if rss := mappingRSS(t, f); rss != before {
		t.Fatalf("a drop stopped before it began changed the RSS from %d to %d KiB", before, rss)
	}

	if err := f.DropTouchedPageTables(nil); err != nil {
		t.Fatal(err)
	}
	if rss := mappingRSS(t, f); before-rss != data.Size()>>10 {
		t.Fatalf("the drop took the RSS from %d to %d KiB, want exactly the %d KiB of the touched chunks gone", before, rss, data.Size()>>10)
	}
	for _, c := range []struct {
		fo   Folio
		want uint64
	}{{data, 42}, {records, 7}} {
		want := make([]byte, c.fo.Size())
		fill(want, c.want)
		got := make([]byte, c.fo.Size())
		if err := f.ReadPages(c.fo.PFN, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("the file's contents at pfn %#x changed (%v)", c.fo.PFN, err)
		}
	}
	if f.CopyThroughMapping(data.PFN, data.Pages()) {
		t.Error("after the drop the touch record still says the data is mapped here")
	}

	// Nothing touched since: a second drop changes nothing.
	after := mappingRSS(t, f)
	if err := f.DropTouchedPageTables(nil); err != nil {
		t.Fatal(err)
	}
	if rss := mappingRSS(t, f); rss != after {
		t.Fatalf("a second drop took the RSS from %d to %d KiB", after, rss)
	}
}

func TestCloseWaitsForADropUnderWay(t *testing.T) {
	for range 20 {
		f := newTestFile(t, 64<<20)
		for range 8 {
			fo, err := f.Allocate(MaxOrder)
			if err != nil {
				t.Fatal(err)
			}
			fill(f.Bytes(fo), 1)
			f.TouchedThroughMapping(fo.PFN, fo.Pages())
		}
		done := make(chan error, 2)
		go func() { done <- f.DropTouchedPageTables(nil) }()
		go func() { done <- f.DropPageTables() }()
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := <-done; err != nil {
				t.Fatalf("a drop racing Close: %v", err)
			}
		}
	}
}
