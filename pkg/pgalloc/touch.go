package pgalloc

import "sync/atomic"

// touchShift is the size of the chunks (in pages, as a shift: 2 MiB) whose
// use of this process's mapping MemoryFile.CopyThroughMapping remembers.
const touchShift = 9

// How this process has touched a chunk's pages through its mapping, as far
// as the callers have said (a guess: being wrong only costs time).
const (
	// touchNone: not through the mapping (new to this process, written
	// with pwrite(2), or its page tables dropped).
	touchNone = iota
	// touchOnce: copied out once with a system call instead.
	touchOnce
	// touchMapped: copied through the mapping; its pages are mapped here.
	touchMapped
)

// CopyThroughMapping reports whether a copy into or out of pages
// [pfn, pfn+n) should go through this process's mapping (true) or through a
// system call on the file (false), and records the answer.
//
// The first touch of a page through a mapping costs a page fault, and on a
// VM that shadows its guests' page tables a fill of the shadow entry even
// after the fault, microseconds a page; the kernel copies through its own
// mapping, which costs neither, but a copy out to another file descriptor
// then needs a buffer and so one copy more. Pages this process has touched
// through its mapping are cheaper through it; pages it has not, the first
// time, through the kernel: every page after a live restart, and every page
// written with pwrite(2). A range copied out through the kernel once goes
// through the mapping the second time, so that data read again and again
// ends up on the one-copy path.
func (f *MemoryFile) CopyThroughMapping(pfn, n uint64) bool {
	if n == 0 || pfn >= f.pages || n > f.pages-pfn {
		return true
	}
	mapped := true
	for c := pfn >> touchShift; c <= (pfn+n-1)>>touchShift; c++ {
		switch f.touched[c].Load() {
		case touchMapped:
		case touchOnce:
			f.touched[c].Store(touchMapped)
		default:
			f.touched[c].Store(touchOnce)
			mapped = false
		}
	}
	return mapped
}

// TouchedThroughMapping records that pages [pfn, pfn+n) were copied
// through this process's mapping (a write through it, say), so that
// CopyThroughMapping answers true for them.
func (f *MemoryFile) TouchedThroughMapping(pfn, n uint64) {
	if n == 0 || pfn >= f.pages || n > f.pages-pfn {
		return
	}
	for c := pfn >> touchShift; c <= (pfn+n-1)>>touchShift; c++ {
		if f.touched[c].Load() != touchMapped {
			f.touched[c].Store(touchMapped)
		}
	}
}

// forgetTouches records that no page is mapped here any more.
func (f *MemoryFile) forgetTouches() {
	for c := range f.touched {
		f.touched[c].Store(touchNone)
	}
}

// forgetTouchesIn records that no page of the chunks wholly inside pages
// [start, end) is mapped here any more.
func (f *MemoryFile) forgetTouchesIn(start, end uint64) {
	for c := (start + 1<<touchShift - 1) >> touchShift; (c+1)<<touchShift <= end; c++ {
		f.touched[c].Store(touchNone)
	}
}

// newTouches returns the touch record of a file of pages pages.
func newTouches(pages uint64) []atomic.Uint32 {
	return make([]atomic.Uint32, (pages+1<<touchShift-1)>>touchShift)
}
