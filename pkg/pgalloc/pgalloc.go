// Package pgalloc provides the memory file: one host memfd that holds all
// of a sandbox's guest memory, and the folio allocator over it.
//
// The memory file plays the part of physical memory in Linux. A page is
// named by its PFN, its byte offset in the file divided by PageSize. PFN 0
// is never handed out, because 0 means "none" in every ABI record that
// crosses a restart. A folio is a naturally aligned block of 2^order pages
// (order 0 … MaxOrder; order 9 is 2 MiB) with a reference count.
//
// The file is created once at its full size (sparse) and mapped once,
// MAP_SHARED|MAP_NORESERVE and without populating; nothing touches the whole
// file. Free space is a set of extents in B-trees, split and coalesced
// buddy-style (see extentSet for the placement policy). Freed folios are
// returned to the host with fallocate(PUNCH_HOLE|KEEP_SIZE) by a background
// releaser, in batches, so DecRef never makes a system call.
//
// A sentry that takes over a memory file from its predecessor opens it with
// Open and calls Adopt (blocks), AdoptRuns (runs of blocks) or AdoptBitmaps
// (KHO's per-order bitmaps) with what was preserved: those blocks become
// allocated folios with one reference, and every other page becomes stale.
// Stale pages may still hold the previous sentry's data; they are punched
// out (and so read as zero) before they are handed out again, lazily by the
// allocation that needs them or in the background by the releaser, never
// inside Adopt. Adopting costs time in proportion to the preserved set as
// given (for AdoptBitmaps, to the bitmaps), not to the file: page metadata
// and the list of stale ranges are derived from the adopted set later, when
// first needed.
//
// Lock order: MemoryFile.mu is the only lock. The releaser never holds it
// across a system call; an allocation that has to scrub stale or freed pages
// itself does hold it (it cannot proceed without them anyway).
package pgalloc

