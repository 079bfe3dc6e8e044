package memfd

import (
	"sync"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// Mmap maps length bytes of the file from off (shmem_mmap): it returns the
// runs of the memory file that hold them, for the guest to map straight
// from the memory file, so that the mapping, read and write see the same
// pages. The generic checks (offset, length, access mode) are vfs.Mmap's;
// Mmap adds the memfd's own:
//
//   - EPERM for a shared writable mapping of a file sealed with
//     F_SEAL_WRITE or F_SEAL_FUTURE_WRITE (memfd_check_seals_mmap); a
//     shared mapping of such a file may never become writable (MayWrite is
//     false in the result);
//   - ENOMEM for an MFD_HUGETLB file: its huge page pool is empty, so the
//     reservation fails (hugetlb_reserve_pages); EINVAL first if off is not
//     a multiple of its huge page size.
//
// Pages of the range inside the file's size that have no folio (holes) get
// zeroed folios now, as the first touch of a shared mapping would; a folio
// fallocate allocated but nothing wrote is zeroed and marked uptodate, as
// shmem_fault does. Pages at or beyond the end of the file have no run: the
// guest keeps them unmapped (an access faults with SIGSEGV where Linux
// gives SIGBUS). Every folio of the runs stays pinned (one memory-file
// reference) until Mapping.Unmap or Release drops the last mapped page of
// it: a truncate or punch-hole while it is mapped never hands the folio to
// another file, and the mapping keeps the folio's contents (where Linux
// would zap the pages).
func (f *File) Mmap(opts vfs.MmapOpts) (vfs.Mapping, error) {
	shared := opts.Flags&unix.MAP_TYPE != unix.MAP_PRIVATE
	writable := opts.Prot&unix.PROT_WRITE != 0
	if f.hugetlb {
		if opts.Offset&(1<<f.hpageShift-1) != 0 {
			return nil, unix.EINVAL
		}
		return nil, unix.ENOMEM
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	mayWrite := true
	if shared && f.seals&(unix.F_SEAL_WRITE|unix.F_SEAL_FUTURE_WRITE) != 0 {
		if writable {
			return nil, unix.EPERM
		}
		mayWrite = false
	}
	pages := opts.Length >> pageShift
	first := opts.Offset >> pageShift
	// The pages inside the file.
	stop := min(first+pages, (uint64(f.size.Load())+pageSize-1)>>pageShift)
	m := &Mapping{pages: pages, mayWrite: mayWrite}
	m.mu.Lock()
	m.f, m.shared = f, shared
	m.mu.Unlock()
	if stop > first {
		// One pass when the range needs no fill (every page has a folio,
		// uptodate and dirty, as a retrieved file's have), else a fill
		// and a second pass.
		var rs []mappedRun
		idx, filled := first, true
		f.ascendRunsLocked(first, stop-1, func(r run) bool {
			if r.head() > idx || r.flags() != flagUptodate|flagDirty {
				filled = false
				return false
			}
			rs = append(rs, mappedRunOf(r, first, stop))
			idx = r.last + 1
			return true
		})
		if !filled || idx < stop {
			if err := f.fillLocked(first, stop); err != nil {
				return nil, err
			}
			rs = rs[:0]
			f.ascendRunsLocked(first, stop-1, func(r run) bool {
				rs = append(rs, mappedRunOf(r, first, stop))
				return true
			})
		}
		for _, mr := range rs {
			f.mf.IncRefRun(mr.r.pg())
		}
		m.mu.Lock()
		m.runs = rs
		m.mu.Unlock()
	}
	m.mu.Lock()
	m.first = first
	m.mapped = make([]uint64, (pages+63)/64)
	for _, mr := range m.runs {
		setBits(m.mapped, mr.lo, mr.hi)
	}
	m.mu.Unlock()
	f.IncRef()
	if shared && writable {
		f.writableMaps.Add(1)
		m.mu.Lock()
		m.countedWritable = true
		m.mu.Unlock()
	}
	return m, nil
}

// fillLocked gives every page of [first, stop) a folio, uptodate: holes
// get zeroed folios, and folios that are not uptodate are zeroed and marked
// uptodate (and dirty: the guest may write them through the mapping
// without the page cache seeing it).
//
// +checklocks:f.mu
func (f *File) fillLocked(first, stop uint64) error {
	segs := f.scratch[:0]
	idx := first
	var err error
	huge := func(uint64) bool { return true }
	var stale []entry
	f.ascendLocked(first, stop-1, func(e entry) bool {
		if h := e.head(); idx < h {
			if segs, err = f.allocHole(idx, h, huge, flagUptodate|flagDirty, segs); err != nil {
				return false
			}
		}
		if !e.uptodate() || !e.dirty() {
			stale = append(stale, e)
		}
		idx = e.last + 1
		return true
	})
	if err == nil && idx < stop {
		segs, err = f.allocHole(idx, stop, huge, flagUptodate|flagDirty, segs)
	}
	if err != nil {
		f.freeFresh(segs)
		f.releaseScratch(segs)
		return err
	}
	f.insertFreshLocked(segs)
	f.releaseScratch(segs)
	for _, e := range stale {
		if !e.uptodate() {
			f.zeroRange(e.addr(e.head()), e.pages()<<pageShift)
		}
		f.setFlagsLocked(e, flagUptodate|flagDirty)
	}
	return nil
}

// Mapping is a range of a memfd mapped by a guest: the folios of its pages
// inside the file, each pinned until no page of it is mapped. It is safe
// for concurrent use.
type Mapping struct {
	pages    uint64
	mayWrite bool

	mu sync.Mutex
	// f is the mapped file; the mapping holds a reference on it until
	// released.
	//
	// +checklocks:mu
	f *File
	// shared is MAP_SHARED (or MAP_SHARED_VALIDATE).
	//
	// +checklocks:mu
	shared bool
	// countedWritable is set while the mapping counts in
	// f.writableMaps (a shared writable mapping).
	//
	// +checklocks:mu
	countedWritable bool

	// first is the file page index of the mapping's first page.
	//
	// +checklocks:mu
	first uint64

	// runs are the mapping's folios, in runs of the page cache, in mapping
	// order.
	//
	// +checklocks:mu
	runs []mappedRun

	// mapped has a bit per page of the mapping that is still mapped and
	// has a folio.
	//
	// +checklocks:mu
	mapped []uint64
	// released is set once every pin is dropped.
	//
	// +checklocks:mu
	released bool
}

// mappedRun is a run of folios of a mapping: the folios of page-cache run
// r that hold a page of the mapping, which maps their pages [lo, hi) of
// the mapping (r may start before lo and end after hi: the mapping's ends
// need not be folio boundaries). Each folio is pinned (one memory-file
// reference) while a page of it in [lo, hi) is mapped.
type mappedRun struct {
	r      run
	lo, hi uint64
}

// mappedRunOf returns the folios of cache run r that hold a page of file
// pages [first, stop), as a run of a mapping that starts at page first.
func mappedRunOf(r run, first, stop uint64) mappedRun {
	i, j := uint64(0), r.n
	if first > r.head() {
		i = r.index(first)
	}
	if stop <= r.last {
		j = r.index(stop-1) + 1
	}
	c := r.slice(i, j)
	return mappedRun{r: c, lo: max(c.head(), first) - first, hi: min(c.last+1, stop) - first}
}

// pages returns mapping pages [lo, hi) of folio i of mr, for a mapping
// whose first page is file page first.
func (mr mappedRun) pages(i, first uint64) (lo, hi uint64) {
	e := mr.r.folio(i)
	return max(e.head(), first+mr.lo) - first, min(e.last+1, first+mr.hi) - first
}

// folioAt returns the number, in mr, of the folio that holds mapping page
// p.
func (mr mappedRun) folioAt(p, first uint64) uint64 { return mr.r.index(p + first) }

var _ vfs.Mapping = (*Mapping)(nil)

// Pages returns the mapping's length in pages.
func (m *Mapping) Pages() uint64 { return m.pages }

// MayWrite reports whether the mapping may ever be made writable (false for
// a shared mapping of a write-sealed file: VM_MAYWRITE cleared).
func (m *Mapping) MayWrite() bool { return m.mayWrite }

// Runs returns the runs of the memory file that back the mapping, in
// mapping order, adjacent runs merged.
func (m *Mapping) Runs() []abiguest.MmapRun {
	m.mu.Lock()
	defer m.mu.Unlock()
	var runs []abiguest.MmapRun
	for _, mr := range m.runs {
		r := abiguest.MmapRun{
			MapOffset:  mr.lo << pageShift,
			FileOffset: (mr.r.pfn() + mr.lo + m.first - mr.r.head()) << pageShift,
			Length:     (mr.hi - mr.lo) << pageShift,
		}
		if n := len(runs); n > 0 {
			last := &runs[n-1]
			if last.MapOffset+last.Length == r.MapOffset && last.FileOffset+last.Length == r.FileOffset {
				last.Length += r.Length
				continue
			}
		}
		runs = append(runs, r)
	}
	return runs
}

// Unmap drops pages [first, first+n) of the mapping (munmap of part of
// it); a folio is unpinned once none of its pages is mapped. Pages already
// unmapped are ignored. EINVAL if the range is outside the mapping.
func (m *Mapping) Unmap(first, n uint64) error {
	if first >= m.pages || n > m.pages-first {
		return unix.EINVAL
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unmapLocked(first, first+n)
	return nil
}

// +checklocks:m.mu
func (m *Mapping) unmapLocked(first, stop uint64) {
	if m.released {
		return
	}
	unpin := runBatch{apply: m.f.mf.DecRefRun}
	for _, mr := range m.runs {
		s, t := max(first, mr.lo), min(stop, mr.hi)
		if s >= t {
			continue
		}
		for i := mr.folioAt(s, m.first); i <= mr.folioAt(t-1, m.first); i++ {
			lo, hi := mr.pages(i, m.first)
			if !anyBits(m.mapped, lo, hi) {
				continue
			}
			clearBits(m.mapped, max(lo, s), min(hi, t))
			if !anyBits(m.mapped, lo, hi) {
				unpin.add(mr.r.folio(i).folio())
			}
		}
	}
	unpin.flush()
	for _, w := range m.mapped {
		if w != 0 {
			return
		}
	}
	m.releaseLocked()
}

// runBatch gathers folios to pin or unpin, so that folios that follow
// each other in the memory file are passed to apply as one run, under one
// lock of the memory file.
type runBatch struct {
	r     pgalloc.Run
	apply func(pgalloc.Run)
}

func (b *runBatch) add(fo pgalloc.Folio) {
	if b.r.Count > 0 && int(b.r.Order) == fo.Order && b.r.End() == fo.PFN && b.r.Count < maxRunFolios {
		b.r.Count++
		return
	}
	b.flush()
	b.r = pgalloc.Run{PFN: fo.PFN, Count: 1, Order: uint8(fo.Order)}
}

func (b *runBatch) flush() {
	if b.r.Count > 0 {
		b.apply(b.r)
		b.r = pgalloc.Run{}
	}
}

// +checklocks:m.mu
func (m *Mapping) releaseLocked() {
	if m.released {
		return
	}
	m.released = true
	if m.countedWritable {
		m.f.writableMaps.Add(-1)
	}
	m.f.DecRef()
}

// Release drops every pin left (munmap of the whole mapping, the guest
// exiting or exec'ing).
func (m *Mapping) Release() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unmapLocked(0, m.pages)
	m.releaseLocked()
}

// Clone returns a copy of the mapping with its own pins on the pages still
// mapped, as fork copies a process's mappings.
func (m *Mapping) Clone() vfs.Mapping {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := &Mapping{pages: m.pages, mayWrite: m.mayWrite}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.f, c.shared, c.released, c.first = m.f, m.shared, m.released, m.first
	c.mapped = append([]uint64(nil), m.mapped...)
	if m.released {
		return c
	}
	c.runs = append([]mappedRun(nil), m.runs...)
	pin := runBatch{apply: m.f.mf.IncRefRun}
	for _, mr := range c.runs {
		for i := range mr.r.n {
			if lo, hi := mr.pages(i, m.first); anyBits(m.mapped, lo, hi) {
				pin.add(mr.r.folio(i).folio())
			}
		}
	}
	pin.flush()
	m.f.IncRef()
	if m.countedWritable {
		m.f.writableMaps.Add(1)
		c.countedWritable = true
	}
	return c
}

// setBits sets bits [first, stop) of b.
func setBits(b []uint64, first, stop uint64) {
	for p := first; p < stop; {
		if p%64 == 0 && stop-p >= 64 {
			b[p/64] = ^uint64(0)
			p += 64
			continue
		}
		b[p/64] |= 1 << (p % 64)
		p++
	}
}

// clearBits clears bits [first, stop) of b.
func clearBits(b []uint64, first, stop uint64) {
	for p := first; p < stop; {
		if p%64 == 0 && stop-p >= 64 {
			b[p/64] = 0
			p += 64
			continue
		}
		b[p/64] &^= 1 << (p % 64)
		p++
	}
}

// anyBits reports whether a bit of [first, stop) of b is set.
func anyBits(b []uint64, first, stop uint64) bool {
	for p := first; p < stop; {
		if p%64 == 0 && stop-p >= 64 {
			if b[p/64] != 0 {
				return true
			}
			p += 64
			continue
		}
		if b[p/64]&(1<<(p%64)) != 0 {
			return true
		}
		p++
	}
	return false
}
