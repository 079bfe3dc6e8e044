package kho

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"slices"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// Finalize writes the preserved-memory map into the memory file, for the
// next sentry: every non-empty bitmap is copied into a page of the file and
// listed in a chain of khoser_mem_chunk pages (one or more per order), and
// the root's preserved-memory-map is set to the first chunk. Chunk and
// bitmap pages are ordinary allocated pages, not preserved: the next sentry
// reads them before it adopts, and then they are free. Finalize costs time
// in proportion to the bitmap pages, not to the preserved memory.
//
// After Finalize the map cannot change (preserving or unpreserving fails
// with EBUSY) until Abort. Finalize may be repeated; a repeat frees the
// previous chunk list (kho_update_memory_map). It fails with ENOMEM if the
// file has no room for the map, leaving the previous state. It mirrors
// kho_finalize and kho_mem_serialize.
//
// From a successful Finalize on, the memory file belongs to the next
// sentry, which regards every page this one did not preserve as stale and
// may reuse it: Finalize holds the memory file's releases
// (pgalloc.HoldReleases) so that nothing this sentry frees afterwards is
// punched out, and Abort resumes them.
func (k *KHO) Finalize() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	pages, first, err := k.serializeLocked()
	if err != nil {
		return err
	}
	old := k.out.mapPages
	prevMap := k.out.memMap
	k.out.mapPages, k.out.memMap = pages, first
	if err := k.writeRootLocked(); err != nil {
		k.out.mapPages, k.out.memMap = old, prevMap
		k.freePagesLocked(pages)
		return err
	}
	k.out.finalized = true
	k.freePagesLocked(old)
	k.mf.HoldReleases()
	return nil
}

// Abort discards the map written by Finalize, for a restart that is rolled
// back: it frees the chunk and bitmap pages, sets preserved-memory-map back
// to 0 and makes the map mutable again. Aborting when not finalized does
// nothing. (v6.16's KEXEC_KHO_ABORT; v6.19 has no abort.)
func (k *KHO) Abort() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.out.finalized {
		return nil
	}
	old := k.out.mapPages
	k.out.mapPages, k.out.memMap, k.out.finalized = nil, 0, false
	if err := k.writeRootLocked(); err != nil {
		return err
	}
	k.freePagesLocked(old)
	k.mf.ResumeReleases()
	return nil
}

// Preconditions: k.mu is locked.
func (k *KHO) freePagesLocked(pages []pgalloc.Folio) {
	for _, p := range pages {
		k.mf.DecRef(p)
	}
}

// serializeLocked writes the map (kho_mem_serialize) and returns the pages
// it allocated and the address of the first chunk.
//
// Preconditions: k.mu is locked.
func (k *KHO) serializeLocked() (pages []pgalloc.Folio, first uint64, err error) {
	alloc := func() ([]byte, uint64, error) {
		f, err := k.mf.Allocate(0)
		if err != nil {
			return nil, 0, fmt.Errorf("kho: allocating a page for the preserved-memory map: %w", err)
		}
		pages = append(pages, f)
		return k.mf.Bytes(f), f.Addr(), nil
	}
	var chunk []byte
	var hdr abikho.MemChunkHdr
	// newChunk starts a chunk for order and links it after the current one
	// (new_chunk).
	newChunk := func(order int) error {
		c, addr, err := alloc()
		if err != nil {
			return err
		}
		if chunk == nil {
			first = addr
		} else {
			hdr.Next = addr
			hdr.Encode(chunk)
		}
		chunk, hdr = c, abikho.MemChunkHdr{Order: uint32(order)}
		return nil
	}
	for o, bms := range k.out.mem.orders {
		orderStarted := false
		for idx, b := range bms {
			if b == nil || *b == (bitmap{}) {
				continue
			}
			if !orderStarted || hdr.NumElms == abikho.MemChunkCapacity {
				if err := newChunk(o); err != nil {
					k.freePagesLocked(pages)
					return nil, 0, err
				}
				orderStarted = true
			}
			page, addr, err := alloc()
			if err != nil {
				k.freePagesLocked(pages)
				return nil, 0, err
			}
			for w, word := range b {
				binary.LittleEndian.PutUint64(page[8*w:], word)
			}
			ptr := abikho.MemBitmapPtr{
				PhysStart: uint64(idx) * abikho.PreserveBits << (o + abikho.PageShift),
				Bitmap:    addr,
			}
			ptr.Encode(chunk[abikho.MemChunkBitmapOffset(int(hdr.NumElms)):])
			hdr.NumElms++
		}
	}
	if chunk != nil {
		hdr.Encode(chunk)
	}
	return pages, first, nil
}

