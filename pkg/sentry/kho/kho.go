// Package kho is Kexec HandOver over the memory file, in both formats of
// Linux's KHO ABI: "kho-v1" (v6.19, kernel/liveupdate/kexec_handover.c,
// per-order bitmaps serialized at finalize) and "kho-v2" (torvalds/linux
// 3f2ad900, one radix tree kept current at every preserve). It marks folios
// of the memory file as preserved and hands a description of them to the
// next sentry, which adopts exactly those folios and lets everything else
// go.
//
// What crosses a restart is only the memory file's fd and one address, the
// root: a preserved page holding a flattened device tree
//
//	/ {
//		compatible = "kho-v2";  /* or "kho-v1" */
//		preserved-memory-map = <u64: the radix tree's root node (v2),
//		                             the first map chunk (v1)>;
//		<subsystem> { preserved-data = <u64: the subsystem's blob>; };  /* v1: fdt */
//	};
//
// The outgoing side (the sentry about to restart) tracks preserved blocks in
// the kho-v2 radix tree, whose one-page nodes are ordinary allocated pages of
// the memory file, updated in place by PreserveFolio, PreservePages,
// AllocPreserve, PreserveVmalloc and their undoing counterparts; it names
// subsystem blobs in the root (AddSubtree). The root FDT is kho-v2 and
// current at every moment. At a restart, FinalizeFormat chooses the format
// the next sentry reads (ReadFormats and WriteFormats list them): kho-v2
// needs no work at all, kho-v1 copies the tree's leaves (which are kho-v1
// bitmaps, bit for bit) into bitmap pages listed by a khoser_mem_chunk
// chain, and rewrites the root as kho-v1. The incoming side (Ingest) reads
// the format from the root's compatible, validates the root and the map or
// tree field by field, reads them before the allocator starts, hands the
// bitmaps to pgalloc.MemoryFile.AdoptBitmaps, and then lets subsystems
// restore what they preserved (RetrieveSubtree, RestoreFolio, RestorePages,
// RestoreVmalloc), the same way whichever format crossed; ReleaseUnrestored
// frees whatever nobody claimed.
//
// Guarantees: a preserved folio keeps its address, order and contents across
// the restart; restore is one-shot and takes the order from the map, never
// from the caller; nothing read from the memory file can panic the sentry or
// make it touch memory outside the file, and every rejection names the field
// and the address. Preservation takes no reference: the caller keeps the
// memory allocated until the restart (as Linux callers pin it).
//
// Scratch areas: Linux reserves scratch memory because the next kernel must
// allocate (its image, memblock) before it has read the map. A sentry needs
// none: its allocator over the memory file starts only after Ingest has read
// the map (pgalloc.Open allows no allocation before Adopt), and its own heap
// is not in the memory file.
//
// Lock order: KHO.mu, then pgalloc.MemoryFile's lock (KHO calls into the
// allocator with mu held).
package kho