import (
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

const (
	// PageShift is log2(PageSize).
	PageShift = 12
	// PageSize is the size of a page of the memory file.
	PageSize = 1 << PageShift
	// MaxOrder is the largest folio order (2^10 pages = 4 MiB), like
	// Linux's MAX_PAGE_ORDER on x86-64.
	MaxOrder = 10
	// HugeOrder is the order of a 2 MiB folio.
	HugeOrder = 9
	// DefaultSize is the default size of a new memory file (sparse).
	DefaultSize = 16 << 30

	sectionShift = 30 - PageShift // one section of page metadata per GiB
	sectionPages = 1 << sectionShift
)

// Folio names an allocated folio by its first page and its order.
type Folio struct {
	PFN   uint64
	Order int
}

// Pages returns the number of pages in f.
func (f Folio) Pages() uint64 { return 1 << f.Order }

// Size returns the size of f in bytes.
func (f Folio) Size() uint64 { return PageSize << f.Order }

// Addr returns the byte offset of f in the memory file, the counterpart of a
// physical address in Linux.
func (f Folio) Addr() uint64 { return f.PFN << PageShift }

// String implements fmt.Stringer.
func (f Folio) String() string { return fmt.Sprintf("folio(pfn %#x, order %d)", f.PFN, f.Order) }

// Block is a preserved block handed to Adopt: 2^Order pages at PFN.
type Block = Folio

// pageInfo is the metadata of one page, the counterpart of struct page. Only
// folio heads carry information; every other entry is zero.
type pageInfo struct {
	refs  int32
	order uint8
	head  bool
}

// chunkShift is log2 of the pages whose metadata fills one page of a
// section (512 entries of 8 bytes): the unit in which an adopted section
// is filled.
const chunkShift = PageShift - 3

// section holds the page metadata of one GiB of the file. Sections are
// allocated when the first folio head in them is, so the metadata costs
// nothing for parts of the file that hold no folio. A section that holds
// adopted blocks is filled from the adopted set a chunk (512 pages, 2 MiB
// of the file) at a time, when an entry of the chunk is first needed.
//
// The entry of a chunk's first page is kept apart from the others (heads),
// and the other 511 are allocated (rest) only when one of them is first
// needed, which is when a block smaller than 2 MiB starts in the chunk.
// A GiB of 2 MiB folios thus needs 8 KiB of metadata, not 2 MiB: fresh
// memory is what a new sentry pays for most (about 17 µs per page on a
// VM, 512 pages per GiB), and a relaunched guest's first mmap of its
// memfds waited for it.
type section struct {
	// unfilled has bit c set while chunk c has not been filled from the
	// adopted set.
	unfilled [sectionPages >> chunkShift / 64]uint64
	// heads[c] is the entry of chunk c's first page.
	heads [sectionPages >> chunkShift]pageInfo
	// rest[c] holds the entries of chunk c's other pages (index 0 is
	// unused), nil until one is needed.
	rest [sectionPages >> chunkShift]*[1 << chunkShift]pageInfo
}

// entry returns the entry of page off of the section, allocating its
// chunk's entries if alloc; nil if they are not allocated and alloc is
// false (the entry is then zero: no folio starts there).
func (s *section) entry(off uint64, alloc bool) *pageInfo {
	c, i := off>>chunkShift, off&(1<<chunkShift-1)
	if i == 0 {
		return &s.heads[c]
	}
	if s.rest[c] == nil {
		if !alloc {
			return nil
		}
		s.rest[c] = newChunkInfo()
	}
	return &s.rest[c][i]
}

// chunkInfo is the page metadata of a chunk's pages after its first.
type chunkInfo = [1 << chunkShift]pageInfo

// chunkPool holds chunkInfos faulted in ahead of a restart's pause
// (PrepareMetadata), for the metadata of the folios the next memory file
// this process adopts.
var chunkPool struct {
	mu sync.Mutex
	// +checklocks:mu
	free []*chunkInfo
}

// newChunkInfo returns a zeroed chunkInfo, from the pool while it lasts.
func newChunkInfo() *chunkInfo {
	chunkPool.mu.Lock()
	defer chunkPool.mu.Unlock()
	if n := len(chunkPool.free); n > 0 {
		c := chunkPool.free[n-1]
		chunkPool.free = chunkPool.free[:n-1]
		return c
	}
	return new(chunkInfo)
}

// PrepareMetadata allocates and faults in, ahead of a restart's pause, the
// page metadata of n chunks (4 KiB each) for the next memory file this
// process adopts: a chunk in which a folio smaller than 2 MiB starts needs
// one, built after the blackout (FillMetadata) or by the first call that
// needs it, and the first touch of fresh memory costs about 17 µs a page on
// a VM, paid then by a relaunched guest's first retrieve. The previous
// sentry says how many it had (MetadataChunks). Calling it again replaces
// the pool; ReleaseMetadataPool drops what is left.
func PrepareMetadata(n int) {
	slab := make([]chunkInfo, n)
	free := make([]*chunkInfo, n)
	for i := range slab {
		slab[i][0] = pageInfo{} // fault the page in
		free[i] = &slab[i]
	}
	chunkPool.mu.Lock()
	chunkPool.free = free
	chunkPool.mu.Unlock()
}

// ReleaseMetadataPool drops the chunks PrepareMetadata made that nothing
// took.
func ReleaseMetadataPool() {
	chunkPool.mu.Lock()
	chunkPool.free = nil
	chunkPool.mu.Unlock()
}

// MetadataChunks returns the number of chunks whose pages after the first
// have page metadata: what a sentry taking this memory file over is told
// to prepare (PrepareMetadata).
func (f *MemoryFile) MetadataChunks() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, s := range f.sections {
		if s == nil {
			continue
		}
		for _, r := range s.rest {
			if r != nil {
				n++
			}
		}
	}
	return n
}

// Options configures a new MemoryFile.
type Options struct {
	// Size is the size of the memory file in bytes, rounded up to a page.
	// Zero means DefaultSize.
	Size uint64
	// Name is the memfd's name (visible in /proc/PID/fd). Empty means
	// "livesentry-memory".
	Name string
	// NoHugepages disables MADV_HUGEPAGE even where the host allows it.
	NoHugepages bool
}

