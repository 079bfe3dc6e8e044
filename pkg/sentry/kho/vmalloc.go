package kho

import (
	"fmt"
	"io"
	"math"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// Vmalloc is a buffer made of pages of the memory file that need not be
// contiguous, like a vmalloc area: 2^order-page blocks (order 0 for
// AllocVmalloc) seen as one byte range. It is how large metadata arrays
// (memfd's folio array) cross a restart without one large contiguous
// allocation. A Vmalloc is not safe for concurrent mutation.
type Vmalloc struct {
	mf     *pgalloc.MemoryFile
	blocks []pgalloc.Folio
	order  int
	size   uint64
	// carriedBy is the KHO of a carried handover this area was restored
	// from (see Ingest), nil otherwise: its blocks and its chunk pages
	// (kept in chunks) stay preserved until Free.
	carriedBy *KHO
	chunks    []pgalloc.Folio
}

// AllocVmalloc returns a zeroed Vmalloc of size bytes made of order-0 pages
// of mf. It fails with EINVAL for size 0 and with ENOMEM when mf is full
// (and then frees what it allocated). It mirrors vzalloc.
func AllocVmalloc(mf *pgalloc.MemoryFile, size uint64) (*Vmalloc, error) {
	if size == 0 {
		return nil, fmt.Errorf("kho: allocating a 0-byte vmalloc area: %w", unix.EINVAL)
	}
	n := (size + abikho.PageSize - 1) / abikho.PageSize
	if n > mf.Pages() {
		return nil, fmt.Errorf("kho: allocating a %d-byte vmalloc area in a %d-page memory file: %w", size, mf.Pages(), unix.ENOMEM)
	}
	v := &Vmalloc{mf: mf, blocks: make([]pgalloc.Folio, 0, n), size: size}
	// Up to 2 MiB of contiguous pages at a time where the memory file has
	// room, so that a reader walks the area in order (a GiB of 4 KiB
	// folios has 4 MiB of memfd folio records); a page at a time where it
	// has not.
	for i := uint64(0); i < n; {
		if r, err := mf.AllocatePages(min(n-i, 1<<9)); err == nil {
			for j := range uint64(r.Count) {
				v.blocks = append(v.blocks, r.Folio(j))
			}
			i += uint64(r.Count)
			continue
		}
		f, err := mf.Allocate(0)
		if err != nil {
			v.Free()
			return nil, fmt.Errorf("kho: allocating page %d of a %d-byte vmalloc area: %w", i, size, err)
		}
		v.blocks = append(v.blocks, f)
		i++
	}
	return v, nil
}

// Len returns the size of v in bytes: the size asked of AllocVmalloc, or
// total_pages pages for a restored area (kho_vmalloc records no byte size).
func (v *Vmalloc) Len() uint64 { return v.size }

// Order returns the order of v's blocks.
func (v *Vmalloc) Order() int { return v.order }

// Blocks returns v's blocks in order. The slice must not be modified.
func (v *Vmalloc) Blocks() []pgalloc.Folio { return v.blocks }

// Page returns a zero-copy view of page i of v.
//
// Preconditions:
//   - 0 <= i < number of pages of v.
func (v *Vmalloc) Page(i int) []byte {
	b := v.mf.Bytes(v.blocks[i>>v.order])
	off := (i & (1<<v.order - 1)) * abikho.PageSize
	return b[off : off+abikho.PageSize : off+abikho.PageSize]
}

// ReadPages copies pages [i, i+len(p)/PageSize) of v into p with
// pread(2) on the memory file, one call per run of blocks that are
// contiguous in it (pgalloc.MemoryFile.ReadPages), not through this
// process's mapping: the first touch of a page through a mapping costs a
// page-table fill per 4 KiB page, which on a virtual machine that shadows
// its guests' page tables is microseconds each, even after a populate.
// A restored folio array is read once, so the kernel's copy is the cheaper
// one.
//
// Preconditions:
//   - len(p) is a whole number of pages;
//   - 0 <= i and i+len(p)/PageSize <= the number of pages of v.
func (v *Vmalloc) ReadPages(i int, p []byte) error {
	bpages := 1 << v.order
	for len(p) > 0 {
		b := v.blocks[i>>v.order]
		pfn := b.PFN + uint64(i&(bpages-1))
		// Extend over the blocks that follow this one in the file.
		n := bpages - i&(bpages-1)
		for k := i>>v.order + 1; n*abikho.PageSize < len(p) && k < len(v.blocks) && v.blocks[k].PFN == pfn+uint64(n); k++ {
			n += bpages
		}
		n = min(n, len(p)/abikho.PageSize)
		if err := v.mf.ReadPages(pfn, p[:n*abikho.PageSize]); err != nil {
			return err
		}
		p, i = p[n*abikho.PageSize:], i+n
	}
	return nil
}

// ReadAt implements io.ReaderAt over the first Len bytes of v.
func (v *Vmalloc) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("kho: vmalloc read at offset %d: %w", off, unix.EINVAL)
	}
	if uint64(off) >= v.size {
		return 0, io.EOF
	}
	n := v.copy(p, uint64(off), false)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt implements io.WriterAt over the first Len bytes of v; v does not
