package luo

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// Write-through. LUO keeps its outgoing state in preserved memory at every
// instant, not only at Serialize: the "LUO" KHO subtree, its FDT, the
// luo_session_header_ser array and every session's luo_file_ser array are
// made at the first session and updated by every call that changes them,
// so that a sentry killed at any moment leaves a memory file that the next
// one ingests as after a planned restart (docs/crash.md).
//
// Layout (the luo-v1 FDT and luo-session-v2 records, unchanged):
//
//	LUO FDT page      liveupdate-number, luo-session-header = H
//	H (header block)  count, then count luo_session_ser {name, files, count}
//	file array        per session with files: count luo_file_ser
//
// Ordering rules, so that every instant is either the state before a call
// or after it:
//   - a record is written completely before the count or pointer that
//     makes it reachable, and that count or pointer is published with one
//     aligned 8-byte store (store64);
//   - a block is freed only after nothing published points at it;
//   - the FDT page and its place in the KHO root are written once: a new
//     header block is published by storing its address into the FDT's
//     luo-session-header value, which lies 8-byte aligned in the page.
//
// Removing a session from the middle of H cannot be one store, so H is
// double-buffered: the spare block gets the kept records followed by the
// removed one (same set, new order), the FDT is switched to it, and then
// its count drops by one. The spare is allocated but not preserved (a
// planned restart hands over no garbage); it was preserved once, so its
// radix-tree leaf exists and preserving it again at the switch allocates
// nothing and cannot fail. Files are never removed one by one (LUO has no
// per-file unpreserve): a session's file array only grows by appending a
// record and publishing count+1, and goes away with the session.

const (
	// recordBlockMin is the smallest record block: one page.
	recordBlockMin = pgalloc.PageSize
	// headerSentinel and numSentinel mark the luo-session-header and
	// liveupdate-number values while the FDT is laid out, to find their
	// offsets.
	headerSentinel = 0x4c554f5f48445221
	numSentinel    = 0x4c554f5f4e554d21
)

// records is LUO's outgoing state in preserved memory.
type records struct {
	// fdt is the LUO FDT page; hdrOff and numOff are the offsets of its
	// luo-session-header and liveupdate-number values (little endian,
	// like every u64 of KHO's FDTs, and 8-byte aligned).
	fdt            pgalloc.Folio
	hdrOff, numOff int
	// hdr are the two header blocks of equal size; hdr[cur] is published
	// and preserved, the other one only allocated.
	hdr [2]pgalloc.Folio
	cur int
	// slots are the outgoing sessions in the order of hdr[cur]'s records.
	slots []*sessionRecord
}

// sessionRecord is one outgoing session's part of the records.
type sessionRecord struct {
	s *Session
	// slot is the index of the session's luo_session_ser in hdr[cur].
	slot int
	// files is the luo_file_ser array (zero Folio until the first
	// preserve); n records are published.
	files pgalloc.Folio
	n     int
	// compat are the compatible strings of the published file records.
	compat []string
}

// hdrCap returns how many session records a header block holds.
func (r *records) hdrCap() int {
	return int((r.hdr[r.cur].Size() - abiluo.SessionHeaderSerSize) / abiluo.SessionSerSize)
}

// ensureRecordsLocked makes the records if LUO has none yet: the LUO FDT
// page, a pair of one-page header blocks, and the "LUO" KHO subtree. On
// failure nothing is left behind.
//
// +checklocks:l.mu
// +checklocks:l.recMu
func (l *LUO) ensureRecordsLocked() error {
	if l.rec != nil {
		return nil
	}
	var blocks [3]pgalloc.Folio
	for i := range blocks {
		fo, err := l.kho.AllocPreserve(recordBlockMin)
		if err != nil {
			l.freeBlocks(blocks[:i], pgalloc.Folio{})
			return fmt.Errorf("allocating LUO's records: %w", err)
		}
		blocks[i] = fo
	}
	r := &records{fdt: blocks[0], hdr: [2]pgalloc.Folio{blocks[1], blocks[2]}}
	// The spare is only allocated (see switchHeaderLocked).
	if err := l.kho.UnpreserveFolio(r.hdr[1]); err != nil {
		panic(fmt.Sprintf("luo: unpreserving the spare header block %v: %v", r.hdr[1], err))
	}
	blob, hdrOff, numOff, err := buildFDT(l.liveupdateNum+1, r.hdr[0].Addr())
	if err != nil || len(blob) > int(r.fdt.Size()) {
		panic(fmt.Sprintf("luo: the LUO FDT (%d bytes) cannot be laid out: %v", len(blob), err))
	}
	r.hdrOff, r.numOff = hdrOff, numOff
	copy(l.mf().Bytes(r.fdt), blob)
	if err := l.kho.AddSubtree(abiluo.FDTName, r.fdt.Addr()); err != nil {
		l.freeBlocks(blocks[:2], r.hdr[1])
		return fmt.Errorf("adding the LUO subtree to KHO: %w", err)
	}
	l.rec = r
	return nil
}

