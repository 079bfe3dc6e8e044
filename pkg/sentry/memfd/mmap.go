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
		// At most one folio per page, and no more than the cache holds.
		fs := make([]mappedFolio, 0, min(stop-first, uint64(f.cache.Len())))
		// One pass when the range needs no fill (every page has a folio,
		// uptodate and dirty, as a retrieved file's have), else a fill
		// and a second pass.
		idx, filled := first, true
		f.ascendLocked(first, stop-1, func(e entry) bool {
			if e.head() > idx || !e.uptodate() || !e.dirty() {
				filled = false
				return false
			}
			fs = append(fs, mappedFolioOf(e, first, stop))
			idx = e.last + 1
			return true
		})
		if !filled || idx < stop {
			if err := f.fillLocked(first, stop); err != nil {
				return nil, err
			}
			fs = fs[:0]
			f.ascendLocked(first, stop-1, func(e entry) bool {
				fs = append(fs, mappedFolioOf(e, first, stop))
				return true
			})
		}
		m.mu.Lock()
		m.folios = fs
		m.mu.Unlock()
	}
	m.mu.Lock()
	m.mapped = make([]uint64, (pages+63)/64)
	pins := make([]pgalloc.Folio, len(m.folios))
	for i, mf := range m.folios {
		setBits(m.mapped, mf.first, mf.first+mf.pages)
		pins[i] = mf.folio
	}
	f.mf.IncRefs(pins)
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
	for _, s := range segs {
		f.insertLocked(s.e)
	}
	f.releaseScratch(segs)
	for _, e := range stale {
		if !e.uptodate() {
			f.zeroRange(e.addr(e.head()), e.pages()<<pageShift)
		}
		f.cache.ReplaceOrInsert(e.withFlags(flagUptodate | flagDirty))
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

	// folios are the mapping's folios in mapping order; runs are derived
	// from them.
	//
	// +checklocks:mu
	folios []mappedFolio

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

// mappedFolio is a folio of a mapping: pages [first, first+pages) of the
// mapping are its pages from page skip on.
type mappedFolio struct {
	folio pgalloc.Folio
	first uint64
	pages uint64
	skip  uint64
	// live is the number of those pages still mapped.
	live uint64
}

// mappedFolioOf returns the part of cache entry e inside file pages
// [first, stop), as a folio of a mapping that starts at page first.
func mappedFolioOf(e entry, first, stop uint64) mappedFolio {
	h := max(e.head(), first)
	t := min(e.last+1, stop)
	n := t - h
	return mappedFolio{folio: e.folio(), first: h - first, pages: n, skip: h - e.head(), live: n}
}

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
	for _, mf := range m.folios {
		r := abiguest.MmapRun{
			MapOffset:  mf.first << pageShift,
			FileOffset: (mf.folio.PFN + mf.skip) << pageShift,
			Length:     mf.pages << pageShift,
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
	for i := range m.folios {
		mf := &m.folios[i]
		s, t := max(first, mf.first), min(stop, mf.first+mf.pages)
		for p := s; p < t; p++ {
			if m.mapped[p/64]&(1<<(p%64)) == 0 {
				continue
			}
			m.mapped[p/64] &^= 1 << (p % 64)
			mf.live--
			if mf.live == 0 {
				m.f.mf.DecRef(mf.folio)
			}
		}
	}
	for _, w := range m.mapped {
		if w != 0 {
			return
		}
	}
	m.releaseLocked()
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
	c.f, c.shared, c.released = m.f, m.shared, m.released
	c.mapped = append([]uint64(nil), m.mapped...)
	if m.released {
		return c
	}
	c.folios = append([]mappedFolio(nil), m.folios...)
	for _, mf := range c.folios {
		if mf.live > 0 {
			m.f.mf.IncRef(mf.folio)
		}
	}
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