import (
	"bytes"
	"fmt"
	"sync"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// KHO is one sentry's handover state: the outgoing side (what this sentry
// will hand over) and, after a live-update boot, the incoming side (what the
// previous sentry handed over). It is safe for concurrent use.
type KHO struct {
	mf *pgalloc.MemoryFile

	mu sync.Mutex

	// out is the outgoing state (struct kho_out).
	//
	// +checklocks:mu
	out outgoing

	// in is the incoming state (struct kho_in); nil after a cold boot.
	//
	// +checklocks:mu
	in *incoming

	// carried is set when the outgoing state is the incoming one, taken
	// as it was (see Ingest): every incoming block stays preserved until
	// its owner drops it, so freeing a restored block clears its bit
	// first (releaseLocked). Set once by Ingest, read without mu.
	carried bool
}

// outgoing is what this sentry will hand over.
type outgoing struct {
	// tree tracks every preserved block: the kho-v2 radix tree, current at
	// every preserve and unpreserve. After a live-update boot it is made
	// at the first preserve (or handover), because Ingest must not
	// allocate.
	tree radixTree
	// root is the preserved page that holds the root FDT.
	root pgalloc.Folio
	// format is the compatible string the root FDT is written in:
	// kho-v2 (the tree, always current) except between a kho-v1
	// Finalize and Abort.
	format string
	// subtrees are the root's subnodes, in the order they were added.
	subtrees []subtree
	// finalized is set by Finalize and cleared by Abort; while it is set
	// the map must not change.
	finalized bool
	// v1Map is the address of the first kho-v1 map chunk written by the
	// last kho-v1 Finalize, 0 if none.
	v1Map uint64
	// v1Pages are the chunk and bitmap pages of v1Map: ordinary allocated
	// folios, not preserved.
	v1Pages []pgalloc.Folio
}

type subtree struct {
	name string
	addr uint64
}

// incoming is what the previous sentry handed over.
type incoming struct {
	// root is a copy of the incoming root FDT blob.
	root []byte
	// tree is root, parsed.
	tree *fdt.Node
	// format is the compatible string of the incoming root.
	format string
	// mem holds the preserved blocks not yet restored or released.
	mem memTracker
}

// New returns the handover state of a cold-booted sentry over mf: nothing
// incoming, and a fresh outgoing root (a page holding the kho-v2 root FDT
// with no subtrees; it and the radix tree are preserved and made at the
// first preserve, see initOutLocked). It mirrors kho_init.
func New(mf *pgalloc.MemoryFile) (*KHO, error) {
	k := &KHO{mf: mf}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.initOutLocked(pgalloc.Folio{}); err != nil {
		return nil, err
	}
	return k, nil
}

// initOutLocked sets up an empty outgoing side whose root FDT is in root,
// an allocated page, or in a new one (kho_init's
// kho_alloc_preserve(PAGE_SIZE)) if root is the zero Folio. The radix tree
// (kho_init's kzalloc of tree->root) and the root page's bit in it wait for
// the first preserve or FinalizeFormat (treeLocked): after Ingest the
// allocator may have no free page yet, and a cold boot does the same so
// that both start from one allocated page. Until then nothing is preserved
// and the root FDT says preserved-memory-map = 0.
//
// +checklocks:k.mu
func (k *KHO) initOutLocked(root pgalloc.Folio) error {
	k.out = outgoing{tree: newRadixTree(k.mf), format: abikho.CompatibleV2}
	if root == (pgalloc.Folio{}) {
		var err error
		if root, err = k.mf.Allocate(0); err != nil {
			return fmt.Errorf("kho: allocating the root FDT page: %w", err)
		}
	}
	k.out.root = root
	if err := k.writeRootLocked(); err != nil {
		k.mf.DecRef(root)
		return err
	}
	return nil
}

// treeLocked returns the outgoing tree, making its root node first if it
// has none: then it also marks the root FDT page preserved and rewrites
// the root FDT with the tree's address. A failure leaves everything as it
// was.
//
// +checklocks:k.mu
func (k *KHO) treeLocked() (*radixTree, error) {
	t := &k.out.tree
	if t.root != (pgalloc.Folio{}) {
		return t, nil
	}
	if err := t.init(); err != nil {
		return nil, err
	}
	if k.out.root != (pgalloc.Folio{}) {
		if err := t.set(k.out.root.PFN, k.out.root.Order); err != nil {
			t.free()
			*t = newRadixTree(k.mf)
			return nil, err
		}
		// The root FDT now names the tree. (It fitted with address 0,
		// and the address has the same size, but a failure leaves the
		// page as it was, so undo rather than assume.)
		if err := k.writeRootLocked(); err != nil {
			t.free()
			*t = newRadixTree(k.mf)
			return nil, err
		}
	}
	return t, nil
}

// setLocked marks (pfn, order) preserved in the outgoing tree.
//
// Preconditions: (pfn, order) lies inside the file.
//
// +checklocks:k.mu
func (k *KHO) setLocked(pfn uint64, order int) error {
	// Most blocks land in a leaf that exists.
	if l, bit := k.out.tree.leaf(pfn, order); l != nil {
		treeWrites.Add(1)
		abikho.LeafSet(l, bit)
		return nil
	}
	t, err := k.treeLocked()
	if err != nil {
		return err
	}
	return t.set(pfn, order)
}

// Ingest reads the handover that the previous sentry left in mf, a memory
// file opened with pgalloc.Open and not yet adopted, with its root FDT at
// the byte address root. It mirrors kho_populate and kho_mem_deserialize
// (kho-v1) or kho_mem_retrieve (kho-v2): it validates the root (FDT header,
// a compatible it reads, an 8-byte, non-zero, in-range
// preserved-memory-map), then every map chunk and bitmap (bounds,
// alignment, order, element count, chain cycles) or every tree node and
// leaf (bounds, alignment, cycles and shared nodes, key ranges, orders, no
// node inside a preserved block), copies what it needs out of them, and
// only then calls mf.AdoptBitmaps with a copy of the bitmaps or leaves, so
// that adopting costs time in proportion to the map, not to the folios. On
// any error nothing is adopted and the error names the field and the
// address; the caller may fall back to a cold boot.
//
// A kho-v2 handover is carried: the incoming root page, its radix tree and
// everything the tree marks become the outgoing state as they are, so that
// the root keeps describing every incoming block at every instant and a
// crash of this sentry loses none of them (docs/crash.md). The tree's node
// pages are adopted as this sentry's own allocated pages; an incoming block
// stays marked preserved until its owner drops it (UnpreserveFree,
// UnpreserveFolio, RestoreFree, ReleaseRestored, ReleaseUnrestored), and
// nothing is written into the file until then. Only a root that this
// sentry would have written itself, with no subtree but LUO's, is carried
// (Carried reports it). Otherwise, and for kho-v1, the chunk, bitmap and
// tree pages are not preserved (Adopt makes them stale like every other
// page that was not preserved), and the old root page, once parsed (Dump
// keeps a copy), is restored and reused for a fresh, empty outgoing root;
// the new radix tree is made at the first preserve (or FinalizeFormat).
// Either way Ingest allocates nothing from mf and so scrubs none of the
// previous sentry's unpreserved pages: with mf's releases held, the
// previous sentry can still roll back.
func Ingest(mf *pgalloc.MemoryFile, root uint64) (*KHO, error) {
	return ingest(mf, root, false)
}

// Recover is Ingest for a memory file whose sentry died without finalizing:
// the kho-v2 root and radix tree are current at every instant, so they are
// read as they are, exactly as Ingest reads a planned handover. The one
// state Ingest refuses and Recover accepts is a kho-v2 root with
// preserved-memory-map = 0: a sentry that never preserved anything (its
// tree is made at the first preserve); then nothing is adopted but the root
// page, which becomes the outgoing root again. A kho-v1 root (a sentry that
// died after a kho-v1 Finalize) is read as Ingest reads it: its map was
// complete.
func Recover(mf *pgalloc.MemoryFile, root uint64) (*KHO, error) {
	return ingest(mf, root, true)
}

func ingest(mf *pgalloc.MemoryFile, root uint64, crashed bool) (*KHO, error) {
	in, set, carry, err := deserialize(mf, root, crashed)
	if err != nil {
		return nil, fmt.Errorf("kho: ingesting the handover with root at %#x: %w", root, err)
	}
	return adopt(mf, root, in, set, carry)
}

// Prepared is a kho-v2 handover read and checked ahead of a restart's
// pause by Preread, for IngestPrepared.
type Prepared struct {
	mf    *pgalloc.MemoryFile
	root  uint64
	in    *incoming
	set   pgalloc.Bitmaps
	carry *carryState
}

// Preread does, ahead of a restart's pause, the reading and checking part
// of Ingest(mf, root) (kho_mem_retrieve's walk of the radix tree), while
// the previous sentry still runs: the root page and every node and leaf
// of the tree, copied out of the file and validated field by field as
// Ingest does. It adopts nothing and changes nothing in mf. The previous
// sentry may change the tree meanwhile: the caller may hand the result to
// IngestPrepared only if the previous sentry's KHO.TreeGeneration, read
// before the preread began, is the one it reports once it has finalized;
// otherwise it drops it (and Ingests). A kho-v1 root is refused (EINVAL):
// its map is written at the finalize, inside the pause.
func Preread(mf *pgalloc.MemoryFile, root uint64) (*Prepared, error) {
	in, set, carry, err := deserialize(mf, root, false)
	if err == nil && in.format != abikho.CompatibleV2 {
		err = fmt.Errorf("root FDT at %#x: compatible %q is finalized inside the pause: %w", root, in.format, unix.EINVAL)
	}
	if err != nil {
		return nil, fmt.Errorf("kho: reading ahead the handover with root at %#x: %w", root, err)
	}
	return &Prepared{mf: mf, root: root, in: in, set: set, carry: carry}, nil
}

// IngestPrepared is Ingest(mf, root) for a handover whose radix tree has
// not changed since p was read (see Preread): it reads the root page
// again and, if it is byte for byte the one p read, adopts what p read
// rather than reading the tree again; if not, or if p was read from
// another file or root, it is Ingest. used says whether p's reading was
// adopted. p is used up either way.
func IngestPrepared(mf *pgalloc.MemoryFile, root uint64, p *Prepared) (k *KHO, used bool, err error) {
	if p == nil {
		k, err = Ingest(mf, root)
		return k, false, err
	}
	q := *p
	*p = Prepared{}
	if q.in == nil || q.mf != mf || q.root != root {
		k, err = Ingest(mf, root)
		return k, false, err
	}
	var page [abikho.PageSize]byte
	if err := readPage(mf, root, page[:]); err != nil {
		return nil, false, fmt.Errorf("kho: ingesting the handover with root at %#x: root FDT at %#x: %w", root, root, err)
	}
	if !bytes.Equal(page[:len(q.in.root)], q.in.root) {
		k, err = Ingest(mf, root)
		return k, false, err
	}
	k, err = adopt(mf, root, q.in, q.set, q.carry)
	return k, err == nil, err
}

// adopt is the end of Ingest once the handover with root at root is read
// and checked: the preserved blocks are adopted and the KHO built.
func adopt(mf *pgalloc.MemoryFile, root uint64, in *incoming, set pgalloc.Bitmaps, carry *carryState) (*KHO, error) {
	if err := mf.AdoptBitmaps(set); err != nil {
		return nil, fmt.Errorf("kho: adopting the preserved memory of root %#x: %w", root, err)
	}
	k := &KHO{mf: mf}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.in = in
	if carry != nil {
		// The tree's node pages were adopted with the preserved blocks
		// (deserialize marked them): they are the outgoing tree's now,
		// not incoming blocks anyone may restore.
		for _, n := range carry.tree.nodes {
			in.mem.clear(n.PFN, 0)
		}
		old, err := k.restoreFolioLocked(root)
		if err != nil {
			return nil, fmt.Errorf("kho: restoring the incoming root page: %w", err)
		}
		k.out = outgoing{tree: carry.tree, root: old, format: abikho.CompatibleV2, subtrees: carry.subtrees}
		k.carried = true
		return k, nil
	}
	// The old root page was checked to be a preserved order-0 page, so it
	// is an adopted folio now. It has been parsed (in.root keeps a copy):
	// restore it and reuse it as the outgoing root. Linux allocates a
	// separate new root at kho_init; reusing the page keeps Ingest from
	// touching the allocator's page metadata (a 2 MiB section) inside the
	// blackout.
	old, err := k.restoreFolioLocked(root)
	if err != nil {
		return nil, fmt.Errorf("kho: restoring the incoming root page: %w", err)
	}
	if err := k.initOutLocked(old); err != nil {
		return nil, err
	}
	return k, nil
}

// TreeGeneration returns a number that changes whenever the outgoing radix
// tree may have changed (a block preserved or unpreserved, a node made, the
// tree dropped): equal numbers read at two times mean the tree's pages
// held the same contents throughout, which lets the next sentry read them
// ahead of the pause (Preread).
func (k *KHO) TreeGeneration() uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return treeWrites.Load()
}