// buildFDT returns the LUO FDT naming the header block at hdr, with
// liveupdate-number num, and the offsets of the two values, each 8-byte
// aligned (so that one store64 rewrites it).
func buildFDT(num, hdr uint64) (blob []byte, hdrOff, numOff int, err error) {
	root := &fdt.Node{}
	root.SetString("compatible", abiluo.FDTCompatible)
	root.SetU64(abiluo.FDTLiveupdateNum, numSentinel)
	sn := root.AddChild(abiluo.FDTSessionNode)
	sn.SetString("compatible", abiluo.FDTSessionCompatible)
	sn.SetU64(abiluo.FDTSessionHeader, headerSentinel)
	blob, err = fdt.Build(root)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("building the LUO FDT: %w", err)
	}
	find := func(v uint64) int {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		off := bytes.Index(blob, b[:])
		if off < 0 || off%8 != 0 {
			return -1
		}
		return off
	}
	hdrOff, numOff = find(headerSentinel), find(numSentinel)
	if hdrOff < 0 || numOff < 0 {
		return nil, 0, 0, fmt.Errorf("the LUO FDT has its values at offsets %d and %d, not 8-byte aligned", hdrOff, numOff)
	}
	binary.LittleEndian.PutUint64(blob[hdrOff:], hdr)
	binary.LittleEndian.PutUint64(blob[numOff:], num)
	return blob, hdrOff, numOff, nil
}

// freeBlocks unpreserves and frees preserved, last first, and frees
// spare, an allocated block, unless it is the zero Folio.
func (l *LUO) freeBlocks(preserved []pgalloc.Folio, spare pgalloc.Folio) {
	if spare != (pgalloc.Folio{}) {
		l.mf().DecRef(spare)
	}
	for i := len(preserved) - 1; i >= 0; i-- {
		_ = l.kho.UnpreserveFree(preserved[i])
	}
}

func (l *LUO) mf() *pgalloc.MemoryFile { return l.kho.MemoryFile() }

// headerBytes returns the bytes of the published header block.
//
// +checklocks:l.recMu
func (l *LUO) headerBytes() []byte { return l.mf().Bytes(l.rec.hdr[l.rec.cur]) }

// publishHeaderLocked switches the FDT to the header block hdr[i], which
// must be written and preserved.
//
// +checklocks:l.recMu
func (l *LUO) publishHeaderLocked(i int) {
	r := l.rec
	store64(l.mf().Bytes(r.fdt)[r.hdrOff:], r.hdr[i].Addr())
	r.cur = i
}

// switchHeaderLocked preserves the spare header block, which must be
// written, publishes it and unpreserves the old one, which becomes the
// spare.
//
// +checklocks:l.recMu
func (l *LUO) switchHeaderLocked() {
	r := l.rec
	old, spare := r.cur, 1-r.cur
	// The spare's leaf exists (it was preserved when allocated).
	if err := l.kho.PreserveFolio(r.hdr[spare]); err != nil {
		panic(fmt.Sprintf("luo: preserving the spare header block %v: %v", r.hdr[spare], err))
	}
	l.publishHeaderLocked(spare)
	if err := l.kho.UnpreserveFolio(r.hdr[old]); err != nil {
		panic(fmt.Sprintf("luo: unpreserving the old header block %v: %v", r.hdr[old], err))
	}
}

