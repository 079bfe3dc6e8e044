package luo

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// serialized is what a successful Serialize did, until Abort.
type serialized struct {
	// plan is the handler that froze and wrote each file.
	plan serializePlan
	// bumped says the freeze stored the liveupdate-number of carried
	// records (carry.go), which Abort puts back.
	bumped bool
}

// serializePlan holds, for every outgoing session (in order) and every file
// of it (in preservation order), the handler whose format the file's record
// is written in.
type serializePlan [][]*FileHandler

// SerializeOptions choose the formats the outgoing sentry writes.
type SerializeOptions struct {
	// PeerReads are the compatible strings the next sentry reads (its
	// Formats' Reads, all subsystems together). Each subsystem then writes
	// the newest format both sentries know: the LUO FDT and its session
	// node must be readable as they are, and each file is written by the
	// first registered handler of its family whose compatible string is in
	// PeerReads. A subsystem with no such format fails the serialization
	// with ErrNoCommonFormat; a file the chosen format cannot carry fails it
	// with the handler's error (memfd: EOPNOTSUPP for seals under
	// memfd-v1).
	//
	// Nil means no constraint: every file is written in the format of the
	// handler that preserved it.
	PeerReads []string
}

// ErrNoCommonFormat is the error of a serialization for a next sentry that
// reads none of the formats this one writes for some subsystem.
var ErrNoCommonFormat = errors.New("no format both sentries know")

// Serialize is SerializeWith(SerializeOptions{}).
func (l *LUO) Serialize() error {
	return l.SerializeWith(SerializeOptions{})
}

// SerializeWith mirrors liveupdate_reboot's luo_session_serialize: it
// chooses each file's format (see SerializeOptions) and freezes every
// preserved file, in session order and then preservation order. The
// session and file records and the "LUO" KHO subtree are written through
// as sessions and files come and go (records.go), so only what a freeze
// changes is left to write: a file record whose format or data the freeze
// changed. Nothing is allocated, unless no session was ever created (then
// the empty records are made, three pages, or, on a memory file without
// room for them, left out: there is nothing to hand over). If a freeze
// fails, every file already frozen is unfrozen, last first, and the error
// is returned: the restart must not go on. From the start of the call, and
// after a success until Abort, LUO refuses changes with EBUSY.
func (l *LUO) SerializeWith(opts SerializeOptions) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.serialized != nil {
		return fmt.Errorf("serializing LUO twice: %w", unix.EBUSY)
	}
	// From here PRESERVE_FD fails with EBUSY; one running now finishes
	// before this sentry takes its session's mu below. Sessions cannot go
	// away: releasing one takes l.mu.
	l.frozen.Store(true)
	plan, err := l.planLocked(opts)
	if err != nil {
		l.frozen.Store(false)
		return err
	}
	if err := l.freezeAllLocked(plan); err != nil {
		l.frozen.Store(false)
		return err
	}
	l.recMu.Lock()
	err = l.ensureRecordsLocked()
	if err != nil && len(l.outgoing) == 0 && errors.Is(err, unix.ENOMEM) {
		// Nothing to hand over and no room for the empty records: the
		// restart goes on without a LUO subtree (the next sentry counts
		// no live update) rather than fail on a full memory file.
		err = nil
	} else if err == nil {
		l.rewriteFrozenLocked(plan)
	}
	bumped := err == nil && l.bumpLocked()
	l.recMu.Unlock()
	if err != nil {
		l.unfreezeAllLocked(plan, len(l.outgoing))
		l.frozen.Store(false)
		return err
	}
	l.serialized = &serialized{plan: plan, bumped: bumped}
	return nil
}

// rewriteFrozenLocked writes into the file records what the freeze
// changed: the format chosen for the next sentry and the handler's data.
// The record stays in that format after an Abort, like the handler's own
// record (memfd has no unfreeze).
//
// +checklocks:l.mu
// +checklocks:l.recMu
func (l *LUO) rewriteFrozenLocked(plan serializePlan) {
	for si, s := range l.outgoing {
		s.mu.Lock()
		for j, lf := range s.files {
			l.rewriteFileRecordLocked(s, j, lf, plan[si][j])
		}
		s.mu.Unlock()
	}
}

