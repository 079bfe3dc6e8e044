package kho

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// ReadFormats returns the compatible strings of the handovers Ingest reads,
// newest first.
func ReadFormats() []string { return []string{abikho.CompatibleV2, abikho.CompatibleV1} }

// WriteFormats returns the compatible strings FinalizeFormat writes, newest
// first.
func WriteFormats() []string { return []string{abikho.CompatibleV2, abikho.CompatibleV1} }

// Finalize is FinalizeFormat(abikho.Compatible), the format written when
// the restart does not negotiate one.
func (k *KHO) Finalize() error { return k.FinalizeFormat(abikho.Compatible) }

// FinalizeFormat makes the handover ready for the next sentry in the format
// named by its compatible string (one of WriteFormats): after it, RootAddr
// is what the next sentry ingests.
//
//   - "kho-v2": nothing to write. The radix tree is current at every
//     preserve and unpreserve and the root FDT names it, so this costs
//     O(1) whatever is preserved (kho_finalize in torvalds/linux 3f2ad900
//     only sets a flag).
//   - "kho-v1": every non-empty leaf of the tree is copied into a bitmap
//     page and listed in a chain of khoser_mem_chunk pages (one or more per
//     order), and the root FDT is rewritten as kho-v1 with
//     preserved-memory-map set to the first chunk (kho_finalize and
//     kho_mem_serialize in v6.19). Chunk and bitmap pages are ordinary
//     allocated pages, not preserved: the next sentry reads them before it
//     adopts, and then they are free. This costs time in proportion to the
//     leaves, not to the preserved memory.
//
// After FinalizeFormat the map cannot change (preserving or unpreserving
// fails with EBUSY) until Abort. It may be repeated, in either format; a
// repeat frees the previous kho-v1 chunk list (kho_update_memory_map). It
// fails with EINVAL for a format it does not write, naming the formats it
// does, and with ENOMEM if the file has no room for the map, leaving the
// previous state.
//
// From a successful FinalizeFormat on, the memory file belongs to the next
// sentry, which regards every page this one did not preserve as stale and
// may reuse it: FinalizeFormat holds the memory file's releases
// (pgalloc.HoldReleases) so that nothing this sentry frees afterwards is
// punched out, and Abort resumes them.
func (k *KHO) FinalizeFormat(format string) error {
	if format != abikho.CompatibleV1 && format != abikho.CompatibleV2 {
		return fmt.Errorf("kho: finalizing in format %q: this sentry writes only %q: %w", format, WriteFormats(), unix.EINVAL)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	// The tree must exist (and hold the root FDT page) in both formats.
	if _, err := k.treeLocked(); err != nil {
		return fmt.Errorf("kho: finalizing: %w", err)
	}
	var pages []pgalloc.Folio
	var first uint64
	if format == abikho.CompatibleV1 {
		var err error
		if pages, first, err = k.serializeLocked(); err != nil {
			return err
		}
	}
	old, oldMap, oldFormat := k.out.v1Pages, k.out.v1Map, k.out.format
	k.out.v1Pages, k.out.v1Map, k.out.format = pages, first, format
	if err := k.writeRootLocked(); err != nil {
		k.out.v1Pages, k.out.v1Map, k.out.format = old, oldMap, oldFormat
		k.freePagesLocked(pages)
		return err
	}
	k.out.finalized = true
	k.freePagesLocked(old)
	k.mf.HoldReleases()
	return nil
}

// Abort undoes FinalizeFormat, for a restart that is rolled back: it frees
// the kho-v1 chunk and bitmap pages if any, rewrites the root FDT as kho-v2
// (naming the tree again) and makes the map mutable again. Aborting when
// not finalized does nothing. (v6.16's KEXEC_KHO_ABORT; v6.19 has none.)
func (k *KHO) Abort() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.out.finalized {
		return nil
	}
	old := k.out.v1Pages
	k.out.v1Pages, k.out.v1Map, k.out.format, k.out.finalized = nil, 0, abikho.CompatibleV2, false
	if err := k.writeRootLocked(); err != nil {
		return err
	}
	k.freePagesLocked(old)
	k.mf.ResumeReleases()
	return nil
}

// Format returns the compatible string the outgoing root FDT is written in
// now: "kho-v2" except between FinalizeFormat("kho-v1") and Abort.
func (k *KHO) Format() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.out.format
}

// IncomingFormat returns the compatible string of the handover Ingest read,
// "" after a cold boot.
func (k *KHO) IncomingFormat() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.in == nil {
		return ""
	}
	return k.in.format
}