// grow, so a write past Len is short and fails with EFBIG.
func (v *Vmalloc) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("kho: vmalloc write at offset %d: %w", off, unix.EINVAL)
	}
	n := 0
	if uint64(off) < v.size {
		n = v.copy(p, uint64(off), true)
	}
	if n < len(p) {
		return n, fmt.Errorf("kho: vmalloc write of %d bytes at %d past its %d bytes: %w", len(p), off, v.size, unix.EFBIG)
	}
	return n, nil
}

// copy moves bytes between p and v from off, up to Len, and returns how many.
func (v *Vmalloc) copy(p []byte, off uint64, write bool) int {
	n := 0
	bsize := uint64(abikho.PageSize) << v.order
	for len(p) > 0 && off < v.size {
		b := v.mf.Bytes(v.blocks[off/bsize])
		lo := off % bsize
		hi := min(bsize, lo+(v.size-off))
		var c int
		if write {
			c = copy(b[lo:hi], p)
		} else {
			c = copy(p, b[lo:hi])
		}
		n += c
		p = p[c:]
		off += uint64(c)
	}
	return n
}

// Free drops the reference on every block of v (after UnpreserveVmalloc, or
// once a restored area has been read). An area restored from a carried
// handover also lets go of its chunk pages, and its blocks and chunk pages
// stop being preserved (KHO.ReleaseRestored). v must not be used
// afterwards.
func (v *Vmalloc) Free() {
	if v.carriedBy != nil {
		v.carriedBy.ReleaseRestored(append(v.blocks, v.chunks...)...)
	} else {
		for _, f := range v.blocks {
			v.mf.DecRef(f)
		}
	}
	v.blocks, v.chunks = nil, nil
	v.size = 0
}

// PreserveVmalloc preserves v for the next sentry and returns its
// descriptor: every block of v is preserved, and their addresses are listed
// in chunk pages (allocated, zeroed and preserved here) of
// abikho.VmallocChunkSlots zero-terminated slots linked by their first word.
// On failure it undoes everything and returns the error (EBUSY after
// Finalize, ENOMEM when the file is full, E2BIG beyond 2^32-1 pages). It
// mirrors kho_preserve_vmalloc.
func (k *KHO) PreserveVmalloc(v *Vmalloc) (abikho.Vmalloc, error) {
	total := uint64(len(v.blocks)) << v.order
	if total == 0 {
		return abikho.Vmalloc{}, fmt.Errorf("kho: preserving an empty vmalloc area: %w", unix.EINVAL)
	}
	if total > math.MaxUint32 {
		return abikho.Vmalloc{}, fmt.Errorf("kho: preserving a vmalloc area of %d pages: total_pages is 32 bits: %w", total, unix.E2BIG)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return abikho.Vmalloc{}, err
	}
	desc := abikho.Vmalloc{TotalPages: uint32(total), Flags: abikho.VmallocAlloc, Order: uint16(v.order)}
	if v.order > 0 {
		desc.Flags |= abikho.VmallocHugeVmap
	}
	var chunks []pgalloc.Folio
	var chunk []byte
	slot := abikho.VmallocChunkSlots
	for i, f := range v.blocks {
		if slot == abikho.VmallocChunkSlots {
			c, err := k.allocPreserveLocked(abikho.PageSize)
			if err != nil {
				k.undoPreserveVmallocLocked(v.blocks[:i], chunks)
				return abikho.Vmalloc{}, fmt.Errorf("kho: allocating a vmalloc chunk page: %w", err)
			}
			if chunk == nil {
				desc.First = c.Addr()
			} else {
				abikho.SetVmallocChunkNext(chunk, c.Addr())
			}
			chunks = append(chunks, c)
			chunk, slot = k.mf.Bytes(c), 0
		}
		if err := k.setLocked(f.PFN, f.Order); err != nil {
			k.undoPreserveVmallocLocked(v.blocks[:i], chunks)
			return abikho.Vmalloc{}, fmt.Errorf("kho: preserving vmalloc block %d: %w", i, err)
		}
		abikho.SetVmallocChunkPhys(chunk, slot, f.Addr())
		slot++
	}
	return desc, nil
}