// planLocked chooses the handler that writes each outgoing file.
//
// +checklocks:l.mu
func (l *LUO) planLocked(opts SerializeOptions) (serializePlan, error) {
	if opts.PeerReads != nil {
		for _, f := range l.Formats()[:2] {
			if !contains(opts.PeerReads, f.Writes[0]) {
				return nil, fmt.Errorf("%w: %s: this sentry writes %q, the next one reads %q", ErrNoCommonFormat, f.Subsystem, f.Writes, opts.PeerReads)
			}
		}
	}
	l.recMu.Lock()
	err := l.checkCarriedLocked(opts)
	l.recMu.Unlock()
	if err != nil {
		return nil, err
	}
	plan := make(serializePlan, len(l.outgoing))
	for i, s := range l.outgoing {
		s.mu.Lock()
		hs, err := l.planSessionLocked(s, opts)
		s.mu.Unlock()
		if err != nil {
			return nil, err
		}
		plan[i] = hs
	}
	return plan, nil
}

// planSessionLocked chooses the handler that writes each file of s.
//
// +checklocks:s.mu
func (l *LUO) planSessionLocked(s *Session, opts SerializeOptions) ([]*FileHandler, error) {
	hs := make([]*FileHandler, len(s.files))
	for j, lf := range s.files {
		if opts.PeerReads == nil {
			hs[j] = lf.handler
			continue
		}
		family := l.family(lf.handler)
		for _, h := range family {
			if contains(opts.PeerReads, h.Compatible) {
				hs[j] = h
				break
			}
		}
		if hs[j] == nil {
			var writes []string
			for _, h := range family {
				writes = append(writes, h.Compatible)
			}
			return nil, fmt.Errorf("%w: file %#x of session %q (%s): this sentry writes %q, the next one reads %q", ErrNoCommonFormat, lf.token, s.name, familyName(lf.handler), writes, opts.PeerReads)
		}
	}
	return hs, nil
}

func contains(list []string, s string) bool {
	for _, o := range list {
		if o == s {
			return true
		}
	}
	return false
}

// freezeAllLocked mirrors luo_session_serialize's freeze loop with its
// rollback (luo_file_freeze / __luo_file_unfreeze).
//
// +checklocks:l.mu
func (l *LUO) freezeAllLocked(plan serializePlan) error {
	for si, s := range l.outgoing {
		s.mu.Lock()
		err := s.freezeFilesLocked(plan[si])
		s.mu.Unlock()
		if err != nil {
			l.unfreezeAllLocked(plan, si)
			return err
		}
	}
	return nil
}

// unfreezeAllLocked unfreezes every file of the first n outgoing sessions,
// last first.
//
// +checklocks:l.mu
func (l *LUO) unfreezeAllLocked(plan serializePlan, n int) {
	for k := n - 1; k >= 0; k-- {
		s := l.outgoing[k]
		s.mu.Lock()
		s.unfreezeFilesLocked(plan[k], len(s.files))
		s.mu.Unlock()
	}
}

// freezeFilesLocked freezes every file of s with the handler the plan chose
// for it (luo_file_freeze). On failure it unfreezes the files it froze, last
// first, and returns the error.
//
// +checklocks:s.mu
func (s *Session) freezeFilesLocked(hs []*FileHandler) error {
	for fi, lf := range s.files {
		if err := freezeFile(lf, hs[fi]); err != nil {
			s.unfreezeFilesLocked(hs, fi)
			return fmt.Errorf("freezing file %#x (%s, written as %s) of session %q: %w", lf.token, lf.handler.Compatible, hs[fi].Compatible, s.name, err)
		}
	}
	return nil
}

// unfreezeFilesLocked unfreezes the first n files of s, last first.
//
// +checklocks:s.mu
func (s *Session) unfreezeFilesLocked(hs []*FileHandler, n int) {
	for j := n - 1; j >= 0; j-- {
		unfreezeFile(s.files[j], hs[j])
	}
}