// MemoryFile is the memory file and its folio allocator. It is safe for
// concurrent use.
type MemoryFile struct {
	file      *os.File
	mapping   []byte
	pages     uint64
	hugepages bool
	// drops counts the drops of page tables (dropRange) under way, which
	// Close waits for before it unmaps the file.
	drops sync.WaitGroup

	// touched is, per 2 MiB chunk, how this process has touched its pages
	// through mapping (touch.go).
	touched []atomic.Uint32

	releaserWake chan struct{}
	releaserStop chan struct{}
	releaserDone chan struct{}

	mu sync.Mutex

	// cond is signalled when pages scrubbed by the releaser become free.
	// Its L is mu.
	//
	// +checklocks:mu
	cond sync.Cond

	// adopted is false for a file opened with Open until Adopt runs: until
	// then the file holds the previous sentry's memory and nothing may be
	// allocated from it.
	//
	// +checklocks:mu
	adopted bool

	// free holds pages that are holes in the file and may be handed out.
	//
	// +checklocks:mu
	free extentSet

	// sections holds the page metadata, one entry per GiB of the file.
	//
	// +checklocks:mu
	sections []*section

	// stale holds the ranges, sorted by address, that were not preserved
	// when the file was adopted and have not been scrubbed yet. Ranges only
	// shrink from their low end. staleHead is the first range that may be
	// non-empty; staleCursor[o] is the first range that may hold an aligned
	// block of order o.
	//
	// +checklocks:mu
	stale []pfnRange
	// +checklocks:mu
	staleHead int
	// +checklocks:mu
	staleCursor [MaxOrder + 1]int
	// +checklocks:mu
	stalePages uint64

	// waste holds folios freed since the releaser last ran; they must be
	// punched out before they are free.
	//
	// +checklocks:mu
	waste []pfnRange
	// +checklocks:mu
	wastePages uint64
	// wasteSpare is an empty slice with capacity, the waste list's other
	// buffer.
	//
	// +checklocks:mu
	wasteSpare []pfnRange

	// inflightPages counts pages the releaser has taken from stale or
	// waste and not yet returned to free.
	//
	// +checklocks:mu
	inflightPages uint64

	// folios counts allocated folios by order.
	//
	// +checklocks:mu
	folios [MaxOrder + 1]uint64

	// set is the preserved set the file was adopted with, nil if none. A
	// section that does not exist yet is filled from it when it is
	// created, so Adopt does not write page metadata itself. set never
	// changes once adopted, so the releaser may read it without mu.
	//
	// +checklocks:mu
	set adoptedSet
	// setSections[i] is set if set has a block in section i.
	//
	// +checklocks:mu
	setSections []bool
	// staleUnbuilt is set from Adopt until stale has been derived from
	// set (staleRangesLocked): until then stalePages counts pages that
	// stale does not list yet.
	//
	// +checklocks:mu
	staleUnbuilt bool

	// held is set between HoldReleases and ResumeReleases: the releaser
	// punches nothing out of the file.
	//
	// +checklocks:mu
	held bool

	// +checklocks:mu
	closed bool
}

// New creates a memory file: a new host memfd of opts.Size bytes, empty and
// sparse, mapped once. Every page except PFN 0 is free.
func New(opts Options) (*MemoryFile, error) {
	size := opts.Size
	if size == 0 {
		size = DefaultSize
	}
	size = (size + PageSize - 1) &^ (PageSize - 1)
	if size < 2*PageSize {
		return nil, fmt.Errorf("memory file size %d: must be at least two pages: %w", opts.Size, unix.EINVAL)
	}
	name := opts.Name
	if name == "" {
		name = "livesentry-memory"
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create(%q): %w", name, err)
	}
	file := os.NewFile(uintptr(fd), "memfd:"+name)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		file.Close()
		return nil, fmt.Errorf("sizing memory file to %d bytes: %w", size, err)
	}
	f, err := newMemoryFile(file, size, opts)
	if err != nil {
		file.Close()
		return nil, err
	}
	f.mu.Lock()
	f.adopted = true
	f.free.insert(1, f.pages)
	f.mu.Unlock()
	return f, nil
}