// Carried reports whether Ingest carried the incoming kho-v2 state over as
// the outgoing one (see Ingest).
func (k *KHO) Carried() bool { return k.carried }

// RootAddr returns the byte address of the outgoing root FDT page: what
// crosses the restart together with the memory file's fd.
func (k *KHO) RootAddr() uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.out.root.Addr()
}

// ReadAhead reads, ahead of a restart's pause, every page the next
// sentry's Ingest of k's outgoing state will read in a kho-v2 handover:
// the root page and every page of the radix tree. It returns how many it
// read. (A kho-v1 map, for an older sentry, is written at the finalize,
// inside the pause: of it only the root page is read ahead.)
//
// Reading a page of the memory file normally takes a couple of
// microseconds. On the development machine, a virtual machine that runs
// DAMON's reclaim of cold physical memory (the likely cause), a page
// nobody had read for a while sometimes took 100 to 300 µs; a 4 GiB file
// of 4 KiB folios has some fifty tree pages, a handful of them slow in
// each restart, and they were most of what grew with memory inside the
// blackout. Read once by this sentry while the new one starts, the same
// pages took the new sentry the usual couple of microseconds each.
// Nothing is changed, so a failure costs only time. The pages are read
// after k.mu is let go of, so that a preserve running meanwhile waits for
// nothing: a page of the file freed in between is only read for nothing.
func (k *KHO) ReadAhead() (int, error) {
	k.mu.Lock()
	pages := make([]uint64, 0, len(k.out.tree.nodes)+1)
	if k.out.root != (pgalloc.Folio{}) {
		pages = append(pages, k.out.root.PFN)
	}
	for _, n := range k.out.tree.nodes {
		pages = append(pages, n.PFN)
	}
	k.mu.Unlock()
	var buf [abikho.PageSize]byte
	for i, pfn := range pages {
		if err := k.mf.ReadPages(pfn, buf[:]); err != nil {
			return i, fmt.Errorf("kho: reading ahead the outgoing state: %w", err)
		}
	}
	return len(pages), nil
}