// freezeFile mirrors luo_file_freeze_one with the handler h whose format
// the file is written in: the handler that preserved it, or another of its
// family.
func freezeFile(lf *luoFile, h *FileHandler) error {
	if h == lf.handler {
		return lf.freeze()
	}
	if h.Ops.Freeze != nil {
		args := lf.args()
		args.Handler = h
		if err := h.Ops.Freeze(&args); err != nil {
			return err
		}
		lf.serializedData = args.SerializedData
	}
	lf.frozen = true
	return nil
}

// unfreezeFile mirrors luo_file_unfreeze_one with the handler that froze
// the file.
func unfreezeFile(lf *luoFile, h *FileHandler) {
	if h == lf.handler {
		lf.unfreeze()
		return
	}
	if h.Ops.Unfreeze != nil {
		args := lf.args()
		args.Handler = h
		h.Ops.Unfreeze(&args)
	}
	lf.frozen = false
}

// Abort rolls back a successful Serialize for a restart that did not
// happen: every file is unfrozen, and sessions whose fds were closed in the
// meantime are released now. The records stay: they are LUO's current
// state.
// Abort without a Serialize does nothing.
func (l *LUO) Abort() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.serialized == nil {
		return
	}
	l.unfreezeAllLocked(l.serialized.plan, len(l.outgoing))
	if l.serialized.bumped {
		l.recMu.Lock()
		l.unbumpLocked()
		l.recMu.Unlock()
	}
	l.frozen.Store(false)
	l.serialized = nil
	closed := l.closedWhileSerialized
	l.closedWhileSerialized = nil
	for _, s := range closed {
		l.closeOutgoingLocked(s)
	}
}

// Deserialize reads the state the previous sentry handed over through the
// "LUO" KHO subtree (luo_session_deserialize and luo_file_deserialize) and
// makes its sessions the incoming ones. Handlers must be registered first.
// Every record is validated: an unknown compatible string, a record that
// does not fit its block, a name or compatible without NUL, a duplicate
// session name or token, or any address KHO does not know is an error that
// names it, and the caller must refuse the handover. Without a "LUO"
// subtree there is nothing to deserialize. It runs once.
//
// The blocks that held the records are copied and restored, but not freed:
// freeing the first folio of a GiB of the memory file makes the allocator
// build that GiB's page metadata, which does not belong inside a restart's
// blackout. The caller frees them with ReleaseIncomingRecords once the
// handover is committed (if it is refused, the file goes back to the
// previous sentry untouched).
func (l *LUO) Deserialize() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.deserialized {
		return fmt.Errorf("deserializing LUO twice: %w", unix.EBUSY)
	}
	l.deserialized = true
	addr, err := l.kho.RetrieveSubtree(abiluo.FDTName)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("retrieving KHO subtree %q: %w", abiluo.FDTName, err)
	}
	in := &incomingState{luo: l}
	sessions, num, err := in.read(addr)
	if err != nil {
		in.free()
		return fmt.Errorf("deserializing LUO: %w", err)
	}
	l.incoming = sessions
	l.liveupdateNum = num
	if !l.carryLocked(in, sessions) {
		l.incomingRecords = in.blocks
	}
	return nil
}

// Commit is called once the handover is committed, before guests are
// served. If KHO carried its state but LUO could not carry the records
// (their FDT is not laid out as this sentry lays it out), the carried root
// still names the incoming LUO FDT: the subtree goes now, before a session
// of this sentry needs the name, and the records' blocks are freed later
// (ReleaseIncomingRecords).
func (l *LUO) Commit() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.incomingRecords) > 0 && l.kho.Carried() {
		_ = l.kho.RemoveSubtree(l.incomingRecords[0].Addr())
	}
}

// ReleaseIncomingRecords frees the blocks Deserialize read the previous
// sentry's records from, unless it carried them (see carryLocked). It
// does nothing if there are none (a cold boot, or a second call).
func (l *LUO) ReleaseIncomingRecords() {
	l.mu.Lock()
	blocks := l.incomingRecords
	l.incomingRecords = nil
	l.mu.Unlock()
	if len(blocks) == 0 {
		return
	}
	l.kho.ReleaseRestored(blocks...)
}

