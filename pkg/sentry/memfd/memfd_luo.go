package memfd

// This file mirrors mm/memfd_luo.c (Linux v6.19, "memfd-v1"; the copy in
// shared/seed/memfd_luo.c) function by function: memfd preservation via
// LUO.
//
// Preserved across a restart: the file's contents (every folio of
// [0, size); holes are filled with zeroed folios at preserve), its size,
// its position, and its status flags (O_RDWR|O_LARGEFILE, which every
// memfd has). Not preserved, reset to defaults: FD_CLOEXEC (retrieved fds
// are O_CLOEXEC, like every LUO fd) and seals (the retrieved file is
// unsealed and cannot be sealed, like memfd_alloc_file("", 0)); also the
// name. MFD_HUGETLB memfds are rejected.
//
// While preserved, the file is frozen (shmem_freeze): its size cannot
// change, writes past its end and every fallocate fail with EPERM, until
// it is unpreserved.
//
// Fixes of the seed's known bugs (shared/spec/linux-luo.md §4.4), each
// marked "seed fix" below:
//  1. retrieve frees the memfd_luo_ser block on every path, not only on
//     success (the seed leaks it when file setup or a folio restore fails);
//  2. the error path of retrieve restores the remaining folios by address
//     (PFN_PHYS(pfn)), not by PFN, and skips pfn 0;
//  3. finish tests retrieve_status, not a "retrieved" bool, so a failed
//     retrieve is not cleaned up twice.

import (
	"fmt"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abimemfd "github.com/livesentry/livesentry/pkg/abi/memfd"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"golang.org/x/sys/unix"
)

// compatible is the handler's compatible string. It is a variable only so
// that compatibility tests can build a sentry that speaks another format
// (go build -ldflags "-X ...memfd.compatible=memfd-v9"); it is always
// abimemfd.Compatible otherwise.
var compatible = abimemfd.Compatible

// luoHandler holds what memfd_luo.c reaches through globals: the memory
// file and KHO.
type luoHandler struct {
	mf  *pgalloc.MemoryFile
	kho *kho.KHO
}

// preservedFile is the handler's private data between preserve and
// unpreserve: the pinned folios, the folio array and the record.
type preservedFile struct {
	folios []CacheFolio
	array  *kho.Vmalloc
	desc   abikho.Vmalloc
	ser    pgalloc.Folio
}

// NewLUOHandler returns the memfd file handler (memfd_luo_handler) for a
// sentry's memory file and KHO, to register with LUO.
func NewLUOHandler(mf *pgalloc.MemoryFile, k *kho.KHO) *luo.FileHandler {
	h := &luoHandler{mf: mf, kho: k}
	return &luo.FileHandler{
		Compatible: compatible,
		Ops: &luo.FileOps{
			CanPreserve: h.canPreserve,
			Preserve:    h.preserve,
			Unpreserve:  h.unpreserve,
			Freeze:      h.freeze,
			Retrieve:    h.retrieve,
			Finish:      h.finish,
		},
	}
}

// canPreserve mirrors memfd_luo_can_preserve: shmem-backed and unlinked,
// which every non-hugetlb memfd is.
func (h *luoHandler) canPreserve(_ *luo.FileHandler, file luo.File) bool {
	f, ok := file.(*File)
	return ok && !f.IsHugetlb() && f.mf == h.mf
}

