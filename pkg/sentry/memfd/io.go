package memfd

import (
	"fmt"
	"io"
	"sync"

	"golang.org/x/sys/unix"
)

// syscallCopyMin is the shortest run of memory-file bytes a write copies
// with pwrite(2) on the memory file rather than through the mapping, and a
// read copies out with pread(2). The host then allocates and fills its
// pages in one pass, where copying through the mapping would take a page
// fault per page not yet mapped here. A read gains as much: on a VM that
// shadows its guests' page tables, the first touch of a page through a
// mapping costs microseconds even when the page is mapped, where the
// kernel copies through its own mapping (docs/memfd.md).
const syscallCopyMin = 64 << 10

// preadFile copies memory-file bytes [addr, addr+len(dst)) into dst with
// pread(2) and returns what it could not copy (nothing, unless the call
// failed), for the caller to copy through the mapping.
func preadFile(f *File, dst []byte, addr uint64) []byte {
	for len(dst) > 0 {
		k, err := unix.Pread(f.mf.FD(), dst, int64(addr))
		if err == unix.EINTR {
			continue
		}
		if err != nil || k <= 0 {
			break
		}
		dst = dst[k:]
		addr += uint64(k)
	}
	return dst
}

// bounceSize is the buffer a read to a writer copies large runs through
// (writerSink.flush).
const bounceSize = 256 << 10

var bounceBufs = sync.Pool{New: func() any { return new([bounceSize]byte) }}

// zeros is read by sinks that must produce zero bytes.
var zeros [64 << 10]byte

// checkRW mirrors rw_verify_area and the MAX_RW_COUNT cap: a negative
// offset or count, or a range that ends beyond the largest offset, is
// EINVAL; a count above MaxRWCount is shortened to it.
func checkRW(n, off int64) (int64, error) {
	if n < 0 || off < 0 || off+n < 0 {
		return 0, unix.EINVAL
	}
	return min(n, MaxRWCount), nil
}

// Read reads from the file position into dst and advances the position,
// like read(2). At or beyond the end of the file it returns 0 and no error,
// as read(2) does, so File is not an io.Reader.
func (f *File) Read(dst []byte) (int, error) {
	f.posMu.Lock()
	defer f.posMu.Unlock()
	pos := f.pos.Load()
	s := sliceSink{f: f, dst: dst}
	n, err := f.pread(&s, int64(len(dst)), pos)
	f.pos.Store(pos + n)
	return int(n), err
}

// Pread reads from offset off into dst, like pread(2): holes and folios that
// are not uptodate read as zeros, nothing is allocated, and the position does
// not move. A negative offset is EINVAL.
func (f *File) Pread(dst []byte, off int64) (int, error) {
	s := sliceSink{f: f, dst: dst}
	n, err := f.pread(&s, int64(len(dst)), off)
	return int(n), err
}

// ReadToAt is Pread that writes the bytes to w instead of a buffer: up to n
// bytes from off, or from the file position (which it then advances) if
// off is -1. Page-cache contents go to w as slices of the memory file,
// without a copy; holes go as zeros. It returns how many bytes w took, and
// w's error, wrapped, if w failed.
//
// The inode lock is held shared while w runs (so writes to the file wait):
// a caller writing to a guest's socket should give it a deadline.
func (f *File) ReadToAt(w io.Writer, n int64, off int64) (int64, error) {
	if off == -1 {
		f.posMu.Lock()
		defer f.posMu.Unlock()
		pos := f.pos.Load()
		s := writerSink{f: f, w: w}
		got, err := f.pread(&s, n, pos)
		f.pos.Store(pos + got)
		return got, err
	}
	s := writerSink{f: f, w: w}
	return f.pread(&s, n, off)
}