// incomingState reads the previous sentry's records and frees the blocks
// that held them once they are copied.
type incomingState struct {
	luo *LUO
	// blocks are every block read, the LUO FDT first and the header
	// second.
	blocks []pgalloc.Folio
	// fdtBlob is the LUO FDT; hdrAddr and num the values it holds.
	fdtBlob      []byte
	hdrAddr, num uint64
	// files are each session's file array (the zero Folio for none),
	// and compat each session's file records' compatible strings.
	files  []pgalloc.Folio
	compat [][]string
	// data maps every file's handler data (its record's address) to the
	// file, to refuse two files sharing one record.
	data map[uint64]string
}

// free drops the blocks of a Deserialize that failed: before the commit,
// so plain references dropped, nothing written (a carried tree's bits
// stay as the previous sentry left them: the file goes back to it).
func (in *incomingState) free() {
	mf := in.luo.kho.MemoryFile()
	for _, fo := range in.blocks {
		mf.DecRef(fo)
	}
}

// restore restores the preserved block at addr and returns its bytes.
func (in *incomingState) restore(what string, addr uint64) ([]byte, error) {
	fo, err := in.luo.kho.RestoreFolio(addr)
	if err != nil {
		return nil, fmt.Errorf("%s at %#x: %w", what, addr, err)
	}
	in.blocks = append(in.blocks, fo)
	return in.luo.kho.MemoryFile().Bytes(fo), nil
}

func (in *incomingState) read(addr uint64) ([]*Session, uint64, error) {
	blob, err := in.restore("LUO FDT", addr)
	if err != nil {
		return nil, 0, err
	}
	root, err := fdt.Parse(blob, len(blob))
	if err != nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %w", addr, err)
	}
	if c, err := root.String("compatible"); err != nil || c != abiluo.FDTCompatible {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: compatible %q (%v), this sentry reads %q: %w", addr, c, err, []string{abiluo.FDTCompatible}, unix.EINVAL)
	}
	num, err := root.U64(abiluo.FDTLiveupdateNum)
	if err != nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %w", addr, err)
	}
	sn := root.Child(abiluo.FDTSessionNode)
	if sn == nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: no %q node: %w", addr, abiluo.FDTSessionNode, unix.EINVAL)
	}
	c, err := sn.String("compatible")
	switch {
	case err == nil && c == abiluo.FDTSessionCompatibleV1:
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %s compatible %q names several pre-release layouts that cannot be told apart (8-byte header and 64-byte records without files in torvalds/linux 0153094d03df; 16-byte header and 88-byte records in linux-next), so this sentry reads only %q: %w", addr, abiluo.FDTSessionNode, c, abiluo.FDTSessionCompatible, unix.EINVAL)
	case err != nil || c != abiluo.FDTSessionCompatible:
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %s compatible %q (%v), this sentry reads %q: %w", addr, abiluo.FDTSessionNode, c, err, []string{abiluo.FDTSessionCompatible}, unix.EINVAL)
	}
	hdrAddr, err := sn.U64(abiluo.FDTSessionHeader)
	if err != nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %w", addr, err)
	}
	hb, err := in.restore("luo_session_header_ser", hdrAddr)
	if err != nil {
		return nil, 0, err
	}
	in.fdtBlob, in.hdrAddr, in.num = blob, hdrAddr, num
	count := binary.LittleEndian.Uint64(hb)
	if max := uint64(len(hb)-abiluo.SessionHeaderSerSize) / abiluo.SessionSerSize; count > max {
		return nil, 0, fmt.Errorf("luo_session_header_ser.count %d at %#x: only %d records fit its %d-byte block: %w", count, hdrAddr, max, len(hb), unix.EINVAL)
	}
	var sessions []*Session
	names := make(map[string]bool)
	in.data = make(map[uint64]string)
	for i := uint64(0); i < count; i++ {
		recAddr := hdrAddr + abiluo.SessionHeaderSerSize + i*abiluo.SessionSerSize
		var ss abiluo.SessionSer
		if err := ss.Decode(hb[abiluo.SessionHeaderSerSize+i*abiluo.SessionSerSize:]); err != nil {
			return nil, 0, err
		}
		if !abiluo.NulTerminated(ss.Name[:]) {
			return nil, 0, fmt.Errorf("luo_session_ser[%d].name at %#x: not NUL-terminated: %w", i, recAddr, unix.EINVAL)
		}
		name := abiluo.CString(ss.Name[:])
		if names[name] {
			return nil, 0, fmt.Errorf("luo_session_ser[%d].name %q at %#x: duplicate session name: %w", i, name, recAddr, unix.EINVAL)
		}
		names[name] = true
		files, err := in.readFiles(i, name, ss)
		if err != nil {
			return nil, 0, err
		}
		sessions = append(sessions, &Session{luo: in.luo, name: name, incoming: true, files: files})
	}
	return sessions, num, nil
}