// preserveFolios mirrors memfd_luo_preserve_folios: pin every folio of the
// file (filling holes), preserve each with KHO, record its PFN, flags and
// index in an array of memfd_luo_folio_ser and preserve the array as a
// vmalloc-style area. On error it undoes everything, in reverse. A file of
// size 0 has no array.
//
// Preconditions:
//   - f.Lock is held.
func (h *luoHandler) preserveFolios(f *File, pf *preservedFile) (nrFolios uint64, err error) {
	if f.Size() == 0 {
		pf.desc = abikho.Vmalloc{}
		return 0, nil
	}
	folios, err := f.PinFolios()
	if err != nil {
		return 0, fmt.Errorf("pinning folios: %w", err)
	}
	array, err := kho.AllocVmalloc(h.mf, uint64(len(folios))*abimemfd.FolioSerSize)
	if err != nil {
		f.UnpinFolios(folios)
		return 0, fmt.Errorf("allocating the folio array (%d folios): %w", len(folios), err)
	}
	h.makeUptodateDirtyLocked(f, folios)
	const perPage = pgalloc.PageSize / abimemfd.FolioSerSize
	i := 0
	for ; i < len(folios); i++ {
		c := folios[i]
		if err = h.kho.PreserveFolio(c.Folio); err != nil {
			break
		}
		var flags uint16
		if c.Dirty {
			flags |= abimemfd.FolioDirty
		}
		if c.Uptodate {
			flags |= abimemfd.FolioUptodate
		}
		rec := abimemfd.FolioSer{PFN: c.Folio.PFN, Flags: flags, Index: c.Index}
		rec.Encode(array.Page(i / perPage)[(i%perPage)*abimemfd.FolioSerSize:])
	}
	if err == nil {
		pf.desc, err = h.kho.PreserveVmalloc(array)
	}
	if err != nil {
		// err_unpreserve, err_unpin, err_free_folios.
		for i--; i >= 0; i-- {
			_ = h.kho.UnpreserveFolio(folios[i].Folio)
		}
		array.Free()
		f.UnpinFolios(folios)
		return 0, fmt.Errorf("preserving folios: %w", err)
	}
	pf.folios, pf.array = folios, array
	return uint64(len(folios)), nil
}

// makeUptodateDirtyLocked zeroes every pinned folio that is not uptodate
// (fallocated and never written) and marks every folio uptodate and dirty,
// so that the flags recorded now stay true whatever is written before the
// restart. This follows the 2026 upstream patches "memfd_luo: always make
// all folios uptodate" and "always dirty all folios" rather than the v6.19
// seed, which records the flags as they are at preserve: a folio fallocated,
// preserved and then written would come back not uptodate, and read as
// zeros (the luo_memfd selftest fallocate_memfd).
//
// Preconditions:
//   - f.Lock is held and folios were returned by f.PinFolios.
func (h *luoHandler) makeUptodateDirtyLocked(f *File, folios []CacheFolio) {
	for i := range folios {
		c := &folios[i]
		if c.Uptodate && c.Dirty {
			continue
		}
		e, ok := f.findLocked(c.Index)
		if !ok || e.folio() != c.Folio {
			panic(fmt.Sprintf("memfd: pinned folio %v at index %#x is not in the page cache", c.Folio, c.Index))
		}
		if !c.Uptodate {
			clear(h.mf.Bytes(c.Folio))
		}
		f.cache.ReplaceOrInsert(e.withFlags(flagDirty | flagUptodate))
		c.Dirty, c.Uptodate = true, true
	}
}

// unpreserveFolios mirrors memfd_luo_unpreserve_folios.
//
// Preconditions:
//   - f.Lock is held.
func (h *luoHandler) unpreserveFolios(f *File, pf *preservedFile) {
	if pf.array == nil {
		return
	}
	_ = h.kho.UnpreserveVmalloc(pf.desc)
	for _, c := range pf.folios {
		_ = h.kho.UnpreserveFolio(c.Folio)
	}
	f.UnpinFolios(pf.folios)
	pf.array.Free()
	pf.folios, pf.array = nil, nil
}