// pread reads up to n bytes from off into s (shmem_file_read_iter), after
// the checks of vfs_read.
func (f *File) pread(s readSink, n, off int64) (int64, error) {
	n, err := checkRW(n, off)
	if err != nil || n == 0 {
		return 0, err
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	size := f.size.Load()
	if off >= size {
		return 0, nil
	}
	end := uint64(off + min(n, size-off))
	pos := uint64(off)
	f.ascendLocked(pos>>pageShift, (end-1)>>pageShift, func(e entry) bool {
		hs := e.head() << pageShift
		if pos < hs {
			if err = s.zeros(hs - pos); err != nil {
				return false
			}
			pos = hs
		}
		t := min(end, (e.last+1)<<pageShift)
		if e.uptodate() {
			err = s.data(f.mf.Bytes(e.folio())[pos-hs:t-hs], e.addr(pos>>pageShift)+pos&(pageSize-1))
		} else {
			// shmem reads a folio that fallocate allocated and nothing
			// wrote (not uptodate) as a hole.
			err = s.zeros(t - pos)
		}
		pos = t
		return err == nil
	})
	if err == nil && pos < end {
		err = s.zeros(end - pos)
	}
	if ferr := s.flush(); err == nil {
		err = ferr
	}
	return s.count(), err
}

// readSink receives the bytes of a read, in order.
type readSink interface {
	// data takes b, page-cache bytes at memory-file offset addr.
	data(b []byte, addr uint64) error
	// zeros takes n zero bytes.
	zeros(n uint64) error
	// flush delivers whatever the sink has buffered.
	flush() error
	// count returns the number of bytes delivered.
	count() int64
}

// sliceSink copies into a buffer, joining page-cache bytes that are
// contiguous in the memory file into one copy: runs of syscallCopyMin bytes
// or more with pread(2) on the memory file (one copy either way, and none
// of the first-touch cost of the mapping), shorter ones through the
// mapping.
type sliceSink struct {
	f   *File
	dst []byte
	n   int
	// dst[pendAt:n] is still to be copied from memory-file offset
	// pendAddr on.
	pendAt   int
	pendAddr uint64
}

func (s *sliceSink) data(b []byte, addr uint64) error {
	if s.n == s.pendAt || s.pendAddr+uint64(s.n-s.pendAt) != addr {
		s.flush()
		s.pendAddr = addr
	}
	s.n += len(b)
	return nil
}

func (s *sliceSink) zeros(n uint64) error {
	s.flush()
	clear(s.dst[s.n : s.n+int(n)])
	s.n += int(n)
	s.pendAt = s.n
	return nil
}

func (s *sliceSink) flush() error {
	dst := s.dst[s.pendAt:s.n]
	s.pendAt = s.n
	if len(dst) == 0 {
		return nil
	}
	addr := s.pendAddr
	if len(dst) >= syscallCopyMin {
		rest := preadFile(s.f, dst, addr)
		addr += uint64(len(dst) - len(rest))
		dst = rest
	}
	if len(dst) > 0 {
		copy(dst, s.f.mapping(addr, uint64(len(dst))))
	}
	return nil
}

func (s *sliceSink) count() int64 { return int64(s.n) }

// writerSink writes to an io.Writer, joining page-cache bytes that are
// contiguous in the memory file into one Write.
type writerSink struct {
	f          *File
	w          io.Writer
	n          int64
	pendAddr   uint64
	pendLength uint64
}

func (s *writerSink) data(b []byte, addr uint64) error {
	if s.pendLength > 0 && s.pendAddr+s.pendLength == addr {
		s.pendLength += uint64(len(b))
		return nil
	}
	if err := s.flush(); err != nil {
		return err
	}
	s.pendAddr, s.pendLength = addr, uint64(len(b))
	return nil
}

func (s *writerSink) zeros(n uint64) error {
	if err := s.flush(); err != nil {
		return err
	}
	for n > 0 {
		c := min(n, uint64(len(zeros)))
		if err := s.write(zeros[:c]); err != nil {
			return err
		}
		n -= c
	}
	return nil
}

func (s *writerSink) flush() error {
	if s.pendLength == 0 {
		return nil
	}
	addr, n := s.pendAddr, s.pendLength
	s.pendLength = 0
	first := addr >> pageShift
	if n < syscallCopyMin || s.f.mf.CopyThroughMapping(first, (addr+n-1)>>pageShift-first+1) {
		return s.write(s.f.mapping(addr, n))
	}
	// Pages not touched here yet (after a restart, or written with
	// pwrite(2)): through a buffer, a bounceSize piece at a time, copied
	// in with pread(2). That is one copy more than writing from the
	// mapping, and costs less than the first touch of the pages through
	// it (pgalloc.MemoryFile.CopyThroughMapping).
	buf := bounceBufs.Get().(*[bounceSize]byte)
	defer bounceBufs.Put(buf)
	for n > 0 {
		c := min(n, bounceSize)
		b := buf[:c]
		if rest := preadFile(s.f, b, addr); len(rest) > 0 {
			copy(rest, s.f.mapping(addr+c-uint64(len(rest)), uint64(len(rest))))
		}
		if err := s.write(b); err != nil {
			return err
		}
		addr, n = addr+c, n-c
	}
	return nil
}

func (s *writerSink) write(b []byte) error {
	k, err := s.w.Write(b)
	s.n += int64(k)
	if err == nil && k < len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("writing memfd contents: %w", err)
	}
	return nil
}