// freePagesLocked gives kho-v1 map pages back to the reserve, and frees
// those beyond what the reserve needs.
//
// +checklocks:k.mu
func (k *KHO) freePagesLocked(pages []pgalloc.Folio) {
	t := &k.out.tree
	for _, p := range pages {
		if t.root != (pgalloc.Folio{}) && len(t.reserve) < t.v1ReserveNeed() {
			t.reserve = append(t.reserve, p)
			continue
		}
		k.mf.DecRef(p)
	}
}

// serializeLocked writes the map (kho_mem_serialize) and returns the pages
// it allocated and the address of the first chunk.
//
// +checklocks:k.mu
func (k *KHO) serializeLocked() (pages []pgalloc.Folio, first uint64, err error) {
	w := v1Writer{mf: k.mf, tree: &k.out.tree}
	if err := w.write(&k.out.tree.leaves); err != nil {
		w.free()
		return nil, 0, err
	}
	return w.pages, w.first, nil
}

// v1Writer writes a kho-v1 map (kho_mem_serialize).
type v1Writer struct {
	mf *pgalloc.MemoryFile
	// tree's reserve gives the pages first.
	tree *radixTree
	// pages are the pages allocated so far.
	pages []pgalloc.Folio
	// first is the address of the first chunk.
	first uint64
	// chunk and hdr are the current chunk page and its header.
	chunk []byte
	hdr   abikho.MemChunkHdr
}

// alloc allocates a page for the map.
func (w *v1Writer) alloc() ([]byte, uint64, error) {
	f, ok := w.tree.takeReserve()
	if !ok {
		var err error
		if f, err = w.mf.Allocate(0); err != nil {
			return nil, 0, fmt.Errorf("kho: allocating a page for the preserved-memory map: %w", err)
		}
	}
	w.pages = append(w.pages, f)
	return w.mf.Bytes(f), f.Addr(), nil
}

// newChunk starts a chunk for order and links it after the current one
// (new_chunk).
func (w *v1Writer) newChunk(order int) error {
	c, addr, err := w.alloc()
	if err != nil {
		return err
	}
	if w.chunk == nil {
		w.first = addr
	} else {
		w.hdr.Next = addr
		w.hdr.Encode(w.chunk)
	}
	w.chunk, w.hdr = c, abikho.MemChunkHdr{Order: uint32(order)}
	return nil
}

// write copies every non-empty leaf into a bitmap page and lists it.
func (w *v1Writer) write(leaves *[pgalloc.MaxOrder + 1][][]byte) error {
	for o, ls := range leaves {
		orderStarted := false
		for idx, b := range ls {
			if b == nil || bytes.Equal(b, zeroPage[:]) {
				continue
			}
			if !orderStarted || w.hdr.NumElms == abikho.MemChunkCapacity {
				if err := w.newChunk(o); err != nil {
					return err
				}
				orderStarted = true
			}
			page, addr, err := w.alloc()
			if err != nil {
				return err
			}
			// A leaf is a kho-v1 bitmap, bit for bit.
			copy(page, b)
			ptr := abikho.MemBitmapPtr{
				PhysStart: uint64(idx) * abikho.PreserveBits << (o + abikho.PageShift),
				Bitmap:    addr,
			}
			ptr.Encode(w.chunk[abikho.MemChunkBitmapOffset(int(w.hdr.NumElms)):])
			w.hdr.NumElms++
		}
	}
	if w.chunk != nil {
		w.hdr.Encode(w.chunk)
	}
	return nil
}

// free gives every page allocated so far back to the reserve.
func (w *v1Writer) free() {
	w.tree.reserve = append(w.tree.reserve, w.pages...)
	w.pages = nil
}