// preserve mirrors memfd_luo_preserve: freeze the file, allocate the
// memfd_luo_ser record in preserved memory, record position and size,
// preserve the folios. On error everything is undone and the file is
// unfrozen.
func (h *luoHandler) preserve(args *luo.FileOpArgs) error {
	f := args.File.(*File)
	f.Lock()
	defer f.Unlock()
	f.SetFrozen(true)

	ser, err := h.kho.AllocPreserve(abimemfd.SerSize)
	if err != nil {
		f.SetFrozen(false)
		return err
	}
	pf := &preservedFile{ser: ser}
	rec := abimemfd.Ser{Pos: uint64(f.Pos()), Size: uint64(f.Size())}
	nr, err := h.preserveFolios(f, pf)
	if err != nil {
		_ = h.kho.UnpreserveFree(ser)
		f.SetFrozen(false)
		return err
	}
	rec.NrFolios, rec.Folios = nr, pf.desc
	if err := rec.Encode(h.mf.Bytes(ser)); err != nil {
		panic(fmt.Sprintf("memfd: %d-byte record does not fit %v: %v", abimemfd.SerSize, ser, err))
	}
	args.PrivateData = pf
	args.SerializedData = ser.Addr()
	return nil
}

// freeze mirrors memfd_luo_freeze: only the position may have changed
// since preserve.
func (h *luoHandler) freeze(args *luo.FileOpArgs) error {
	pf, ok := args.PrivateData.(*preservedFile)
	if !ok || args.SerializedData == 0 {
		return unix.EINVAL
	}
	f := args.File.(*File)
	var rec abimemfd.Ser
	b := h.mf.Bytes(pf.ser)
	if err := rec.Decode(b); err != nil {
		return err
	}
	rec.Pos = uint64(f.Pos())
	return rec.Encode(b)
}

// unpreserve mirrors memfd_luo_unpreserve.
func (h *luoHandler) unpreserve(args *luo.FileOpArgs) {
	pf, ok := args.PrivateData.(*preservedFile)
	if !ok || args.SerializedData == 0 {
		panic("memfd: unpreserve of a file that preserve did not set up")
	}
	f := args.File.(*File)
	f.Lock()
	defer f.Unlock()
	f.SetFrozen(false)
	h.unpreserveFolios(f, pf)
	_ = h.kho.UnpreserveFree(pf.ser)
}

// readRecord restores the memfd_luo_ser block at addr (one-shot) and
// decodes it.
func (h *luoHandler) readRecord(addr uint64) (pgalloc.Folio, abimemfd.Ser, error) {
	var rec abimemfd.Ser
	if addr == 0 {
		return pgalloc.Folio{}, rec, fmt.Errorf("memfd_luo_ser address 0: %w", unix.EINVAL)
	}
	fo, err := h.kho.RestoreFolio(addr)
	if err != nil {
		return pgalloc.Folio{}, rec, fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err)
	}
	if err := rec.Decode(h.mf.Bytes(fo)); err != nil {
		h.mf.DecRef(fo)
		return pgalloc.Folio{}, rec, fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err)
	}
	return fo, rec, nil
}

// folioRecords restores the folio array of rec and decodes its
// nr_folios records.
func (h *luoHandler) folioRecords(addr uint64, rec abimemfd.Ser) ([]abimemfd.FolioSer, error) {
	array, err := h.kho.RestoreVmalloc(rec.Folios)
	if err != nil {
		return nil, fmt.Errorf("memfd_luo_ser at %#x: folio array: %w", addr, err)
	}
	defer array.Free()
	if rec.NrFolios > array.Len()/abimemfd.FolioSerSize {
		return nil, fmt.Errorf("memfd_luo_ser at %#x: nr_folios %d does not fit the %d-byte folio array: %w", addr, rec.NrFolios, array.Len(), unix.EINVAL)
	}
	const perPage = pgalloc.PageSize / abimemfd.FolioSerSize
	recs := make([]abimemfd.FolioSer, rec.NrFolios)
	for i := range recs {
		recs[i] = abimemfd.DecodeFolioSer(array.Page(i / perPage)[(i%perPage)*abimemfd.FolioSerSize:])
	}
	return recs, nil
}

// discardFolios mirrors memfd_luo_discard_folios: restore each folio and
// drop it, freeing it into this sentry's allocator.
func (h *luoHandler) discardFolios(recs []abimemfd.FolioSer) {
	for _, r := range recs {
		if r.PFN == 0 {
			continue
		}
		// Seed fix 2: restore by address (PFN_PHYS), never by PFN.
		h.discardAddrs([]uint64{r.PFN << pgalloc.PageShift})
	}
}