// Open maps an existing memory file, typically one received from the
// previous sentry, without changing its contents. Nothing can be allocated
// until Adopt has told the allocator which blocks were preserved. Releases
// start held (see HoldReleases): nothing of the previous sentry's memory is
// scrubbed, in the background or by an allocation, until ResumeReleases
// says the handover is this sentry's. The MemoryFile takes ownership of
// file.
func Open(file *os.File, opts Options) (*MemoryFile, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(file.Fd()), &st); err != nil {
		return nil, fmt.Errorf("fstat of memory file: %w", err)
	}
	size := uint64(st.Size)
	if st.Size <= 0 || size%PageSize != 0 || size < 2*PageSize {
		return nil, fmt.Errorf("memory file size %d: not a positive multiple of the page size of at least two pages: %w", st.Size, unix.EINVAL)
	}
	f, err := newMemoryFile(file, size, opts)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.held = true
	f.mu.Unlock()
	return f, nil
}

func newMemoryFile(file *os.File, size uint64, opts Options) (*MemoryFile, error) {
	m, err := unix.Mmap(int(file.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mapping %d-byte memory file: %w", size, err)
	}
	f := &MemoryFile{
		file:         file,
		mapping:      m,
		pages:        size / PageSize,
		touched:      newTouches(size / PageSize),
		releaserWake: make(chan struct{}, 1),
		releaserStop: make(chan struct{}),
		releaserDone: make(chan struct{}),
		free:         newExtentSet(),
		sections:     make([]*section, (size/PageSize+sectionPages-1)>>sectionShift),
	}
	f.cond.L = &f.mu
	if !opts.NoHugepages && shmemHugepagesAllowed() {
		if err := unix.Madvise(m, unix.MADV_HUGEPAGE); err == nil {
			f.hugepages = true
		}
	}
	go f.releaserMain()
	return f, nil
}

// shmemHugepagesAllowed reports whether the host's shmem THP setting lets
// the mapping use huge pages when asked to. It is read once per process: a
// sysfs read costs 60-210 us on a VM, and a restart's new sentry opens
// the memory file inside the blackout, after a rehearsal that read it.
var shmemHugepagesAllowed = sync.OnceValue(readShmemHugepagesAllowed)

func readShmemHugepagesAllowed() bool {
	b, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
	if err != nil {
		return false
	}
	for _, w := range strings.Fields(string(b)) {
		if strings.HasPrefix(w, "[") {
			switch strings.Trim(w, "[]") {
			case "always", "within_size", "advise", "force":
				return true
			}
		}
	}
	return false
}

// Close stops the releaser, unmaps the file and closes the memfd. Folios and
// views must not be used afterwards. The host frees the memory when the
// last process holding the memfd closes it.
func (f *MemoryFile) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.mu.Unlock()
	close(f.releaserStop)
	<-f.releaserDone
	// No drop starts once closed is set.
	f.drops.Wait()
	err := unix.Munmap(f.mapping)
	if cerr := f.file.Close(); err == nil {
		err = cerr
	}
	return err
}

// FD returns the memfd's file descriptor, owned by f.
func (f *MemoryFile) FD() int { return int(f.file.Fd()) }

// DupFile returns a new file descriptor for the memory file (close-on-exec),
// to hand over to the next sentry. The caller owns it.
func (f *MemoryFile) DupFile() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(f.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicating memory file fd: %w", err)
	}
	return os.NewFile(uintptr(fd), f.file.Name()), nil
}

// numSections returns the number of sections of page metadata the file has
// (len(f.sections), which never changes).
func (f *MemoryFile) numSections() int { return int((f.pages + sectionPages - 1) >> sectionShift) }

// Pages returns the number of pages in the file.
func (f *MemoryFile) Pages() uint64 { return f.pages }

// Size returns the size of the file in bytes.
func (f *MemoryFile) Size() uint64 { return f.pages * PageSize }

// Hugepages reports whether the mapping was advised to use huge pages.
func (f *MemoryFile) Hugepages() bool { return f.hugepages }

// Bytes returns the contents of fo as a slice of the file's mapping: writes
// through it are writes to the memory file.
//
// Preconditions:
//   - fo lies inside the file (it came from this MemoryFile).
func (f *MemoryFile) Bytes(fo Folio) []byte {
	off := fo.PFN << PageShift
	return f.mapping[off : off+fo.Size() : off+fo.Size()]
}