// deserialize reads and validates the handover at root in mf
// (kho_populate + kho_mem_deserialize) and returns the incoming state and
// a copy of its bitmaps for pgalloc.MemoryFile.AdoptBitmaps. It changes
// nothing in mf, and it copies every page it reads before it interprets
// it. emptyV2 accepts a kho-v2 root without a tree (see Recover).
func deserialize(mf *pgalloc.MemoryFile, root uint64, emptyV2 bool) (*incoming, pgalloc.Bitmaps, *carryState, error) {
	var page [abikho.PageSize]byte
	if err := readPage(mf, root, page[:]); err != nil {
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	tree, err := fdt.Parse(page[:], abikho.PageSize)
	if err != nil {
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	h, _ := fdt.DecodeHeader(page[:])
	in := &incoming{root: bytes.Clone(page[:h.TotalSize]), tree: tree}
	compat, err := tree.String(abikho.PropCompatible)
	if err != nil {
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	if compat != abikho.CompatibleV1 && compat != abikho.CompatibleV2 {
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: compatible %q, but this sentry reads only %q: %w", root, compat, ReadFormats(), unix.EINVAL)
	}
	in.format = compat
	memMap, err := tree.U64(abikho.PropPreservedMemoryMap)
	if err != nil {
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: %w", root, err)
	}
	in.mem = newMemTracker(mf.Pages())
	if memMap == 0 && emptyV2 && compat == abikho.CompatibleV2 {
		if len(tree.Children) != 0 {
			return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: %s is 0 (nothing preserved) but the root names %d subtrees: %w", root, abikho.PropPreservedMemoryMap, len(tree.Children), unix.EINVAL)
		}
		if root>>abikho.PageShift >= mf.Pages() {
			return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: outside the %d-page memory file: %w", root, mf.Pages(), unix.EINVAL)
		}
		in.mem.set(root>>abikho.PageShift, 0)
		return in, in.mem.bitmaps(), nil, nil
	}
	if memMap == 0 {
		what := "the map was not finalized"
		if compat == abikho.CompatibleV2 {
			what = "no radix tree"
		}
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: %s is 0 (%s): %w", root, abikho.PropPreservedMemoryMap, what, unix.EINVAL)
	}
	var carry *carryState
	if compat == abikho.CompatibleV1 {
		err = readMap(mf, memMap, &in.mem)
	} else {
		carry = carryable(tree, memMap, in.root)
		var t *radixTree
		if carry != nil {
			t = &carry.tree
		}
		err = readRadix(mf, memMap, &in.mem, t)
	}
	if err != nil {
		return nil, pgalloc.Bitmaps{}, nil, err
	}
	if !in.mem.test(root>>abikho.PageShift, 0) {
		return nil, pgalloc.Bitmaps{}, nil, fmt.Errorf("root FDT at %#x: the root page is not preserved as an order-0 block: %w", root, unix.EINVAL)
	}
	if carry != nil {
		// Adopted with the preserved blocks, to become the outgoing
		// tree's pages (readRadix checked that none lies inside a
		// preserved block).
		for _, n := range carry.tree.nodes {
			in.mem.set(n.PFN, 0)
		}
	}
	return in, in.mem.bitmaps(), carry, nil
}

// carryState is the outgoing state Ingest takes over from a kho-v2
// handover: its radix tree, read in place, and the root's subtrees.
type carryState struct {
	tree     radixTree
	subtrees []subtree
}

// carriedSubtree is the one subtree a carried root may name: LUO's, whose
// records LUO carries over with it (luo.LUO.Deserialize). A subsystem that
// restored and freed its blob would leave a carried root naming freed
// memory.
const carriedSubtree = abiluo.FDTName

// carryable returns the start of a carryState for the kho-v2 root blob
// naming the tree at memMap, or nil if the root is not exactly what this
// sentry writes (buildRoot) with no subtree but carriedSubtree: then it is
// not carried, and the new sentry starts an outgoing state of its own.
func carryable(tree *fdt.Node, memMap uint64, blob []byte) *carryState {
	var subs []subtree
	for _, c := range tree.Children {
		addr, err := c.U64(abikho.PropPreservedData)
		if c.Name != carriedSubtree || err != nil {
			return nil
		}
		subs = append(subs, subtree{name: c.Name, addr: addr})
	}
	want, err := buildRoot(abikho.CompatibleV2, memMap, subs)
	if err != nil || !bytes.Equal(want, blob) {
		return nil
	}
	return &carryState{subtrees: subs}
}

// readPage copies the page at the byte address addr of mf into p, a page.
// It reads with pread rather than through the mapping, so that the
// scattered pages of a map cost no page fault each inside the blackout.
func readPage(mf *pgalloc.MemoryFile, addr uint64, p []byte) error {
	if addr == 0 || addr%abikho.PageSize != 0 {
		return fmt.Errorf("address %#x is not a non-zero, page-aligned address: %w", addr, unix.EINVAL)
	}
	if err := mf.ReadPages(addr>>abikho.PageShift, p[:abikho.PageSize]); err != nil {
		return fmt.Errorf("address %#x: %w", addr, err)
	}
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
			b := newBitmap()
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

// firstSetFrom returns the first set bit of b at or after bit from, a word
// at a time: the leaf or bitmap at the end of a file, checked at every
// Ingest, has tens of thousands of bits past the end.
func firstSetFrom(b *bitmap, from uint64) (uint64, bool) {
	for w := from / 64; w < uint64(len(b)); w++ {
		word := b[w]
		if w == from/64 {
			word &= ^uint64(0) << (from % 64)
		}
		if word != 0 {
			return w*64 + uint64(bits.TrailingZeros64(word)), true
		}
	}
	return 0, false
}