// undoPreserveVmallocLocked unpreserves blocks and unpreserves and frees
// chunks, for a PreserveVmalloc that failed.
//
// +checklocks:k.mu
func (k *KHO) undoPreserveVmallocLocked(blocks, chunks []pgalloc.Folio) {
	for _, f := range blocks {
		k.out.tree.clear(f.PFN, f.Order)
	}
	for _, c := range chunks {
		k.unpreserveFreeLocked(c)
	}
}

// walkVmalloc visits the chunk chain of desc: fn gets each chunk's address
// and a copy of its slots up to the zero terminator. It checks each chunk
// address (non-zero, page-aligned, inside the file, no loop) and stops at
// the first error from the walk or from fn.
func walkVmalloc(mf *pgalloc.MemoryFile, desc abikho.Vmalloc, fn func(chunk uint64, phys []uint64) error) error {
	visited := make(map[uint64]struct{})
	var page [abikho.PageSize]byte
	phys := make([]uint64, 0, abikho.VmallocChunkSlots)
	from := "first"
	for addr := desc.First; ; {
		if _, ok := visited[addr]; ok {
			return fmt.Errorf("vmalloc chunk at %#x (%s): the chunk list loops back to an earlier chunk: %w", addr, from, unix.EINVAL)
		}
		visited[addr] = struct{}{}
		if err := readPage(mf, addr, page[:]); err != nil {
			return fmt.Errorf("vmalloc chunk (%s): %w", from, err)
		}
		phys = phys[:0]
		for i := 0; i < abikho.VmallocChunkSlots; i++ {
			p := abikho.VmallocChunkPhys(page[:], i)
			if p == 0 {
				break
			}
			phys = append(phys, p)
		}
		if err := fn(addr, phys); err != nil {
			return err
		}
		next := abikho.VmallocChunkNext(page[:])
		if next == 0 {
			return nil
		}
		from = fmt.Sprintf("next of chunk %#x", addr)
		addr = next
	}
}

// checkVmallocDesc checks the fields of desc that need no memory access.
func checkVmallocDesc(desc abikho.Vmalloc) error {
	switch {
	case desc.First == 0:
		return fmt.Errorf("kho_vmalloc: first is 0: %w", unix.EINVAL)
	case desc.TotalPages == 0:
		return fmt.Errorf("kho_vmalloc at %#x: total_pages is 0: %w", desc.First, unix.EINVAL)
	case desc.Flags&^abikho.VmallocFlagsMask != 0:
		return fmt.Errorf("kho_vmalloc at %#x: unknown flags %#x: %w", desc.First, desc.Flags&^abikho.VmallocFlagsMask, unix.EINVAL)
	case desc.Order > pgalloc.MaxOrder:
		return fmt.Errorf("kho_vmalloc at %#x: order %d above %d: %w", desc.First, desc.Order, pgalloc.MaxOrder, unix.EINVAL)
	}
	return nil
}

