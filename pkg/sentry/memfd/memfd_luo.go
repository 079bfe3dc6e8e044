package memfd

// This file mirrors mm/memfd_luo.c function by function: memfd preservation
// via LUO, in both formats Linux has had. One implementation serves two
// handlers of the family "memfd":
//
//   - "memfd-v2" (linux-mm 873e8b59c82f / fb2257f1798a, "mm: memfd_luo:
//     preserve file seals"): the 48-byte record carries the seals. Preserve
//     refuses a file with a seal outside MEMFD_LUO_ALL_SEALS (EOPNOTSUPP);
//     retrieve re-checks them (EOPNOTSUPP), creates the file sealable and
//     adds them back.
//   - "memfd-v1" (torvalds/linux v6.19, the copy in shared/seed/memfd_luo.c):
//     the 40-byte record has no seals; the retrieved file is unsealed and
//     cannot be sealed, like memfd_alloc_file("", 0).
//
// Preserved across a restart: the file's contents (every folio of
// [0, size); holes are filled with zeroed folios at preserve), its size,
// its position, its status flags (O_RDWR|O_LARGEFILE, which every memfd
// has) and, with memfd-v2, its seals as they were at preserve. Not
// preserved, reset to defaults: FD_CLOEXEC (retrieved fds are O_CLOEXEC,
// like every LUO fd), the name, and with memfd-v1 the seals. MFD_HUGETLB
// memfds are rejected, and so is a file of more than UINT_MAX pages (EFBIG,
// the limit of memfd_pin_folios).
//
// While preserved, the file is frozen (shmem_freeze): its size cannot
// change, writes past its end and every fallocate fail with EPERM, until
// it is unpreserved.
//
// Format choice. The record is written at preserve in the format of the
// handler that preserved it, and freeze (which LUO calls with the handler
// chosen for the next sentry) converts it when another format of the
// family was chosen. Converting a memfd-v2 file to memfd-v1 fails with
// EOPNOTSUPP if the file has a seal other than F_SEAL_SEAL: the guest was
// promised its seals, and memfd-v1 cannot carry them (this follows the rule
// memfd-v2 applies to seals it does not know). Like Linux, there is no
// unfreeze: the record stays in the format it was last written in, which
// preservedFile tracks, and the next freeze converts from there.
//
// Fixes of the seed's known bugs (shared/spec/linux-luo.md §4.4), each
// marked "seed fix" below:
//  1. retrieve frees the memfd_luo_ser block on every path, not only on
//     success (the seed leaks it when file setup or a folio restore fails);
//  2. the error path of retrieve restores the remaining folios by address
//     (PFN_PHYS(pfn)), not by PFN, and skips pfn 0;
//  3. finish tests retrieve_status, not a "retrieved" bool, so a failed
//     retrieve is not cleaned up twice.
//
// Hardening beyond Linux at retrieve (each refusal is an error naming the
// record and field, never a panic): every page index of [0, size) must be
// covered by exactly one folio record (preserve fills holes, so a shortened
// nr_folios, a record with pfn 0 or a gap is corruption, not zeros); two
// records of one file naming one folio are refused; nr_folios and every
// allocation are bounded by the preserved folio array, not by the counts
// written in it; and a folio is restored once only (KHO's restore is
// one-shot), so a folio named by two files is refused to the second.

import (
	"fmt"
	"math"
	"sync"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abimemfd "github.com/livesentry/livesentry/pkg/abi/memfd"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"golang.org/x/sys/unix"
)

// compatible is the memfd-v1 handler's compatible string. It is a variable
// only so that compatibility tests can build a sentry that speaks another
// format (go build -ldflags "-X ...memfd.compatible=memfd-v9"); it is always
// abimemfd.Compatible otherwise.
var compatible = abimemfd.Compatible

// family is the LUO handler family of both memfd formats.
const family = "memfd"

// format is a memfd_luo_ser layout.
type format int

const (
	formatV1 format = iota + 1 // "memfd-v1", abimemfd.Ser
	formatV2                   // "memfd-v2", abimemfd.SerV2
)

func (ft format) String() string {
	if ft == formatV2 {
		return abimemfd.CompatibleV2
	}
	return compatible
}