// Slice returns npages pages from pfn as a slice of the file's mapping. It
// checks the range against the file, so it is safe for addresses read from
// untrusted data.
func (f *MemoryFile) Slice(pfn, npages uint64) ([]byte, error) {
	if npages == 0 || pfn >= f.pages || npages > f.pages-pfn {
		return nil, fmt.Errorf("pages [%#x, +%d) outside the %d-page memory file: %w", pfn, npages, f.pages, unix.ERANGE)
	}
	off := pfn << PageShift
	end := off + npages<<PageShift
	return f.mapping[off:end:end], nil
}

// dropChunkPages is the part of the mapping DropPageTables unmaps with one
// call (64 MiB, about a millisecond with 4 KiB pages).
const dropChunkPages = 1 << 14

// DropPageTables removes this process's page-table entries for the whole
// mapping, as munmap would, without unmapping it: madvise(MADV_DONTNEED) on
// a shared file mapping only zaps the entries; the contents stay in the
// file, and the next access to a page faults it back in. It changes nothing
// anyone can observe, so it is safe while guests run.
//
// Its use is an exec-mode restart: execve tears down the address space
// inside the blackout, and the cost of that is the page-table entries of
// every page of the memory file this process touched (~15 ms per GiB of 4
// KiB pages). Dropping them just before the pause leaves execve only those
// touched since. It works a chunk at a time (Close waits for the chunk
// under way before it unmaps the file), and stops early once the file is
// closed.
func (f *MemoryFile) DropPageTables() error {
	f.forgetTouches()
	for pfn := uint64(0); pfn < f.pages; pfn += dropChunkPages {
		end := min(pfn+dropChunkPages, f.pages)
		if closed, err := f.dropRange(pfn, end); closed || err != nil {
			return err
		}
	}
	return nil
}

// dropTouchedRunPages bounds the run of touched chunks DropTouchedPageTables
// unmaps with one call (16 MiB, a few hundred microseconds with 4 KiB
// pages): it checks its stop channel between runs.
const dropTouchedRunPages = 1 << 12

// DropTouchedPageTables is DropPageTables of only the 2 MiB chunks that the
// touch record says this process touched through its mapping (memfd data
// written or read through it, TouchedThroughMapping): the bulk of what the
// process's exit would tear down. The pages of LUO's and memfd's records,
// which a restart's freeze writes through the mapping and which are not
// recorded, stay mapped, so that the freeze does not fault them back in one
// by one inside the blackout. Like DropPageTables it changes nothing anyone
// can observe. It returns early, with what is left still mapped, once stop
// is closed or the file is closed.
//
// Its use is a transfer-mode restart: the old sentry exits right after the
// blackout, when the new sentry and the relaunched guests want every CPU,
// so it drops what it can while the new sentry starts.
func (f *MemoryFile) DropTouchedPageTables(stop <-chan struct{}) error {
	const chunkPages = 1 << touchShift
	for c := 0; c < len(f.touched); {
		if f.touched[c].Load() != touchMapped {
			c++
			continue
		}
		select {
		case <-stop:
			return nil
		default:
		}
		first := c
		for c < len(f.touched) && f.touched[c].Load() == touchMapped && uint64(c-first+1)*chunkPages <= dropTouchedRunPages {
			// Forgotten first: a copy through the mapping from here
			// on marks its chunk again, and at worst a chunk marked
			// and then dropped costs a fault later.
			f.touched[c].Store(touchNone)
			c++
		}
		if closed, err := f.dropRange(uint64(first)*chunkPages, min(uint64(c)*chunkPages, f.pages)); closed || err != nil {
			return err
		}
	}
	return nil
}

// dropRange zaps this process's page-table entries for pages [start, end)
// with madvise(MADV_DONTNEED), unless the file is closed (closed is then
// true). It does not hold the allocator's lock across the call, which can
// take milliseconds (a drop may run at idle priority, and must not hold up
// allocations meanwhile): Close waits for it before it unmaps the file.
func (f *MemoryFile) dropRange(start, end uint64) (closed bool, err error) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return true, nil
	}
	f.drops.Add(1)
	f.mu.Unlock()
	defer f.drops.Done()
	if err := unix.Madvise(f.mapping[start<<PageShift:end<<PageShift], unix.MADV_DONTNEED); err != nil {
		return false, fmt.Errorf("dropping the page tables of pages [%#x, %#x) of the memory file: %w", start, end, err)
	}
	return false, nil
}