func (s *writerSink) count() int64 { return s.n }

// mapping returns memory-file bytes [addr, addr+n) as a slice of the
// mapping.
//
// Preconditions:
//   - The bytes belong to consecutive folios of the page cache.
func (f *File) mapping(addr, n uint64) []byte {
	if n == 0 {
		return nil
	}
	off := addr & (pageSize - 1)
	b, err := f.mf.Slice(addr>>pageShift, (off+n+pageSize-1)>>pageShift)
	if err != nil {
		panic("memfd: page cache folio outside the memory file: " + err.Error())
	}
	return b[off : off+n]
}

// Write writes src at the file position and advances it, like write(2).
func (f *File) Write(src []byte) (int, error) {
	f.posMu.Lock()
	defer f.posMu.Unlock()
	pos := f.pos.Load()
	n, err := f.pwrite(&sliceSource{b: src}, int64(len(src)), pos)
	f.pos.Store(pos + n)
	return int(n), err
}

// Pwrite writes src at offset off, like pwrite(2), growing the file if the
// write ends beyond it. Like Linux, it writes page by page and stops at the
// first page it may not write: with F_SEAL_GROW, or while frozen, a write
// that crosses the end of the file writes the pages before the end's page
// and returns that count (EPERM if that is nothing); F_SEAL_WRITE and
// F_SEAL_FUTURE_WRITE make every write EPERM. When the memory file is full
// it returns what it wrote, or ENOMEM. A negative offset, or one that the
// write would carry beyond MaxFileSize, is EINVAL; an MFD_HUGETLB file
// cannot be written (EINVAL), as hugetlbfs has no write(2).
func (f *File) Pwrite(src []byte, off int64) (int, error) {
	n, err := f.pwrite(&sliceSource{b: src}, int64(len(src)), off)
	return int(n), err
}

// WriteFromAt is Pwrite that takes its n bytes from r, read straight into
// the page cache: at off, or at the file position (which it then advances)
// if off is -1. It reads from r only as many bytes as it writes, so when it
// writes less than n (seals, a frozen file, a full memory file) the caller
// must discard the rest of its frame. If r fails it returns the bytes
// written before and r's error (io.ErrUnexpectedEOF if r ended early).
//
// The inode lock is held while r is read, as Linux holds it while copying
// from user memory: a caller reading from a guest's socket should give it a
// deadline.
func (f *File) WriteFromAt(r io.Reader, n int64, off int64) (int64, error) {
	if off == -1 {
		f.posMu.Lock()
		defer f.posMu.Unlock()
		pos := f.pos.Load()
		got, err := f.pwrite(readerSource{r: r}, n, pos)
		f.pos.Store(pos + got)
		return got, err
	}
	return f.pwrite(readerSource{r: r}, n, off)
}