// luoHandler holds what memfd_luo.c reaches through globals: the memory
// file and KHO.
type luoHandler struct {
	mf  *pgalloc.MemoryFile
	kho *kho.KHO
}

// preservedFile is the handler's private data between preserve and
// unpreserve: the pinned folios, the folio array and the record.
type preservedFile struct {
	folios []CacheRun
	array  *kho.Vmalloc
	desc   abikho.Vmalloc
	ser    pgalloc.Folio
	// seals are the file's seals at preserve.
	seals uint32
	// preservedAs is the format of the handler that preserved the file;
	// written is the format the record is in now (another one after a
	// converting freeze).
	preservedAs, written format
}

// record is memfd_luo_ser in either format.
type record struct {
	pos, size uint64
	seals     uint32 // memfd-v2 only
	flags     uint32 // memfd-v2 only
	nrFolios  uint64
	folios    abikho.Vmalloc
}

// encode writes r in format ft into b, zeroing the rest of the longer
// record so that the block never holds a stale tail.
func (r *record) encode(ft format, b []byte) error {
	if len(b) < abimemfd.SerV2Size {
		return fmt.Errorf("memfd_luo_ser: %d-byte block: %w", len(b), unix.EINVAL)
	}
	clear(b[:abimemfd.SerV2Size])
	if ft == formatV2 {
		s := abimemfd.SerV2{Pos: r.pos, Size: r.size, Seals: r.seals, Flags: r.flags, NrFolios: r.nrFolios, Folios: r.folios}
		return s.Encode(b)
	}
	s := abimemfd.Ser{Pos: r.pos, Size: r.size, NrFolios: r.nrFolios, Folios: r.folios}
	return s.Encode(b)
}

// decode reads r in format ft from b.
func (r *record) decode(ft format, b []byte) error {
	if ft == formatV2 {
		var s abimemfd.SerV2
		if err := s.Decode(b); err != nil {
			return err
		}
		*r = record{pos: s.Pos, size: s.Size, seals: s.Seals, flags: s.Flags, nrFolios: s.NrFolios, folios: s.Folios}
		return nil
	}
	var s abimemfd.Ser
	if err := s.Decode(b); err != nil {
		return err
	}
	*r = record{pos: s.Pos, size: s.Size, nrFolios: s.NrFolios, folios: s.Folios}
	return nil
}

// NewLUOHandler returns the memfd-v1 file handler (memfd_luo_handler of
// v6.19) for a sentry's memory file and KHO, to register with LUO.
func NewLUOHandler(mf *pgalloc.MemoryFile, k *kho.KHO) *luo.FileHandler {
	return (&luoHandler{mf: mf, kho: k}).handler(formatV1)
}

// NewLUOHandlers returns both memfd file handlers, memfd-v2 first, sharing
// one implementation, to register with LUO in this order: memfd-v2
// preserves every memfd and either may write it at the restart (see
// luo.SerializeOptions).
func NewLUOHandlers(mf *pgalloc.MemoryFile, k *kho.KHO) []*luo.FileHandler {
	h := &luoHandler{mf: mf, kho: k}
	return []*luo.FileHandler{h.handler(formatV2), h.handler(formatV1)}
}