// ReadPages copies len(p) bytes, a whole number of pages, from pfn on into
// p with pread(2), not through the mapping: the caller's page tables are
// not populated, so reading a few scattered pages costs no page fault each
// (what a new sentry reads of the previous one's map during a restart's
// blackout). It checks the range against the file, so it is safe for
// addresses read from untrusted data.
func (f *MemoryFile) ReadPages(pfn uint64, p []byte) error {
	n := uint64(len(p)) / PageSize
	if uint64(len(p))%PageSize != 0 || n == 0 || pfn >= f.pages || n > f.pages-pfn {
		return fmt.Errorf("pages [%#x, +%d bytes) outside the %d-page memory file: %w", pfn, len(p), f.pages, unix.ERANGE)
	}
	off := int64(pfn << PageShift)
	for len(p) > 0 {
		m, err := unix.Pread(f.FD(), p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("reading pages at %#x of the memory file: %w", pfn, err)
		}
		if m == 0 {
			return fmt.Errorf("reading pages at %#x of the memory file: short read: %w", pfn, unix.EIO)
		}
		p, off = p[m:], off+int64(m)
	}
	return nil
}

// pageInfoLocked returns the metadata entry of pfn, allocating its section
// (and its chunk's entries, see section) if asked to; nil if they are not
// allocated and alloc is false, which means the entry is zero. In a section
// that holds adopted blocks, it first fills the chunk of pfn from the
// adopted set if that has not been done.
//
// Preconditions:
//   - pfn < f.pages.
//
// +checklocks:f.mu
func (f *MemoryFile) pageInfoLocked(pfn uint64, alloc bool) *pageInfo {
	i := pfn >> sectionShift
	s := f.sections[i]
	if s == nil {
		adopted := f.set != nil && f.setSections[i]
		if !alloc && !adopted {
			return nil
		}
		s = new(section)
		f.sections[i] = s
		if adopted {
			for w := range s.unfilled {
				s.unfilled[w] = ^uint64(0)
			}
		}
	}
	off := pfn & (sectionPages - 1)
	if c := off >> chunkShift; s.unfilled[c/64]&(1<<(c%64)) != 0 {
		s.unfilled[c/64] &^= 1 << (c % 64)
		start := i<<sectionShift + c<<chunkShift
		f.set.fill(start, start+1<<chunkShift, func(head uint64, pi pageInfo) {
			*s.entry(head&(sectionPages-1), true) = pi
		})
	}
	return s.entry(off, alloc)
}

// FillMetadata builds the page metadata of every adopted page whose chunk
// has not been built yet, one chunk per hold of the lock, so that calls
// running meanwhile wait for one chunk at most. A live-update boot runs it
// in the background once the blackout is over: the first guest calls then
// find the metadata of their folios ready instead of building it.
func (f *MemoryFile) FillMetadata() {
	f.mu.Lock()
	n := uint64(len(f.sections))
	f.mu.Unlock()
	for i := range n {
		for c := uint64(0); c < sectionPages>>chunkShift; c++ {
			pfn := i<<sectionShift + c<<chunkShift
			f.mu.Lock()
			if pfn < f.pages && f.set != nil && f.setSections[i] {
				f.pageInfoLocked(pfn, false)
			}
			f.mu.Unlock()
			// Other goroutines first: with a CPU or two, this one
			// would otherwise keep a P until it is preempted, 10 ms
			// on, while a guest's first calls wait.
			runtime.Gosched()
		}
	}
}