// Incoming reports whether k was made by Ingest and so has an incoming side
// (is_kho_boot).
func (k *KHO) Incoming() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.in != nil
}

// Dump returns copies of the outgoing and the incoming root FDT blobs, what
// Linux shows in debugfs as kho/out/fdt and kho/in/fdt. in is nil after a
// cold boot.
func (k *KHO) Dump() (out, in []byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	page := k.mf.Bytes(k.out.root)
	if h, err := fdt.DecodeHeader(page); err == nil && int(h.TotalSize) <= len(page) {
		out = bytes.Clone(page[:h.TotalSize])
	}
	if k.in != nil {
		in = bytes.Clone(k.in.root)
	}
	return out, in
}

// checkBlock checks that (pfn, order) names a block k may preserve: a
// naturally aligned block inside the file, not at PFN 0.
func (k *KHO) checkBlock(pfn uint64, order int) error {
	if order < 0 || order > pgalloc.MaxOrder {
		return fmt.Errorf("kho: block at pfn %#x: order %d outside [0, %d]: %w", pfn, order, pgalloc.MaxOrder, unix.EINVAL)
	}
	if pfn == 0 || pfn&(1<<order-1) != 0 || pfn >= k.mf.Pages() || k.mf.Pages()-pfn < 1<<order {
		return fmt.Errorf("kho: block at pfn %#x of order %d: not a naturally aligned block inside the %d-page memory file (pfn 0 excluded): %w", pfn, order, k.mf.Pages(), unix.EINVAL)
	}
	return nil
}