// addSessionRecordLocked appends s's record (no files) and publishes it,
// growing the header blocks if they are full. It fails with ENOMEM when
// the memory file cannot hold the records.
//
// +checklocks:l.mu
// +checklocks:l.recMu
func (l *LUO) addSessionRecordLocked(s *Session) error {
	if err := l.ensureRecordsLocked(); err != nil {
		return err
	}
	// Carried records get their spare before they hold a session of this
	// sentry, whose close must not fail (removeSessionRecordLocked).
	if !l.spareLocked() {
		return fmt.Errorf("allocating LUO's spare header block: %w", unix.ENOMEM)
	}
	l.bumpLocked()
	r := l.rec
	if len(r.slots) == r.hdrCap() {
		if err := l.growHeaderLocked(); err != nil {
			return err
		}
	}
	var ss abiluo.SessionSer
	abiluo.StrScpy(ss.Name[:], s.name)
	hb := l.headerBytes()
	n := len(r.slots)
	ss.Encode(hb[abiluo.SessionHeaderSerSize+n*abiluo.SessionSerSize:])
	store64(hb, uint64(n+1))
	sr := &sessionRecord{s: s, slot: n}
	r.slots = append(r.slots, sr)
	s.rec = sr
	return nil
}

// growHeaderLocked moves the session records into a pair of header blocks
// twice as large, publishes the new current one and frees the old pair.
//
// +checklocks:l.recMu
func (l *LUO) growHeaderLocked() error {
	r := l.rec
	size := 2 * r.hdr[0].Size()
	if size > maxRecordBytes {
		return fmt.Errorf("growing LUO's session records beyond %d bytes: %w", maxRecordBytes, unix.ENOMEM)
	}
	a, err := l.kho.AllocPreserve(size)
	if err != nil {
		return fmt.Errorf("growing LUO's session records to %d bytes: %w", size, err)
	}
	b, err := l.kho.AllocPreserve(size)
	if err != nil {
		_ = l.kho.UnpreserveFree(a)
		return fmt.Errorf("growing LUO's session records to %d bytes: %w", size, err)
	}
	// b is the new spare: preserved once so that its leaf exists.
	if err := l.kho.UnpreserveFolio(b); err != nil {
		panic(fmt.Sprintf("luo: unpreserving the new spare header block %v: %v", b, err))
	}
	old := l.headerBytes()
	n := abiluo.SessionHeaderSerSize + len(r.slots)*abiluo.SessionSerSize
	copy(l.mf().Bytes(a)[:n], old[:n])
	oldCur, oldSpare := r.hdr[r.cur], r.hdr[1-r.cur]
	r.hdr = [2]pgalloc.Folio{a, b}
	l.publishHeaderLocked(0)
	_ = l.kho.UnpreserveFree(oldCur)
	if oldSpare != (pgalloc.Folio{}) {
		l.mf().DecRef(oldSpare)
	}
	return nil
}

// spareLocked makes sure the records have a spare header block, the size
// of the published one, and reports whether they do. Only carried records
// (see carryLocked) start without one; Settle makes it after the commit,
// and this makes it if Settle could not.
//
// +checklocks:l.recMu
func (l *LUO) spareLocked() bool {
	r := l.rec
	spare := 1 - r.cur
	if r.hdr[spare] != (pgalloc.Folio{}) {
		return true
	}
	fo, err := l.kho.AllocPreserve(r.hdr[r.cur].Size())
	if err != nil {
		return false
	}
	// Preserved once so that its leaf exists (see switchHeaderLocked).
	if err := l.kho.UnpreserveFolio(fo); err != nil {
		panic(fmt.Sprintf("luo: unpreserving the new spare header block %v: %v", fo, err))
	}
	r.hdr[spare] = fo
	return true
}

// removeSessionRecordLocked unpublishes s's record and then frees its file
// array. The files' own records are the handlers' to free, afterwards. It
// fails with ENOMEM, changing nothing, only for carried records (carry.go)
// that have no spare header block yet and no free page to make one, when
// s is not the last record: removing it from the middle takes the spare.
// Records holding a session of this sentry always have a spare
// (addSessionRecordLocked makes it first).
//
// +checklocks:l.recMu
func (l *LUO) removeSessionRecordLocked(s *Session) error {
	r := l.rec
	sr := s.rec
	if r == nil || sr == nil {
		return nil
	}
	i, n := sr.slot, len(r.slots)
	if i != n-1 && !l.spareLocked() {
		return fmt.Errorf("removing session %q from LUO's records: no page for the spare header block: %w", s.name, unix.ENOMEM)
	}
	l.bumpLocked()
	hb := l.headerBytes()
	if i != n-1 {
		// The spare gets the same set in a new order, s last, and
		// becomes the published block.
		spare := 1 - r.cur
		sb := l.mf().Bytes(r.hdr[spare])
		binary.LittleEndian.PutUint64(sb, uint64(n))
		k := 0
		for j := 0; j < n; j++ {
			if j != i {
				copy(sessionSlot(sb, k), sessionSlot(hb, j))
				k++
			}
		}
		copy(sessionSlot(sb, n-1), sessionSlot(hb, i))
		l.switchHeaderLocked()
		hb = sb
		r.slots = append(append(r.slots[:i:i], r.slots[i+1:]...), sr)
		for k, o := range r.slots {
			o.slot = k
		}
	}
	store64(hb, uint64(n-1))
	r.slots = r.slots[:n-1]
	s.rec = nil
	if sr.files != (pgalloc.Folio{}) {
		_ = l.kho.UnpreserveFree(sr.files)
	}
	return nil
}