// Allocate returns a new folio of 2^order zeroed pages holding one
// reference. It fails with ENOMEM when no naturally aligned free block of
// that order is left, and with EINVAL for an order outside [0, MaxOrder] or
// before a file opened with Open has been adopted.
func (f *MemoryFile) Allocate(order int) (Folio, error) {
	if order < 0 || order > MaxOrder {
		return Folio{}, fmt.Errorf("allocating a folio of order %d (max %d): %w", order, MaxOrder, unix.EINVAL)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	pfn, err := f.allocLocked(order)
	if err != nil {
		return Folio{}, fmt.Errorf("allocating a folio of order %d: %w", order, err)
	}
	pi := f.pageInfoLocked(pfn, true)
	*pi = pageInfo{refs: 1, order: uint8(order), head: true}
	f.folios[order]++
	return Folio{PFN: pfn, Order: order}, nil
}

// AllocatePages allocates n order-0 folios, contiguous in the file: the
// folios of the returned run, each holding one reference, as n calls of
// Allocate(0) would give them but next to each other, so that they are one
// run of a memfd's page cache and one mmap of a guest. It takes the first
// block of the smallest order that holds n pages, under Allocate's
// placement policy, and frees the rest of it at once. It fails like
// Allocate, with EINVAL for n of 0 or more than 2^MaxOrder.
func (f *MemoryFile) AllocatePages(n uint64) (Run, error) {
	if n == 0 || n > 1<<MaxOrder {
		return Run{}, fmt.Errorf("allocating %d contiguous pages (1 to %d): %w", n, 1<<MaxOrder, unix.EINVAL)
	}
	order := bits.Len64(n - 1)
	f.mu.Lock()
	defer f.mu.Unlock()
	pfn, err := f.allocLocked(order)
	if err != nil {
		return Run{}, fmt.Errorf("allocating %d contiguous pages: %w", n, err)
	}
	if end := pfn + 1<<order; pfn+n < end {
		f.free.insert(pfn+n, end)
	}
	for i := range n {
		*f.pageInfoLocked(pfn+i, true) = pageInfo{refs: 1, head: true}
	}
	f.folios[0] += n
	return Run{PFN: pfn, Count: uint32(n)}, nil
}

// allocLocked takes a free, scrubbed block of 2^order pages from the free
// set, scrubbing stale pages and releasing waste as needed, and returns its
// first PFN; ENOMEM if there is none.
//
// +checklocks:f.mu
func (f *MemoryFile) allocLocked(order int) (uint64, error) {
	if !f.adopted {
		return 0, fmt.Errorf("the memory file has not been adopted: %w", unix.EINVAL)
	}
	for {
		if pfn, ok := f.free.alloc(order); ok {
			return pfn, nil
		}
		if f.held {
			// Scrubbing would punch pages the other sentry of a
			// restart may still use (see HoldReleases).
			return 0, fmt.Errorf("no scrubbed free memory while releases are held for a restart: %w", unix.ENOMEM)
		}
		if f.scrubStaleLocked(order) {
			continue
		}
		if len(f.waste) > 0 {
			f.releaseWasteLocked()
			continue
		}
		if f.inflightPages > 0 {
			f.cond.Wait()
			continue
		}
		return 0, unix.ENOMEM
	}
}

// headLocked returns the metadata of the folio fo, panicking if fo is not an
// allocated folio: a caller inside the sentry that passes anything else has
// a bug.
//
// +checklocks:f.mu
func (f *MemoryFile) headLocked(fo Folio, op string) *pageInfo {
	if fo.PFN >= f.pages {
		panic(fmt.Sprintf("pgalloc: %s of %v outside the file", op, fo))
	}
	pi := f.pageInfoLocked(fo.PFN, false)
	if pi == nil || !pi.head || int(pi.order) != fo.Order || pi.refs <= 0 {
		panic(fmt.Sprintf("pgalloc: %s of %v, which is not an allocated folio", op, fo))
	}
	return pi
}

// IncRef takes a reference on fo.
//
// Preconditions:
//   - fo is allocated (the caller holds a reference).
func (f *MemoryFile) IncRef(fo Folio) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.headLocked(fo, "IncRef").refs++
}

// IncRefs takes a reference on each of fs, under one lock.
//
// Preconditions:
//   - Each of fs is allocated (the caller holds a reference).
func (f *MemoryFile) IncRefs(fs []Folio) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, fo := range fs {
		f.headLocked(fo, "IncRefs").refs++
	}
}