// handler returns the LUO handler of format ft.
func (h *luoHandler) handler(ft format) *luo.FileHandler {
	return &luo.FileHandler{
		Compatible: ft.String(),
		Family:     family,
		Ops: &luo.FileOps{
			CanPreserve: h.canPreserve,
			Preserve:    func(args *luo.FileOpArgs) error { return h.preserve(args, ft) },
			Unpreserve:  h.unpreserve,
			Freeze:      func(args *luo.FileOpArgs) error { return h.freeze(args, ft) },
			Retrieve:    func(args *luo.FileOpArgs) error { return h.retrieve(args, ft) },
			Finish:      func(args *luo.FileOpArgs) { h.finish(args, ft) },
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
// +checklocks:f.mu
func (h *luoHandler) preserveFolios(f *File, pf *preservedFile) (nrFolios uint64, err error) {
	if f.Size() == 0 {
		pf.desc = abikho.Vmalloc{}
		return 0, nil
	}
	runs, err := f.PinFolios()
	if err != nil {
		return 0, fmt.Errorf("pinning folios: %w", err)
	}
	var n uint64
	for _, c := range runs {
		n += uint64(c.Run.Count)
	}
	array, err := kho.AllocVmalloc(h.mf, n*abimemfd.FolioSerSize)
	if err != nil {
		f.UnpinFolios(runs)
		return 0, fmt.Errorf("allocating the folio array (%d folios): %w", n, err)
	}
	h.makeUptodateDirtyLocked(f, runs)
	const perPage = pgalloc.PageSize / abimemfd.FolioSerSize
	i := uint64(0)
	// preserved is the number of folios of runs[:r] and of runs[r] up to
	// j preserved, for the undo.
	r, j := 0, uint64(0)
preserve:
	for ; r < len(runs); r++ {
		c := runs[r]
		var flags uint16
		if c.Dirty {
			flags |= abimemfd.FolioDirty
		}
		if c.Uptodate {
			flags |= abimemfd.FolioUptodate
		}
		for j = 0; j < uint64(c.Run.Count); j++ {
			fo := c.Folio(j)
			if err = h.kho.PreserveFolio(fo.Folio); err != nil {
				break preserve
			}
			rec := abimemfd.FolioSer{PFN: fo.Folio.PFN, Flags: flags, Index: fo.Index}
			rec.Encode(array.Page(int(i / perPage))[(i%perPage)*abimemfd.FolioSerSize:])
			i++
		}
	}
	if err == nil {
		pf.desc, err = h.kho.PreserveVmalloc(array)
	}
	if err != nil {
		// err_unpreserve, err_unpin, err_free_folios.
		unpreserveRuns(h, runs, r, j)
		array.Free()
		f.UnpinFolios(runs)
		return 0, fmt.Errorf("preserving folios: %w", err)
	}
	pf.folios, pf.array = runs, array
	return n, nil
}

// unpreserveRuns unpreserves the folios of runs[:r], and the first j of
// runs[r] if r < len(runs), in reverse.
func unpreserveRuns(h *luoHandler, runs []CacheRun, r int, j uint64) {
	if r < len(runs) {
		for ; j > 0; j-- {
			_ = h.kho.UnpreserveFolio(runs[r].Run.Folio(j - 1))
		}
	}
	for r--; r >= 0; r-- {
		for j := uint64(runs[r].Run.Count); j > 0; j-- {
			_ = h.kho.UnpreserveFolio(runs[r].Run.Folio(j - 1))
		}
	}
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
// runs were returned by f.PinFolios, which returns the page cache's runs:
// each is one run of the cache until its flags change here.
//
// +checklocks:f.mu
func (h *luoHandler) makeUptodateDirtyLocked(f *File, runs []CacheRun) {
	for i := range runs {
		c := &runs[i]
		if c.Uptodate && c.Dirty {
			continue
		}
		if !c.Uptodate {
			b, err := h.mf.Slice(c.Run.PFN, c.Run.Pages())
			if err != nil {
				panic(fmt.Sprintf("memfd: pinned run %+v outside the memory file: %v", c.Run, err))
			}
			clear(b)
		}
		f.setRunFlagsLocked(c.Index, c.Run, flagDirty|flagUptodate)
		c.Dirty, c.Uptodate = true, true
	}
}

// unpreserveFolios mirrors memfd_luo_unpreserve_folios.
//
// +checklocks:f.mu
func (h *luoHandler) unpreserveFolios(f *File, pf *preservedFile) {
	if pf.array == nil {
		return
	}
	_ = h.kho.UnpreserveVmalloc(pf.desc)
	unpreserveRuns(h, pf.folios, len(pf.folios), 0)
	f.UnpinFolios(pf.folios)
	pf.array.Free()
	pf.folios, pf.array = nil, nil
}

// preserve mirrors memfd_luo_preserve: freeze the file, allocate the
// memfd_luo_ser record in preserved memory, check the seals (memfd-v2:
// EOPNOTSUPP for a seal it cannot carry) and the size (EFBIG beyond UINT_MAX
// pages), record position, size and seals, preserve the folios, and write
// the record in format ft. On error everything is undone and the file is
// unfrozen.
func (h *luoHandler) preserve(args *luo.FileOpArgs, ft format) error {
	f := args.File.(*File)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.SetFrozen(true)

	// Room for either format: the block is one page.
	ser, err := h.kho.AllocPreserve(abimemfd.SerV2Size)
	if err != nil {
		f.SetFrozen(false)
		return err
	}
	pf, rec, err := h.preserveLocked(f, ser, ft)
	if err != nil {
		_ = h.kho.UnpreserveFree(ser)
		f.SetFrozen(false)
		return err
	}
	if err := rec.encode(ft, h.mf.Bytes(ser)); err != nil {
		panic(fmt.Sprintf("memfd: record does not fit %v: %v", ser, err))
	}
	args.PrivateData = pf
	args.SerializedData = ser.Addr()
	return nil
}

// preserveLocked is the part of memfd_luo_preserve between the allocation
// of the record and its publication.
//
// +checklocks:f.mu
func (h *luoHandler) preserveLocked(f *File, ser pgalloc.Folio, ft format) (*preservedFile, record, error) {
	seals := f.seals
	if ft == formatV2 && seals&^abimemfd.AllSeals != 0 {
		return nil, record{}, fmt.Errorf("memfd seals %#x: %s carries only %#x: %w", seals, ft, abimemfd.AllSeals, unix.EOPNOTSUPP)
	}
	size := uint64(f.Size())
	// memfd_pin_folios takes an unsigned int count: refuse rather than
	// preserve a prefix.
	if pages := (size + pgalloc.PageSize - 1) / pgalloc.PageSize; pages > math.MaxUint32 {
		return nil, record{}, fmt.Errorf("memfd of %d bytes: %d pages, more than %d: %w", size, pages, uint64(math.MaxUint32), unix.EFBIG)
	}
	pf := &preservedFile{ser: ser, seals: seals, preservedAs: ft, written: ft}
	nr, err := h.preserveFolios(f, pf)
	if err != nil {
		return nil, record{}, err
	}
	rec := record{pos: uint64(f.Pos()), size: size, nrFolios: nr, folios: pf.desc}
	if ft == formatV2 {
		rec.seals = seals
	}
	return pf, rec, nil
}

// freeze mirrors memfd_luo_freeze: only the position may have changed
// since preserve. ft is the format LUO chose for the next sentry: if the
// record is in another one, it is converted. A file preserved as memfd-v2
// with a seal other than F_SEAL_SEAL cannot be written as memfd-v1
// (EOPNOTSUPP): it would come back without its seals.
func (h *luoHandler) freeze(args *luo.FileOpArgs, ft format) error {
	pf, ok := args.PrivateData.(*preservedFile)
	if !ok || args.SerializedData == 0 {
		return unix.EINVAL
	}
	if ft == formatV1 && pf.preservedAs == formatV2 && pf.seals&^unix.F_SEAL_SEAL != 0 {
		return fmt.Errorf("memfd with seals %#x, preserved as %s: %s carries no seals: %w", pf.seals, formatV2, ft, unix.EOPNOTSUPP)
	}
	return h.rewrite(pf, args.File.(*File), ft)
}

// rewrite updates the record's position and converts it to format ft.
func (h *luoHandler) rewrite(pf *preservedFile, f *File, ft format) error {
	b := h.mf.Bytes(pf.ser)
	var rec record
	if err := rec.decode(pf.written, b); err != nil {
		return err
	}
	rec.pos = uint64(f.Pos())
	if ft != pf.written {
		rec.seals, rec.flags = 0, 0
		if ft == formatV2 {
			rec.seals = pf.seals
		}
	}
	if err := rec.encode(ft, b); err != nil {
		return err
	}
	pf.written = ft
	return nil
}

// unpreserve mirrors memfd_luo_unpreserve.
func (h *luoHandler) unpreserve(args *luo.FileOpArgs) {
	pf, ok := args.PrivateData.(*preservedFile)
	if !ok || args.SerializedData == 0 {
		panic("memfd: unpreserve of a file that preserve did not set up")
	}
	f := args.File.(*File)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.SetFrozen(false)
	h.unpreserveFolios(f, pf)
	_ = h.kho.UnpreserveFree(pf.ser)
}

// readRecord restores the memfd_luo_ser block at addr (one-shot) and
// decodes it in format ft. The block is returned, restored, even when it
// does not decode.
func (h *luoHandler) readRecord(addr uint64, ft format) (pgalloc.Folio, record, error) {
	var rec record
	if addr == 0 {
		return pgalloc.Folio{}, rec, fmt.Errorf("memfd_luo_ser address 0: %w", unix.EINVAL)
	}
	fo, err := h.kho.RestoreFolio(addr)
	if err != nil {
		return pgalloc.Folio{}, rec, fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err)
	}
	if err := rec.decode(ft, h.mf.Bytes(fo)); err != nil {
		return fo, rec, fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err)
	}
	return fo, rec, nil
}

// folioArray restores the folio array of rec and checks that its
// nr_folios records fit it. The array is returned, restored, even when they
// do not; nil if it could not be restored.
func (h *luoHandler) folioArray(addr uint64, rec record) (*kho.Vmalloc, error) {
	array, err := h.kho.RestoreVmalloc(rec.folios)
	if err != nil {
		return nil, fmt.Errorf("memfd_luo_ser at %#x: folio array: %w", addr, err)
	}
	if rec.nrFolios > array.Len()/abimemfd.FolioSerSize {
		return array, fmt.Errorf("memfd_luo_ser at %#x: nr_folios %d does not fit the %d-byte folio array: %w", addr, rec.nrFolios, array.Len(), unix.EINVAL)
	}
	return array, nil
}

// recordBufPages is how many pages of a folio array a retrieve reads with
// one pread(2), at most (recordPages).
const recordBufPages = 16

var recordBufs = sync.Pool{New: func() any { return new([recordBufPages * pgalloc.PageSize]byte) }}

// recordPages reads the pages of a folio array that hold its first nr
// records, in order, recordBufPages at a time, with pread(2)
// (kho.Vmalloc.ReadPages) rather than through the memory file's mapping:
// a retrieve reads each page once, and the first touch of a page through
// this process's mapping costs more than the kernel's copy (a page-table
// fill per page: microseconds each on a VM that shadows page tables,
// 5.5-5.9 ms for the 4 MiB of records of a GiB of 4 KiB folios here,
// where pread(2) copies at several GB/s). release gives the buffer back.
type recordPages struct {
	array       *kho.Vmalloc
	buf         *[recordBufPages * pgalloc.PageSize]byte
	pages       int // pages that hold records
	first, have int // pages [first, first+have) are in buf
}

func newRecordPages(array *kho.Vmalloc, nr uint64) *recordPages {
	return &recordPages{
		array: array,
		buf:   recordBufs.Get().(*[recordBufPages * pgalloc.PageSize]byte),
		pages: int((nr*abimemfd.FolioSerSize + pgalloc.PageSize - 1) / pgalloc.PageSize),
	}
}

// page returns page i of the array, valid until the next call.
func (r *recordPages) page(i int) ([]byte, error) {
	if i < r.first || i >= r.first+r.have {
		n := min(recordBufPages, r.pages-i)
		r.have = 0
		if err := r.array.ReadPages(i, r.buf[:n*pgalloc.PageSize]); err != nil {
			return nil, fmt.Errorf("folio array page %d: %w", i, err)
		}
		r.first, r.have = i, n
	}
	off := (i - r.first) * pgalloc.PageSize
	return r.buf[off : off+pgalloc.PageSize : off+pgalloc.PageSize], nil
}

func (r *recordPages) release() {
	recordBufs.Put(r.buf)
	r.buf = nil
}

// folioSerAt decodes record i of a folio array.
func folioSerAt(array *kho.Vmalloc, i uint64) abimemfd.FolioSer {
	const perPage = pgalloc.PageSize / abimemfd.FolioSerSize
	return abimemfd.DecodeFolioSer(array.Page(int(i / perPage))[(i%perPage)*abimemfd.FolioSerSize:])
}

// folioRecords restores the folio array of rec and decodes its nr_folios
// records. The array is returned, restored, even when its records do not
// fit it; nil if it could not be restored.
func (h *luoHandler) folioRecords(addr uint64, rec record) ([]abimemfd.FolioSer, *kho.Vmalloc, error) {
	array, err := h.folioArray(addr, rec)
	if err != nil {
		return nil, array, err
	}
	const perPage = pgalloc.PageSize / abimemfd.FolioSerSize
	recs := make([]abimemfd.FolioSer, rec.nrFolios)
	rp := newRecordPages(array, rec.nrFolios)
	defer rp.release()
	for i := 0; i < len(recs); i += perPage {
		page, err := rp.page(i / perPage)
		if err != nil {
			return nil, array, fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err)
		}
		for j := range min(perPage, len(recs)-i) {
			recs[i+j] = abimemfd.DecodeFolioSer(page[j*abimemfd.FolioSerSize:])
		}
	}
	return recs, array, nil
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
		_ = h.kho.RestoreFree(a)
	}
}