// pwrite writes n bytes from src at off, after the checks of vfs_write,
// generic_write_checks and shmem_write_begin.
func (f *File) pwrite(src writeSource, n, off int64) (int64, error) {
	if f.hugetlb {
		return 0, unix.EINVAL
	}
	n, err := checkRW(n, off)
	if err != nil || n == 0 {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	end := off + n
	if f.seals&(unix.F_SEAL_WRITE|unix.F_SEAL_FUTURE_WRITE) != 0 {
		return 0, unix.EPERM
	}
	if size := f.size.Load(); end > size && (f.seals&unix.F_SEAL_GROW != 0 || f.frozen.Load()) {
		// generic_perform_write calls shmem_write_begin once per page;
		// the first one whose end is past i_size fails.
		end = size &^ (pageSize - 1)
		if end <= off {
			return 0, unix.EPERM
		}
	}
	return f.writeLocked(src, off, end)
}

// writeSource provides the bytes of a write, in order.
type writeSource interface {
	// copyIn copies its next n bytes to memory-file bytes [addr, addr+n)
	// and returns how many it copied.
	copyIn(f *File, addr, n uint64) (uint64, error)
}

// sliceSource provides the bytes of a buffer.
type sliceSource struct {
	b []byte
}

func (s *sliceSource) copyIn(f *File, addr, n uint64) (uint64, error) {
	src := s.b[:n]
	s.b = s.b[n:]
	if n >= syscallCopyMin {
		for len(src) > 0 {
			k, err := unix.Pwrite(f.mf.FD(), src, int64(addr))
			if err == unix.EINTR {
				continue
			}
			if err != nil || k <= 0 {
				break // Copy the rest through the mapping.
			}
			src = src[k:]
			addr += uint64(k)
		}
	}
	if len(src) > 0 {
		copy(f.mapping(addr, uint64(len(src))), src)
		f.touched(addr, uint64(len(src)))
	}
	return n, nil
}

// touched records that memory-file bytes [addr, addr+n) were written
// through the mapping (pgalloc.MemoryFile.TouchedThroughMapping).
func (f *File) touched(addr, n uint64) {
	first := addr >> pageShift
	f.mf.TouchedThroughMapping(first, (addr+n-1)>>pageShift-first+1)
}

// readerSource provides the bytes of an io.Reader.
type readerSource struct {
	r io.Reader
}

// copyIn reads the bytes straight into the mapping if this process has
// them mapped already (pgalloc.MemoryFile.CopyThroughMapping); else, a
// run of syscallCopyMin or more, through a bounce buffer and pwrite(2):
// the first touch of a page through the mapping costs a page fault, tens of
// microseconds on a VM that shadows page tables, where pwrite(2) fills the
// pages at gigabytes a second; and the process then holds no page-table
// entry for them, which its exit would tear down. A run written that way
// once goes through the mapping the second time.
func (s readerSource) copyIn(f *File, addr, n uint64) (uint64, error) {
	first := addr >> pageShift
	if n < syscallCopyMin || f.mf.CopyThroughMapping(first, (addr+n-1)>>pageShift-first+1) {
		k, err := io.ReadFull(s.r, f.mapping(addr, n))
		if k > 0 {
			f.touched(addr, uint64(k))
		}
		return uint64(k), readErr(err)
	}
	buf := bounceBufs.Get().(*[bounceSize]byte)
	defer bounceBufs.Put(buf)
	var done uint64
	for done < n {
		k, err := io.ReadFull(s.r, buf[:min(n-done, bounceSize)])
		if k > 0 {
			src := &sliceSource{b: buf[:k]}
			src.copyIn(f, addr+done, uint64(k))
			done += uint64(k)
		}
		if err != nil {
			return done, readErr(err)
		}
	}
	return done, nil
}

// readErr is the error of a write whose source failed with err.
func readErr(err error) error {
	if err == nil {
		return nil
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading data to write to memfd: %w", err)
}

// seg is a folio of the page cache that an operation works on: one already
// cached, or a fresh one allocated for a hole and not yet inserted.
type seg struct {
	e     entry
	fresh bool
}

// writeLocked writes the bytes [off, end) of the file from src: the
// generic_perform_write loop with shmem_write_begin and shmem_write_end.
//
// Preconditions:
//   - 0 <= off < end.
//
// +checklocks:f.mu
func (f *File) writeLocked(src writeSource, off, end int64) (int64, error) {
	first, last := uint64(off)>>pageShift, uint64(end-1)>>pageShift
	// A folio that is not uptodate and that the write covers only in part
	// would become uptodate in part: split it so that only the pages
	// written become uptodate, as they would with shmem's order-0 folios.
	f.splitAtLocked(first, notUptodate)
	f.splitAtLocked(last+1, notUptodate)

	huge := func(block uint64) bool {
		return block<<pageShift >= uint64(off) && (block+hugePages)<<pageShift <= uint64(end)
	}
	segs := f.scratch[:0]
	var allocErr error
	idx := first
	f.ascendLocked(first, last, func(e entry) bool {
		if h := e.head(); idx < h {
			if segs, allocErr = f.allocHole(idx, h, huge, flagDirty|flagUptodate, segs); allocErr != nil {
				return false
			}
		}
		segs = append(segs, seg{e: e})
		idx = e.last + 1
		return true
	})
	if allocErr == nil && idx <= last {
		segs, allocErr = f.allocHole(idx, last+1, huge, flagDirty|flagUptodate, segs)
	}

	// Copy, one call per run of contiguous memory-file bytes. (No closure
	// for the flush: checklocks cannot follow f.mu into one.)
	var copied uint64
	var copyErr error
	var runAddr, runLength uint64
	for _, s := range segs {
		ws := max(uint64(off), s.e.head()<<pageShift)
		we := min(uint64(end), (s.e.last+1)<<pageShift)
		addr := s.e.addr(ws>>pageShift) + ws&(pageSize-1)
		if runLength > 0 && runAddr+runLength == addr {
			runLength += we - ws
			continue
		}
		if runLength > 0 {
			k, err := src.copyIn(f, runAddr, runLength)
			copied += k
			copyErr = err
			if k != runLength {
				runLength = 0
				break
			}
		}
		runAddr, runLength = addr, we-ws
	}
	if runLength > 0 {
		k, err := src.copyIn(f, runAddr, runLength)
		copied += k
		copyErr = err
	}

	// shmem_write_end for every folio written to; fresh folios that took
	// nothing go back.
	done := uint64(off) + copied
	used := len(segs)
	for i, s := range segs {
		ws := max(uint64(off), s.e.head()<<pageShift)
		if ws >= done {
			if used > i {
				used = i
			}
			if s.fresh {
				f.mf.DecRef(s.e.folio())
			}
			continue
		}
		if s.fresh {
			continue
		}
		if !s.e.uptodate() {
			// Zero what the write did not cover, as shmem_write_end does
			// before marking a folio uptodate.
			hs := s.e.head() << pageShift
			we := min(uint64(end), done, (s.e.last+1)<<pageShift)
			f.zeroRange(s.e.addr(s.e.head()), ws-hs)
			f.zeroRange(s.e.addr(s.e.head())+we-hs, (s.e.last+1)<<pageShift-we)
		}
		if fl := s.e.flags() | flagDirty | flagUptodate; fl != s.e.flags() {
			f.setFlagsLocked(s.e, fl)
		}
	}
	f.insertFreshLocked(segs[:used])
	f.releaseScratch(segs)
	if int64(done) > f.size.Load() {
		f.size.Store(int64(done))
	}
	switch {
	case copied > 0:
		return int64(copied), copyErr
	case copyErr != nil:
		return 0, copyErr
	default:
		return 0, allocErr
	}
}