func (in *incomingState) readFiles(i uint64, name string, ss abiluo.SessionSer) ([]*luoFile, error) {
	if ss.Count == 0 {
		if ss.Files != 0 {
			return nil, fmt.Errorf("session %q: luo_file_set_ser.files %#x with count 0: %w", name, ss.Files, unix.EINVAL)
		}
		in.files, in.compat = append(in.files, pgalloc.Folio{}), append(in.compat, nil)
		return nil, nil
	}
	fb, err := in.restore(fmt.Sprintf("luo_file_ser array of session %q", name), ss.Files)
	if err != nil {
		return nil, err
	}
	in.files = append(in.files, in.blocks[len(in.blocks)-1])
	var compats []string
	if max := uint64(len(fb)) / abiluo.FileSerSize; ss.Count > max {
		return nil, fmt.Errorf("session %q: luo_file_set_ser.count %d: only %d records fit the %d-byte block at %#x: %w", name, ss.Count, max, len(fb), ss.Files, unix.EINVAL)
	}
	var files []*luoFile
	tokens := make(map[uint64]bool)
	for j := uint64(0); j < ss.Count; j++ {
		recAddr := ss.Files + j*abiluo.FileSerSize
		var fs abiluo.FileSer
		if err := fs.Decode(fb[j*abiluo.FileSerSize:]); err != nil {
			return nil, err
		}
		if !abiluo.NulTerminated(fs.Compatible[:]) {
			return nil, fmt.Errorf("session %q: luo_file_ser[%d].compatible at %#x: not NUL-terminated: %w", name, j, recAddr, unix.EINVAL)
		}
		compat := abiluo.CString(fs.Compatible[:])
		h := in.luo.handlerByCompatible(compat)
		if h == nil {
			return nil, fmt.Errorf("session %q: luo_file_ser[%d] at %#x (token %#x): no handler for compatible %q; this sentry has %q: %w", name, j, recAddr, fs.Token, compat, in.luo.compatibles(), unix.ENOENT)
		}
		if tokens[fs.Token] {
			return nil, fmt.Errorf("session %q: luo_file_ser[%d] at %#x: duplicate token %#x: %w", name, j, recAddr, fs.Token, unix.EINVAL)
		}
		tokens[fs.Token] = true
		who := fmt.Sprintf("luo_file_ser[%d] of session %q (token %#x)", j, name, fs.Token)
		if other, ok := in.data[fs.Data]; ok && fs.Data != 0 {
			return nil, fmt.Errorf("%s at %#x: data %#x is also the data of %s: one record cannot describe two files: %w", who, recAddr, fs.Data, other, unix.EINVAL)
		}
		in.data[fs.Data] = who
		files = append(files, &luoFile{token: fs.Token, handler: h, serializedData: fs.Data})
		compats = append(compats, h.Compatible)
	}
	in.compat = append(in.compat, compats)
	return files, nil
}

// Written returns the compatible strings of what the last successful
// serialization wrote: the LUO FDT, its session node, and the format of
// every file, each once. It is nil when LUO is not serialized.
func (l *LUO) Written() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.serialized == nil {
		return nil
	}
	out := []string{abiluo.FDTCompatible, abiluo.FDTSessionCompatible}
	for _, hs := range l.serialized.plan {
		for _, h := range hs {
			if !contains(out, h.Compatible) {
				out = append(out, h.Compatible)
			}
		}
	}
	return out
}