// carriedFile is what a retrieve keeps until finish when the handover was
// carried (kho.KHO.Carried): the record, the folio array and the folios
// the retrieve restored. The carried LUO records name them until the
// session is finished, so none may be freed or change owner before: the
// retrieved file's folios are pinned (a truncate or punch of the file only
// drops the file's reference), and a retrieve that failed keeps what it
// had restored. finish frees them, after LUO has unpublished the session.
type carriedFile struct {
	ser    pgalloc.Folio
	array  *kho.Vmalloc
	folios []pgalloc.Run
}

// free lets go of everything c holds: no longer preserved, and freed unless
// a retrieved file still holds it.
func (c *carriedFile) free(h *luoHandler) {
	for _, r := range c.folios {
		h.kho.ReleaseRestoredRun(r)
	}
	if c.array != nil {
		c.array.Free()
	}
	if c.ser != (pgalloc.Folio{}) {
		h.kho.ReleaseRestored(c.ser)
	}
	*c = carriedFile{}
}

// retrieve mirrors memfd_luo_retrieve and memfd_luo_retrieve_folios: a
// fresh memfd with the preserved size and position whose page cache holds
// the preserved folios at their indices, with their flags. With memfd-v2 the
// file is created sealable and gets the preserved seals; a seal outside
// MEMFD_LUO_ALL_SEALS is EOPNOTSUPP, non-zero flags (unused, must be 0) are
// EINVAL. From a carried handover, what it restored is kept until finish
// (carriedFile), whether it succeeds or not.
func (h *luoHandler) retrieve(args *luo.FileOpArgs, ft format) error {
	// kept, if not nil, gets everything restored instead of it being
	// freed.
	var kept *carriedFile
	if h.kho.Carried() {
		kept = &carriedFile{}
		args.PrivateData = kept
	}
	addr := args.SerializedData
	serFolio, rec, err := h.readRecord(addr, ft)
	// Seed fix 1: the record is freed on every path.
	if kept != nil {
		kept.ser = serFolio
	} else if serFolio != (pgalloc.Folio{}) {
		defer h.mf.DecRef(serFolio)
	}
	if err != nil {
		return err
	}
	if rec.seals&^abimemfd.AllSeals != 0 {
		return fmt.Errorf("memfd_luo_ser at %#x: seals %#x: %s carries only %#x: %w", addr, rec.seals, ft, abimemfd.AllSeals, unix.EOPNOTSUPP)
	}
	if rec.flags != 0 {
		return fmt.Errorf("memfd_luo_ser at %#x: flags %#x, none is defined: %w", addr, rec.flags, unix.EINVAL)
	}
	if rec.size > MaxFileSize || rec.pos > MaxFileSize {
		return fmt.Errorf("memfd_luo_ser at %#x: size %d or pos %d beyond the maximum file size: %w", addr, rec.size, rec.pos, unix.EINVAL)
	}
	var array *kho.Vmalloc
	if rec.nrFolios > 0 {
		array, err = h.folioArray(addr, rec)
		if kept != nil {
			kept.array = array
		} else if array != nil {
			defer array.Free()
		}
		if err != nil {
			return err
		}
	}
	nr := rec.nrFolios
	recAt := func(i uint64) abimemfd.FolioSer { return folioSerAt(array, i) }
	// Walk the records a page of the array at a time: check each,
	// restore them, a run of records that continue each other at once,
	// and append their folios to the new page cache in runs. Nothing here
	// costs memory per folio: a GiB of 4 KiB folios allocated together is
	// a few runs. restored gets every folio restored, in runs, until the
	// file takes them.
	var restored []pgalloc.Run
	fail := func(err error, from uint64) error {
		if kept != nil {
			// Kept, each with the one reference Adopt gave it; the
			// folios not restored stay preserved and unrestored, and
			// are freed when nothing incoming is left
			// (kho.KHO.ReleaseUnrestored).
			kept.folios = restored
			return err
		}
		// put_folios: nothing was inserted yet, so every restored folio
		// is dropped here and the records from `from` on are restored
		// and dropped.
		for _, r := range restored {
			h.mf.DecRefRun(r)
		}
		for i := from; i < nr; i++ {
			if r := recAt(i); r.PFN != 0 {
				// Seed fix 2: restore by address (PFN_PHYS), never by PFN.
				_ = h.kho.RestoreFree(r.PFN << pgalloc.PageShift)
			}
		}
		return err
	}
	// A batch is the records of one page of the array.
	const batch = pgalloc.PageSize / abimemfd.FolioSerSize
	var recs [batch]abimemfd.FolioSer
	var addrs [batch]uint64
	var got [batch]pgalloc.Folio
	var b cacheBuilder
	pages := (rec.size + pgalloc.PageSize - 1) / pgalloc.PageSize
	var rp *recordPages
	if nr > 0 {
		rp = newRecordPages(array, nr)
		defer rp.release()
	}
	for i := uint64(0); i < nr; i += batch {
		k := min(batch, nr-i)
		page, err := rp.page(int(i / batch))
		if err != nil {
			return fail(fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err), i)
		}
		for j := range k {
			r := abimemfd.DecodeFolioSer(page[j*abimemfd.FolioSerSize:])
			if r.PFN == 0 {
				return fail(fmt.Errorf("memfd_luo_folio_ser[%d] (index %#x) of memfd_luo_ser at %#x: pfn 0: preserve leaves no hole, so the page would read as zeros that were never written: %w", i+j, r.Index, addr, unix.EINVAL), i)
			}
			if r.Flags&^abimemfd.FolioFlagsMask != 0 {
				return fail(fmt.Errorf("memfd_luo_folio_ser[%d] (pfn %#x, index %#x) of memfd_luo_ser at %#x: unknown flags %#x: %w", i+j, r.PFN, r.Index, addr, r.Flags, unix.EINVAL), i)
			}
			recs[j], addrs[j] = r, r.PFN<<pgalloc.PageShift
		}
		for j := uint64(0); j < k; {
			e, n, uniform, rerr := h.restoreRun(recs[:k], addrs[:k], got[:k], j)
			for x := j; x < j+uint64(n); x++ {
				restored = appendRun(restored, got[x])
			}
			if rerr != nil {
				bad := i + j + uint64(n)
				pfn := recs[j+uint64(n)].PFN
				for x := range bad {
					if recAt(x).PFN == pfn {
						return fail(fmt.Errorf("memfd_luo_folio_ser[%d] and [%d] of memfd_luo_ser at %#x: both name the folio at pfn %#x: %w", x, bad, addr, pfn, unix.EINVAL), bad+1)
					}
				}
				return fail(fmt.Errorf("folio %d of memfd_luo_ser at %#x: %w", bad, addr, rerr), bad+1)
			}
			for j < e {
				m := e - j
				if !uniform {
					m = 1
				}
				// Every page index exactly once, in index order, as
				// preserve writes them: Linux reads a missing page as
				// zeros, and preserve fills every hole, so a gap means the
				// record lost folios. The records of a run follow each
				// other.
				if r := &recs[j]; r.Index != b.next {
					what := "leaves a hole before it"
					if r.Index < b.next {
						what = "overlaps the folio before it"
					}
					return fail(fmt.Errorf("memfd_luo_ser at %#x: memfd_luo_folio_ser[%d] (pfn %#x): index %#x %s (page %#x is next): %w", addr, i+j, r.PFN, r.Index, what, b.next, unix.EINVAL), i+e)
				}
				c := CacheFolio{
					Index:    recs[j].Index,
					Folio:    got[j],
					Dirty:    recs[j].Flags&abimemfd.FolioDirty != 0,
					Uptodate: recs[j].Flags&abimemfd.FolioUptodate != 0,
				}
				if err := b.addRun(int(i+j), c, m, rec.size); err != nil {
					return fail(fmt.Errorf("memfd_luo_ser at %#x: %w", addr, err), i+e)
				}
				j += m
			}
		}
	}
	if b.next < pages {
		return fail(fmt.Errorf("memfd_luo_ser at %#x: nr_folios %d: the folios cover %d pages, the %d-byte file has %d: %w", addr, nr, b.next, rec.size, pages, unix.EINVAL), nr)
	}
	if kept != nil {
		// The pin: the page cache takes the reference Adopt gave.
		for _, r := range restored {
			h.mf.IncRefRun(r)
		}
		kept.folios = restored
	}
	f := b.file(h.mf, int64(rec.size), int64(rec.pos))
	if ft == formatV2 {
		// memfd_alloc_file("", MFD_ALLOW_SEALING), then memfd_add_seals.
		if err := f.allowSealingAndAdd(rec.seals); err != nil {
			f.DecRef()
			return fmt.Errorf("memfd_luo_ser at %#x: adding seals %#x: %w", addr, rec.seals, err)
		}
	}
	args.File = f
	return nil
}