// IncRefRun takes a reference on each folio of r, under one lock.
//
// Preconditions:
//   - Each folio of r is allocated (the caller holds a reference).
func (f *MemoryFile) IncRefRun(r Run) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range uint64(r.Count) {
		f.headLocked(r.Folio(i), "IncRefRun").refs++
	}
}

// DecRefRun drops a reference on each folio of r, under one lock, as DecRef
// does.
//
// Preconditions:
//   - Each folio of r is allocated (the caller holds a reference).
func (f *MemoryFile) DecRefRun(r Run) {
	if f.decRefRun(r) {
		f.wakeReleaser()
	}
}

// decRefRun drops a reference on each folio of r and reports whether the
// releaser should be woken.
func (f *MemoryFile) decRefRun(r Run) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	wake := false
	for i := range uint64(r.Count) {
		wake = f.decRefLocked(r.Folio(i)) || wake
	}
	return wake
}

// DecRef drops a reference on fo. When the last one goes, the folio's pages
// are released to the host in the background and become free again.
//
// Preconditions:
//   - fo is allocated (the caller holds a reference).
func (f *MemoryFile) DecRef(fo Folio) {
	if f.decRef(fo) {
		f.wakeReleaser()
	}
}

// decRef drops a reference on fo and reports whether the releaser should
// be woken.
func (f *MemoryFile) decRef(fo Folio) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.decRefLocked(fo)
}

// decRefLocked is decRef with f.mu held. Folios freed one after the other
// in address order make one waste range.
//
// +checklocks:f.mu
func (f *MemoryFile) decRefLocked(fo Folio) bool {
	pi := f.headLocked(fo, "DecRef")
	pi.refs--
	if pi.refs > 0 {
		return false
	}
	*pi = pageInfo{}
	f.folios[fo.Order]--
	if n := len(f.waste); n > 0 && f.waste[n-1].end == fo.PFN {
		f.waste[n-1].end += fo.Pages()
	} else {
		f.waste = append(f.waste, pfnRange{start: fo.PFN, end: fo.PFN + fo.Pages()})
	}
	wasEmpty := f.wastePages == 0
	f.wastePages += fo.Pages()
	return wasEmpty || f.wastePages >= releaseBatchPages && f.wastePages-fo.Pages() < releaseBatchPages
}

// Lookup returns the allocated folio whose head is pfn and its reference
// count, or false if pfn is not the head of an allocated folio.
func (f *MemoryFile) Lookup(pfn uint64) (Folio, int32, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if pfn >= f.pages {
		return Folio{}, 0, false
	}
	pi := f.pageInfoLocked(pfn, false)
	if pi == nil || !pi.head {
		return Folio{}, 0, false
	}
	return Folio{PFN: pfn, Order: int(pi.order)}, pi.refs, true
}

// Stats describes the state of a MemoryFile at one moment.
type Stats struct {
	// FileSize is the size of the memory file in bytes.
	FileSize uint64
	// Folios is the number of allocated folios of each order.
	Folios [MaxOrder + 1]uint64
	// AllocatedPages is the number of pages in allocated folios.
	AllocatedPages uint64
	// FreePages is the number of pages ready to be allocated.
	FreePages uint64
	// StalePages is the number of pages left from an adopted file's
	// previous owner that are not scrubbed yet.
	StalePages uint64
	// ReleasingPages is the number of freed pages not yet returned to the
	// host.
	ReleasingPages uint64
	// CommittedBytes is the host memory the file uses (fstat st_blocks).
	CommittedBytes uint64
	// Hugepages reports whether the mapping was advised to use huge pages.
	Hugepages bool
}

// Stats returns the allocator's counters and the host's view of the file.
func (f *MemoryFile) Stats() Stats {
	f.mu.Lock()
	s := Stats{
		FileSize:       f.pages * PageSize,
		Folios:         f.folios,
		FreePages:      f.free.pages,
		StalePages:     f.stalePages,
		ReleasingPages: f.wastePages + f.inflightPages,
		Hugepages:      f.hugepages,
	}
	f.mu.Unlock()
	for o, n := range s.Folios {
		s.AllocatedPages += n << o
	}
	var st unix.Stat_t
	if err := unix.Fstat(f.FD(), &st); err == nil {
		s.CommittedBytes = uint64(st.Blocks) * 512
	}
	return s
}