// UnpreserveVmalloc undoes PreserveVmalloc: it unpreserves every block and
// chunk page desc lists and frees the chunk pages; v itself stays allocated
// (Free it if it is no longer needed). It checks the whole chain first and
// changes nothing if a chunk or block is not preserved as PreserveVmalloc
// left it (ENOENT) or the descriptor is malformed (EINVAL); EBUSY after
// Finalize. It mirrors kho_unpreserve_vmalloc.
func (k *KHO) UnpreserveVmalloc(desc abikho.Vmalloc) error {
	if err := checkVmallocDesc(desc); err != nil {
		return fmt.Errorf("kho: unpreserving vmalloc: %w", err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.checkMutableLocked(); err != nil {
		return err
	}
	order := int(desc.Order)
	var chunks, blocks []pgalloc.Folio
	t := &k.out.tree
	err := walkVmalloc(k.mf, desc, func(c uint64, phys []uint64) error {
		cf := pgalloc.Folio{PFN: c >> abikho.PageShift}
		if got, _, ok := k.mf.Lookup(cf.PFN); !ok || got != cf || !t.test(cf.PFN, 0) {
			return fmt.Errorf("vmalloc chunk at %#x: not a preserved, allocated page: %w", c, unix.ENOENT)
		}
		chunks = append(chunks, cf)
		for _, p := range phys {
			if p%abikho.PageSize != 0 || !t.test(p>>abikho.PageShift, order) {
				return fmt.Errorf("vmalloc chunk at %#x: block at %#x is not preserved with order %d: %w", c, p, order, unix.ENOENT)
			}
			blocks = append(blocks, pgalloc.Folio{PFN: p >> abikho.PageShift, Order: order})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("kho: unpreserving vmalloc: %w", err)
	}
	for _, b := range blocks {
		t.clear(b.PFN, b.Order)
	}
	for _, c := range chunks {
		k.unpreserveFreeLocked(c)
	}
	return nil
}

// RestoreVmalloc restores the area desc describes, preserved by the previous
// sentry: it walks the chunk chain, restores every block (which must be a
// preserved, unrestored block of desc's order) and restores and frees every
// chunk page (from a carried handover the chunk pages are freed with the
// area, see Free). The number of pages must equal total_pages. It checks
// everything before it restores anything: on any error (EINVAL, naming the
// field and address) nothing is restored. It mirrors kho_restore_vmalloc.
func (k *KHO) RestoreVmalloc(desc abikho.Vmalloc) (*Vmalloc, error) {
	if err := checkVmallocDesc(desc); err != nil {
		return nil, fmt.Errorf("kho: restoring vmalloc: %w", err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.in == nil {
		return nil, fmt.Errorf("kho: restoring vmalloc at %#x: no incoming handover: %w", desc.First, unix.EINVAL)
	}
	order := int(desc.Order)
	var chunks, blocks []pgalloc.Folio
	mem := &k.in.mem
	// Bits are cleared as the walk goes, so that a block or chunk listed
	// twice fails; on error they are set again.
	var count uint64
	err := walkVmalloc(k.mf, desc, func(c uint64, phys []uint64) error {
		if !mem.clear(c>>abikho.PageShift, 0) {
			return fmt.Errorf("vmalloc chunk at %#x: not a preserved order-0 page, or already restored: %w", c, unix.EINVAL)
		}
		chunks = append(chunks, pgalloc.Folio{PFN: c >> abikho.PageShift})
		for i, p := range phys {
			if count += 1 << order; count > uint64(desc.TotalPages) {
				return fmt.Errorf("vmalloc chunk at %#x, slot %d: more pages than total_pages %d: %w", c, i, desc.TotalPages, unix.EINVAL)
			}
			pfn := p >> abikho.PageShift
			if p%abikho.PageSize != 0 || pfn&(1<<order-1) != 0 || !mem.clear(pfn, order) {
				return fmt.Errorf("vmalloc chunk at %#x, slot %d: block at %#x is not a preserved block of order %d, or already restored: %w", c, i, p, order, unix.EINVAL)
			}
			blocks = append(blocks, pgalloc.Folio{PFN: pfn, Order: order})
		}
		return nil
	})
	if err == nil && count != uint64(desc.TotalPages) {
		err = fmt.Errorf("kho_vmalloc at %#x: chunks list %d pages, total_pages is %d: %w", desc.First, count, desc.TotalPages, unix.EINVAL)
	}
	if err != nil {
		for _, f := range append(blocks, chunks...) {
			mem.unclear(f.PFN, f.Order)
		}
		return nil, fmt.Errorf("kho: restoring vmalloc: %w", err)
	}
	v := &Vmalloc{mf: k.mf, blocks: blocks, order: order, size: count << abikho.PageShift}
	if k.carried {
		// The chunks stay, preserved, as long as the area: a carried
		// record may name it until its owner frees it.
		v.carriedBy, v.chunks = k, chunks
		return v, nil
	}
	for _, c := range chunks {
		k.mf.DecRef(c)
	}
	return v, nil
}