// restoreRun restores the folio of record j alone, to learn its order
// from KHO's map, then the records that continue it (the next block of that
// order, at the next index, with the same flags) as one run, a word of
// KHO's bitmaps at a time (kho.KHO.RestoreRun); one by one if that fails,
// so that the error names the folio. It fills got[j:e] and returns e, the
// end of the run, how many folios from j it restored, whether they all
// have the order of the first (uniform: else each is a run of its own),
// and the error of the folio j+n.
func (h *luoHandler) restoreRun(recs []abimemfd.FolioSer, addrs []uint64, got []pgalloc.Folio, j uint64) (e uint64, n int, uniform bool, err error) {
	e = j + 1
	if n, err = h.kho.RestoreFolios(addrs[j:e], got[j:e]); err != nil {
		return e, n, true, err
	}
	step, o := got[j].Pages(), got[j].Order
	for e < uint64(len(recs)) && recs[e].PFN == recs[e-1].PFN+step && recs[e].Index == recs[e-1].Index+step && recs[e].Flags == recs[j].Flags {
		got[e] = pgalloc.Folio{PFN: recs[e].PFN, Order: o}
		e++
	}
	if e == j+1 || h.kho.RestoreRun(addrs[j+1], o, e-j-1) == nil {
		return e, int(e - j), true, nil
	}
	n, err = h.kho.RestoreFolios(addrs[j+1:e], got[j+1:e])
	return e, n + 1, false, err
}