// addFileRecordLocked appends a luo_file_ser record for lf to s's array
// and publishes it, growing the array (a new block, published through the
// session record, then the old one freed) when it is full.
//
// +checklocks:l.recMu
func (l *LUO) addFileRecordLocked(s *Session, lf *luoFile) error {
	r, sr := l.rec, s.rec
	if r == nil || sr == nil {
		panic(fmt.Sprintf("luo: preserving into session %q, which has no record", s.name))
	}
	l.bumpLocked()
	slot := l.slotBytesLocked(sr)
	if sr.files == (pgalloc.Folio{}) || uint64(sr.n+1)*abiluo.FileSerSize > sr.files.Size() {
		size := uint64(recordBlockMin)
		if sr.files != (pgalloc.Folio{}) {
			size = 2 * sr.files.Size()
		}
		if size > maxRecordBytes {
			return fmt.Errorf("growing the file records of session %q beyond %d bytes: %w", s.name, maxRecordBytes, unix.ENOSPC)
		}
		fo, err := l.kho.AllocPreserve(size)
		if err != nil {
			return fmt.Errorf("allocating the file records of session %q (%d bytes): %w", s.name, size, err)
		}
		old := sr.files
		if old != (pgalloc.Folio{}) {
			copy(l.mf().Bytes(fo), l.mf().Bytes(old)[:uint64(sr.n)*abiluo.FileSerSize])
		}
		store64(slot[64:], fo.Addr())
		sr.files = fo
		if old != (pgalloc.Folio{}) {
			_ = l.kho.UnpreserveFree(old)
		}
	}
	var fs abiluo.FileSer
	abiluo.StrScpy(fs.Compatible[:], lf.handler.Compatible)
	fs.Data, fs.Token = lf.serializedData, lf.token
	fs.Encode(l.mf().Bytes(sr.files)[uint64(sr.n)*abiluo.FileSerSize:])
	store64(slot[72:], uint64(sr.n+1))
	sr.n++
	sr.compat = append(sr.compat, lf.handler.Compatible)
	return nil
}

// rewriteFileRecordLocked rewrites the j-th file record of s with lf's
// data and the compatible string of h (a serialization that chose another
// format of the family), if they changed.
//
// +checklocks:l.recMu
func (l *LUO) rewriteFileRecordLocked(s *Session, j int, lf *luoFile, h *FileHandler) {
	sr := s.rec
	if l.rec == nil || sr == nil || j >= sr.n {
		return
	}
	b := l.mf().Bytes(sr.files)[uint64(j)*abiluo.FileSerSize:]
	var fs abiluo.FileSer
	_ = fs.Decode(b)
	if sr.compat[j] == h.Compatible && fs.Data == lf.serializedData {
		return
	}
	abiluo.StrScpy(fs.Compatible[:], h.Compatible)
	fs.Data = lf.serializedData
	fs.Encode(b)
	sr.compat[j] = h.Compatible
}

// sessionSlot returns the j-th luo_session_ser of the header block b.
func sessionSlot(b []byte, j int) []byte {
	off := abiluo.SessionHeaderSerSize + j*abiluo.SessionSerSize
	return b[off : off+abiluo.SessionSerSize]
}

// slotBytesLocked returns the published luo_session_ser of sr.
//
// +checklocks:l.recMu
func (l *LUO) slotBytesLocked(sr *sessionRecord) []byte {
	return sessionSlot(l.headerBytes(), sr.slot)
}
