package memfd

import (
	"fmt"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// CacheFolio is a folio of a memfd's page cache, as LUO preserves it.
type CacheFolio struct {
	// Index is the page index of the folio's first page in the file.
	Index uint64
	// Folio is the folio in the memory file.
	Folio pgalloc.Folio
	// Dirty is PG_dirty: the folio was written (or allocated by fallocate)
	// since it was created.
	Dirty bool
	// Uptodate is PG_uptodate: the folio's contents are initialised. A
	// folio fallocate allocated and nothing wrote is not uptodate and reads
	// as zeros.
	Uptodate bool
}

func (c CacheFolio) flags() uint64 {
	var fl uint64
	if c.Dirty {
		fl |= flagDirty
	}
	if c.Uptodate {
		fl |= flagUptodate
	}
	return fl
}

func cacheFolio(e entry) CacheFolio {
	return CacheFolio{Index: e.head(), Folio: e.folio(), Dirty: e.dirty(), Uptodate: e.uptodate()}
}

// CacheRun is a run of folios of a memfd's page cache, as PinFolios
// returns them: Run.Count folios of one order and the same flags, at
// consecutive page indices from Index and next to each other in the memory
// file.
type CacheRun struct {
	// Index is the page index of the run's first page in the file.
	Index uint64
	// Run is the run's folios in the memory file.
	Run pgalloc.Run
	// Dirty and Uptodate are the flags of every folio of the run.
	Dirty, Uptodate bool
}

// Folio returns folio i of c.
//
// Preconditions:
//   - i < c.Run.Count.
func (c CacheRun) Folio(i uint64) CacheFolio {
	fo := c.Run.Folio(i)
	return CacheFolio{Index: c.Index + i*fo.Pages(), Folio: fo, Dirty: c.Dirty, Uptodate: c.Uptodate}
}

func cacheRun(r run) CacheRun {
	return CacheRun{Index: r.head(), Run: r.pg(), Dirty: r.flags()&flagDirty != 0, Uptodate: r.flags()&flagUptodate != 0}
}

// PinFolios pins every folio of [0, size) in index order, like
// memfd_pin_folios over the whole file, and returns them in runs: holes
// get new zeroed folios, uptodate and clean, inserted into the page cache
// (order 9 for an aligned 2 MiB block with nothing cached, order 0
// elsewhere), and each folio returned holds an extra memory-file reference
// until UnpinFolios. A file of size 0 has none. If the memory file cannot
// hold the holes, PinFolios fails with ENOMEM and changes nothing (Linux
// would leave the holes it had filled in the page cache). An MFD_HUGETLB
// file has no folios to pin (EINVAL).
//
// Preconditions:
//   - f.Lock is held.
//
// +checklocks:f.mu
func (f *File) PinFolios() ([]CacheRun, error) {
	if f.hugetlb {
		return nil, unix.EINVAL
	}
	size := uint64(f.size.Load())
	if size == 0 {
		f.pins.Add(1)
		return nil, nil
	}
	stop := (size + pageSize - 1) >> pageShift
	if stop > f.mf.Pages()+f.nrPages {
		return nil, unix.ENOMEM // It cannot fit; do not try.
	}
	// The holes first, then the runs.
	segs := f.scratch[:0]
	var allocErr error
	idx := uint64(0)
	huge := func(uint64) bool { return true }
	f.ascendRunsLocked(0, stop-1, func(r run) bool {
		if h := r.head(); idx < h {
			if segs, allocErr = f.allocHole(idx, h, huge, flagUptodate, segs); allocErr != nil {
				return false
			}
		}
		idx = r.last + 1
		return true
	})
	if allocErr == nil && idx < stop {
		segs, allocErr = f.allocHole(idx, stop, huge, flagUptodate, segs)
	}
	if allocErr != nil {
		f.freeFresh(segs)
		f.releaseScratch(segs)
		return nil, allocErr
	}
	f.insertFreshLocked(segs)
	f.releaseScratch(segs)
	var out []CacheRun
	f.ascendRunsLocked(0, stop-1, func(r run) bool {
		if r.last >= stop {
			r = r.slice(0, r.index(stop-1)+1)
		}
		out = append(out, cacheRun(r))
		return true
	})
	for _, c := range out {
		f.mf.IncRefRun(c.Run)
	}
	f.pins.Add(1)
	return out, nil
}

// UnpinFolios drops the references PinFolios took on rs.
func (f *File) UnpinFolios(rs []CacheRun) {
	for _, c := range rs {
		f.mf.DecRefRun(c.Run)
	}
	if f.pins.Add(-1) < 0 {
		panic("memfd: UnpinFolios without PinFolios")
	}
}

// NewFromFolios builds the memfd LUO retrieves: a fresh memfd created as by
// memfd_alloc_file("", 0) (name "memfd:", mode 0777, seals F_SEAL_SEAL),
// with i_size = size and f_pos = pos, and each folio of fs inserted into its
// page cache at its Index with its Dirty and Uptodate flags. The file takes
// over the caller's reference on every folio and holds one reference
// itself.
//
// The folios come from the previous sentry and are checked one by one: fs
// must be in increasing index order without overlaps, each folio's order at
// most pgalloc.MaxOrder and its index aligned to its order, and each must
// start before size. size and pos must be in [0, MaxFileSize]. Anything else
// fails with an error wrapping EINVAL that names the field and the folio,
// and then the caller keeps every reference it had.
func NewFromFolios(mf *pgalloc.MemoryFile, size, pos int64, fs []CacheFolio) (*File, error) {
	if size < 0 {
		return nil, fmt.Errorf("memfd size %d: negative: %w", size, unix.EINVAL)
	}
	if pos < 0 {
		return nil, fmt.Errorf("memfd position %d: negative: %w", pos, unix.EINVAL)
	}
	var b cacheBuilder
	for i, c := range fs {
		if err := b.add(i, c, uint64(size)); err != nil {
			return nil, err
		}
	}
	return b.file(mf, size, pos), nil
}

// cacheBuilder builds the page cache of a file NewFromFolios or a retrieve
// makes, from folios given in index order, in runs.
type cacheBuilder struct {
	runs []run
	next uint64
}

// add checks folio c, the i-th, as NewFromFolios describes, for a file of
// size bytes, and appends it.
func (b *cacheBuilder) add(i int, c CacheFolio, size uint64) error {
	fo := c.Folio
	if fo.Order < 0 || fo.Order > pgalloc.MaxOrder {
		return fmt.Errorf("memfd folio %d (index %#x, pfn %#x): order %d outside [0, %d]: %w", i, c.Index, fo.PFN, fo.Order, pgalloc.MaxOrder, unix.EINVAL)
	}
	if c.Index&(fo.Pages()-1) != 0 {
		return fmt.Errorf("memfd folio %d (index %#x, pfn %#x): index not aligned to order %d: %w", i, c.Index, fo.PFN, fo.Order, unix.EINVAL)
	}
	if fo.PFN == 0 || fo.PFN > pfnMask {
		return fmt.Errorf("memfd folio %d (index %#x, pfn %#x): pfn is 0 or too large: %w", i, c.Index, fo.PFN, unix.EINVAL)
	}
	if i > 0 && c.Index < b.next {
		return fmt.Errorf("memfd folio %d (index %#x, pfn %#x): overlaps or precedes the folio before it (which ends at index %#x): %w", i, c.Index, fo.PFN, b.next, unix.EINVAL)
	}
	if c.Index > maxIndex || c.Index<<pageShift >= size {
		return fmt.Errorf("memfd folio %d (index %#x, pfn %#x): starts at or beyond the file size %d: %w", i, c.Index, fo.PFN, size, unix.EINVAL)
	}
	b.next = c.Index + fo.Pages()
	r := runOf(makeEntry(c.Index, fo, c.flags()))
	if n := len(b.runs); n > 0 && b.runs[n-1].joins(r) {
		b.runs[n-1].last = r.last
		b.runs[n-1].n++
		return nil
	}
	b.runs = append(b.runs, r)
	return nil
}

// addRun is add for the n folios of c's order that follow c in the memory
// file and in the file, the first of them the i-th: checked and appended as
// one run where it can, else one by one.
func (b *cacheBuilder) addRun(i int, c CacheFolio, n, size uint64) error {
	fo, step := c.Folio, c.Folio.Pages()
	lastIndex, lastPFN := c.Index+(n-1)*step, fo.PFN+(n-1)*step
	if n == 1 || fo.Order < 0 || fo.Order > pgalloc.MaxOrder || c.Index&(step-1) != 0 || fo.PFN == 0 || lastPFN > pfnMask ||
		i > 0 && c.Index < b.next || lastIndex > maxIndex || lastIndex<<pageShift >= size {
		for x := range n {
			cx := c
			cx.Index, cx.Folio.PFN = c.Index+x*step, fo.PFN+x*step
			if err := b.add(i+int(x), cx, size); err != nil {
				return err
			}
		}
		return nil
	}
	if err := b.add(i, c, size); err != nil {
		return err
	}
	r := &b.runs[len(b.runs)-1]
	extra := min(n-1, maxRunFolios-r.n)
	r.last += extra * step
	r.n += extra
	b.next = lastIndex + step
	if rest := n - 1 - extra; rest > 0 {
		first := run{last: lastIndex + step - 1, val: (fo.PFN + (extra+1)*step) | uint64(fo.Order)<<orderShift | c.flags(), n: rest}
		b.runs = append(b.runs, first)
	}
	return nil
}

// file returns the memfd NewFromFolios describes, with the folios added.
func (b *cacheBuilder) file(mf *pgalloc.MemoryFile, size, pos int64) *File {
	f := newFile(mf, "", unix.F_SEAL_SEAL)
	f.size.Store(size)
	f.pos.Store(pos)
	f.mu.Lock()
	for _, r := range b.runs {
		f.cache.ReplaceOrInsert(r)
		f.nrPages += r.pages()
	}
	f.mu.Unlock()
	return f
}