// finish mirrors memfd_luo_finish: a file that was never retrieved has its
// folios discarded and its record freed; after a retrieve (successful or
// not) there is nothing left to do, except from a carried handover, where
// what the retrieve kept (carriedFile) is let go now. LUO has unpublished
// the session before it finishes its files.
func (h *luoHandler) finish(args *luo.FileOpArgs, ft format) {
	if c, ok := args.PrivateData.(*carriedFile); ok {
		c.free(h)
		return
	}
	// Seed fix 3: retrieve_status, so a failed retrieve, which already
	// freed what it restored, is not cleaned up twice.
	if args.RetrieveStatus != 0 {
		return
	}
	serFolio, rec, err := h.readRecord(args.SerializedData, ft)
	if serFolio != (pgalloc.Folio{}) {
		defer h.kho.ReleaseRestored(serFolio)
	}
	if err != nil || rec.nrFolios == 0 {
		return
	}
	recs, array, err := h.folioRecords(args.SerializedData, rec)
	if array != nil {
		defer array.Free()
	}
	if err != nil {
		return
	}
	h.discardFolios(recs)
}

// appendRun appends folio fo to runs, as part of the last run if it
// follows it in the memory file with the same order.
func appendRun(runs []pgalloc.Run, fo pgalloc.Folio) []pgalloc.Run {
	if n := len(runs); n > 0 {
		if r := &runs[n-1]; int(r.Order) == fo.Order && r.End() == fo.PFN && r.Count < maxRunFolios {
			r.Count++
			return runs
		}
	}
	return append(runs, pgalloc.Run{PFN: fo.PFN, Count: 1, Order: uint8(fo.Order)})
}
