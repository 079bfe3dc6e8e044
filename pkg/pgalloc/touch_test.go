package pgalloc

import "testing"

func TestCopyThroughMappingAnswersNoOnceThenYesPerChunk(t *testing.T) {
	f := newTestFile(t, 16<<20) // 8 chunks of 2 MiB
	const chunk = 1 << touchShift
	type step struct {
		name   string
		do     func() bool
		want   bool
		states []uint32 // chunks 0..3 afterwards
	}
	ask := func(pfn, n uint64) func() bool { return func() bool { return f.CopyThroughMapping(pfn, n) } }
	touch := func(pfn, n uint64) func() bool {
		return func() bool { f.TouchedThroughMapping(pfn, n); return true }
	}
	for _, s := range []step{
		{"a chunk never touched: through the kernel", ask(1, 3), false, []uint32{touchOnce, touchNone, touchNone, touchNone}},
		{"the same chunk again: through the mapping", ask(5, 1), true, []uint32{touchMapped, touchNone, touchNone, touchNone}},
		{"and from then on", ask(0, chunk), true, []uint32{touchMapped, touchNone, touchNone, touchNone}},
		{"a range over a mapped chunk and a new one: through the kernel", ask(chunk-1, 2), false, []uint32{touchMapped, touchOnce, touchNone, touchNone}},
		{"a write through the mapping marks its chunks at once", touch(2*chunk+7, chunk), true, []uint32{touchMapped, touchOnce, touchMapped, touchMapped}},
		{"so a read of them goes through it", ask(2*chunk, 2*chunk), true, []uint32{touchMapped, touchOnce, touchMapped, touchMapped}},
		{"an empty range", ask(3*chunk, 0), true, []uint32{touchMapped, touchOnce, touchMapped, touchMapped}},
		{"a range past the end is left alone", ask(f.Pages()-1, 2), true, []uint32{touchMapped, touchOnce, touchMapped, touchMapped}},
		{"a range whose end overflows is left alone", ask(1, ^uint64(0)), true, []uint32{touchMapped, touchOnce, touchMapped, touchMapped}},
		{"touches past the end are ignored", touch(f.Pages(), 1), true, []uint32{touchMapped, touchOnce, touchMapped, touchMapped}},
		{"dropped page tables: nothing is mapped", func() bool { return f.DropPageTables() == nil }, true, []uint32{touchNone, touchNone, touchNone, touchNone}},
		{"so a read goes through the kernel again", ask(0, 1), false, []uint32{touchOnce, touchNone, touchNone, touchNone}},
	} {
		if got := s.do(); got != s.want {
			t.Fatalf("%s: got %v, want %v", s.name, got, s.want)
		}
		for c, w := range s.states {
			if got := f.touched[c].Load(); got != w {
				t.Fatalf("%s: chunk %d is in state %d, want %d", s.name, c, got, w)
			}
		}
	}
	if last := len(f.touched) - 1; f.CopyThroughMapping(f.Pages()-1, 1) || f.touched[last].Load() != touchOnce {
		t.Errorf("the last page's chunk: state %d after a first read", f.touched[last].Load())
	}
}

func TestAPunchedChunkIsNewToTheTouchRecord(t *testing.T) {
	f := newTestFile(t, 64<<20)
	defer f.Close()
	fo, err := f.Allocate(MaxOrder)
	if err != nil {
		t.Fatal(err)
	}
	fill(f.Bytes(fo), 3)
	f.TouchedThroughMapping(fo.PFN, fo.Pages())
	// Half a chunk punched: the other half is still mapped here.
	const chunk = 1 << touchShift
	f.decommit(fo.PFN, fo.PFN+chunk/2)
	if !f.CopyThroughMapping(fo.PFN, 1) {
		t.Fatal("a chunk punched in part is no longer recorded as mapped here")
	}
	f.decommit(fo.PFN, fo.PFN+chunk)
	if f.CopyThroughMapping(fo.PFN, 1) {
		t.Fatal("a chunk punched whole is still recorded as mapped here: its next write would fault every page back in")
	}
	if !f.CopyThroughMapping(fo.PFN+chunk, 1) {
		t.Fatal("the chunk after the punch lost its record")
	}
}