// discardAddrs restores and drops the folios at addrs, skipping any that
// cannot be restored.
func (h *luoHandler) discardAddrs(addrs []uint64) {
	for _, a := range addrs {
		if fo, err := h.kho.RestoreFolio(a); err == nil {
			h.mf.DecRef(fo)
		}
	}
}

// retrieve mirrors memfd_luo_retrieve and memfd_luo_retrieve_folios: a
// fresh memfd with the preserved size and position whose page cache holds
// the preserved folios at their indices, with their flags.
func (h *luoHandler) retrieve(args *luo.FileOpArgs) error {
	addr := args.SerializedData
	serFolio, rec, err := h.readRecord(addr)
	if err != nil {
		return err
	}
	// Seed fix 1: the record is freed on every path.
	defer h.mf.DecRef(serFolio)
	if rec.Size > MaxFileSize || rec.Pos > MaxFileSize {
		return fmt.Errorf("memfd_luo_ser at %#x: size %d or pos %d beyond the maximum file size: %w", addr, rec.Size, rec.Pos, unix.EINVAL)
	}
	var recs []abimemfd.FolioSer
	if rec.NrFolios > 0 {
		if recs, err = h.folioRecords(addr, rec); err != nil {
			return err
		}
	}
	// Check every record, then restore all folios under one KHO lock.
	addrs := make([]uint64, 0, len(recs))
	for i, r := range recs {
		if r.PFN == 0 {
			continue
		}
		if r.Flags&^abimemfd.FolioFlagsMask != 0 {
			h.discardFolios(recs)
			return fmt.Errorf("memfd_luo_folio_ser[%d] (pfn %#x, index %#x) of memfd_luo_ser at %#x: unknown flags %#x: %w", i, r.PFN, r.Index, addr, r.Flags, unix.EINVAL)
		}
		addrs = append(addrs, r.PFN<<pgalloc.PageShift)
	}
	restored := make([]pgalloc.Folio, len(addrs))
	n, err := h.kho.RestoreFolios(addrs, restored)
	fail := func(err error) error {
		// put_folios: nothing was inserted yet (NewFromFolios takes all
		// or nothing), so every restored folio is dropped here and the
		// ones not restored yet are restored and dropped.
		for _, fo := range restored[:n] {
			h.mf.DecRef(fo)
		}
		if n < len(addrs) {
			h.discardAddrs(addrs[n+1:])
		}
		return err
	}
	if err != nil {
		return fail(fmt.Errorf("folio %d of memfd_luo_ser at %#x: %w", n, addr, err))
	}
	folios := make([]CacheFolio, 0, len(addrs))
	j := 0
	for _, r := range recs {
		if r.PFN == 0 {
			continue
		}
		folios = append(folios, CacheFolio{
			Index:    r.Index,
			Folio:    restored[j],
			Dirty:    r.Flags&abimemfd.FolioDirty != 0,
			Uptodate: r.Flags&abimemfd.FolioUptodate != 0,
		})
		j++
	}
	f, err := NewFromFolios(h.mf, int64(rec.Size), int64(rec.Pos), folios)
	if err != nil {
		return fail(fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err))
	}
	args.File = f
	return nil
}

// finish mirrors memfd_luo_finish: a file that was never retrieved has its
// folios discarded and its record freed; after a retrieve (successful or
// not) there is nothing left to do.
func (h *luoHandler) finish(args *luo.FileOpArgs) {
	// Seed fix 3: retrieve_status, so a failed retrieve, which already
	// freed what it restored, is not cleaned up twice.
	if args.RetrieveStatus != 0 {
		return
	}
	serFolio, rec, err := h.readRecord(args.SerializedData)
	if err != nil {
		return
	}
	defer h.mf.DecRef(serFolio)
	if rec.NrFolios == 0 {
		return
	}
	recs, err := h.folioRecords(args.SerializedData, rec)
	if err != nil {
		return
	}
	h.discardFolios(recs)
}