// deserialize reads and validates the handover at root in mf
// (kho_populate + kho_mem_deserialize) and returns the incoming state and
// the preserved blocks in address order, as runs. It changes nothing in mf, and it
// copies every page it reads before it interprets it.
func deserialize(mf *pgalloc.MemoryFile, root uint64) (*incoming, []pgalloc.Run, error) {
	var page [abikho.PageSize]byte
	if err := readPage(mf, root, page[:]); err != nil {
		return nil, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	tree, err := fdt.Parse(page[:], abikho.PageSize)
	if err != nil {
		return nil, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	h, _ := fdt.DecodeHeader(page[:])
	in := &incoming{root: bytes.Clone(page[:h.TotalSize]), tree: tree}
	compat, err := tree.String(abikho.PropCompatible)
	if err != nil {
		return nil, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	if compat != abikho.Compatible {
		return nil, nil, fmt.Errorf("root FDT at %#x: compatible %q, but this sentry reads only %q: %w", root, compat, abikho.Compatible, unix.EINVAL)
	}
	memMap, err := tree.U64(abikho.PropPreservedMemoryMap)
	if err != nil {
		return nil, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	if memMap == 0 {
		return nil, nil, fmt.Errorf("root FDT at %#x: %s is 0 (the map was not finalized): %w", root, abikho.PropPreservedMemoryMap, unix.EINVAL)
	}
	in.mem = newMemTracker(mf.Pages())
	if err := readMap(mf, memMap, &in.mem); err != nil {
		return nil, nil, err
	}
	if !in.mem.test(root>>abikho.PageShift, 0) {
		return nil, nil, fmt.Errorf("root FDT at %#x: the root page is not preserved as an order-0 block: %w", root, unix.EINVAL)
	}
	return in, in.mem.runs(), nil
}

// readPage copies the page at the byte address addr of mf into p.
func readPage(mf *pgalloc.MemoryFile, addr uint64, p []byte) error {
	if addr == 0 || addr%abikho.PageSize != 0 {
		return fmt.Errorf("address %#x is not a non-zero, page-aligned address: %w", addr, unix.EINVAL)
	}
	b, err := mf.Slice(addr>>abikho.PageShift, 1)
	if err != nil {
		return fmt.Errorf("address %#x: %w", addr, err)
	}
	copy(p, b)
	return nil
}

// readMap walks the chain of map chunks that starts at memMap and loads
// every bitmap it lists into t, checking each field.
func readMap(mf *pgalloc.MemoryFile, memMap uint64, t *memTracker) error {
	pages := mf.Pages()
	visited := make(map[uint64]struct{})
	var chunk [abikho.PageSize]byte
	var bm [abikho.PageSize]byte
	from := abikho.PropPreservedMemoryMap
	for addr := memMap; addr != 0; {
		if _, ok := visited[addr]; ok {
			return fmt.Errorf("map chunk at %#x (%s): the chunk list loops back to an earlier chunk: %w", addr, from, unix.EINVAL)
		}
		visited[addr] = struct{}{}
		if err := readPage(mf, addr, chunk[:]); err != nil {
			return fmt.Errorf("map chunk (%s): %w", from, err)
		}
		var hdr abikho.MemChunkHdr
		hdr.Decode(chunk[:])
		if hdr.Order > pgalloc.MaxOrder {
			return fmt.Errorf("map chunk at %#x: order %d above %d: %w", addr, hdr.Order, pgalloc.MaxOrder, unix.EINVAL)
		}
		if hdr.NumElms > abikho.MemChunkCapacity {
			return fmt.Errorf("map chunk at %#x: num_elms %d above the capacity of %d: %w", addr, hdr.NumElms, abikho.MemChunkCapacity, unix.EINVAL)
		}
		// kho_mem_serialize never writes an empty chunk. Refusing them
		// bounds the walk: every chunk adds a bitmap, and a bitmap
		// listed twice is refused below.
		if hdr.NumElms == 0 {
			return fmt.Errorf("map chunk at %#x (%s): num_elms 0: %w", addr, from, unix.EINVAL)
		}
		order := int(hdr.Order)
		span := uint64(abikho.PreserveBits) << (order + abikho.PageShift)
		for i := 0; i < int(hdr.NumElms); i++ {
			var ptr abikho.MemBitmapPtr
			ptr.Decode(chunk[abikho.MemChunkBitmapOffset(i):])
			if ptr.PhysStart%span != 0 || ptr.PhysStart >= pages<<abikho.PageShift {
				return fmt.Errorf("map chunk at %#x, bitmap %d: phys_start %#x is not a multiple of %#x inside the %d-page memory file: %w", addr, i, ptr.PhysStart, span, pages, unix.EINVAL)
			}
			idx := ptr.PhysStart / span
			if t.orders[order][idx] != nil {
				return fmt.Errorf("map chunk at %#x, bitmap %d: phys_start %#x of order %d listed twice: %w", addr, i, ptr.PhysStart, order, unix.EINVAL)
			}
			if err := readPage(mf, ptr.Bitmap, bm[:]); err != nil {
				return fmt.Errorf("map chunk at %#x, bitmap %d: bitmap: %w", addr, i, err)
			}
			b := new(bitmap)
			for w := range b {
				b[w] = binary.LittleEndian.Uint64(bm[8*w:])
			}
			start := ptr.PhysStart >> abikho.PageShift
			if valid := (pages - start) >> order; valid < abikho.PreserveBits {
				if bit, ok := firstSetFrom(b, valid); ok {
					return fmt.Errorf("map chunk at %#x, bitmap %d (at %#x): bit %d preserves the order-%d block at pfn %#x, which ends beyond the %d-page memory file: %w", addr, i, ptr.Bitmap, bit, order, start+bit<<order, pages, unix.EINVAL)
				}
			}
			if start == 0 && b[0]&1 != 0 {
				return fmt.Errorf("map chunk at %#x, bitmap %d (at %#x): bit 0 preserves pfn 0, which is reserved: %w", addr, i, ptr.Bitmap, unix.EINVAL)
			}
			t.orders[order][idx] = b
		}
		from = fmt.Sprintf("next of chunk %#x", addr)
		addr = hdr.Next
	}
	return nil
}

// firstSetFrom returns the first set bit of b at or after bit from.
func firstSetFrom(b *bitmap, from uint64) (uint64, bool) {
	for i := from; i < abikho.PreserveBits; i++ {
		if b[i/64]&(1<<(i%64)) != 0 {
			return i, true
		}
	}
	return 0, false
}

// runs returns every marked block in address order, as runs of
// consecutive blocks of one order, for pgalloc.MemoryFile.AdoptRuns: a
// contiguous preserved area becomes one run, so adopting it costs nothing
// per folio. Each order's bitmaps yield its runs in address order; when more
// than one order is present, the per-order lists are merged.
func (t *memTracker) runs() []pgalloc.Run {
	var lists [][]pgalloc.Run
	for o := range t.orders {
		if l := t.appendRuns(nil, o); len(l) > 0 {
			lists = append(lists, l)
		}
	}
	switch len(lists) {
	case 0:
		return nil
	case 1:
		return lists[0]
	}
	total := 0
	for _, l := range lists {
		total += len(l)
	}
	out := make([]pgalloc.Run, 0, total)
	for len(lists) > 0 {
		m := 0
		for i := 1; i < len(lists); i++ {
			if lists[i][0].PFN < lists[m][0].PFN {
				m = i
			}
		}
		// Copy the part of lists[m] that precedes every other list's head.
		next := ^uint64(0)
		for i := range lists {
			if i != m {
				next = min(next, lists[i][0].PFN)
			}
		}
		n := 1
		for n < len(lists[m]) && lists[m][n].PFN < next {
			n++
		}
		out = append(out, lists[m][:n]...)
		if lists[m] = lists[m][n:]; len(lists[m]) == 0 {
			lists = append(lists[:m], lists[m+1:]...)
		}
	}
	return out
}

// appendRuns appends the runs of marked blocks of order o to out. It
// counts the runs first (a run starts at every set bit whose predecessor is
// clear) so that out grows once.
func (t *memTracker) appendRuns(out []pgalloc.Run, o int) []pgalloc.Run {
	n := 0
	var carry uint64 // bit 63 of the previous word, if it is adjacent
	prevIdx := -2
	for idx, b := range t.orders[o] {
		if b == nil {
			continue
		}
		if idx != prevIdx+1 {
			carry = 0
		}
		prevIdx = idx
		for _, word := range b {
			n += bits.OnesCount64(word &^ (word<<1 | carry))
			carry = word >> 63
		}
	}
	if n == 0 {
		return out
	}
	out = slices.Grow(out, n)
	for idx, b := range t.orders[o] {
		if b == nil {
			continue
		}
		base := uint64(idx) * abikho.PreserveBits
		for w, word := range b {
			if word == 0 {
				continue
			}
			first := base + uint64(w)*64
			for word != 0 {
				i := uint64(bits.TrailingZeros64(word))
				ones := uint64(64 - i) // the run of ones from bit i
				if rest := ^(word >> i); rest != 0 {
					ones = uint64(bits.TrailingZeros64(rest))
				}
				pfn := (first + i) << o
				if k := len(out); k > 0 && out[k-1].End() == pfn && int(out[k-1].Order) == o && uint64(out[k-1].Count)+ones <= math.MaxUint32 {
					out[k-1].Count += uint32(ones)
				} else {
					out = append(out, pgalloc.Run{PFN: pfn, Count: uint32(ones), Order: uint8(o)})
				}
				if i+ones == 64 {
					break
				}
				word &^= (1<<ones - 1) << i
			}
		}
	}
	return out
}
