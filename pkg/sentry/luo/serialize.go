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

// serialized is what Serialize wrote into preserved memory.
type serialized struct {
	// blocks are every AllocPreserve'd folio (LUO FDT, session array, file
	// arrays), freed again by Abort.
	blocks  []pgalloc.Folio
	fdtAddr uint64
}

// Serialize mirrors liveupdate_reboot's luo_session_serialize: it freezes
// every preserved file, in session order and then preservation order, and
// writes the session and file records and the "LUO" KHO subtree. If a
// freeze fails, every file already frozen is unfrozen, last first, and the
// error is returned: the restart must not go on. On success LUO refuses
// changes (EBUSY) until Abort.
func (l *LUO) Serialize() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.serialized != nil {
		return fmt.Errorf("serializing LUO twice: %w", unix.EBUSY)
	}
	for _, s := range l.outgoing {
		s.mu.Lock()
	}
	defer func() {
		for _, s := range l.outgoing {
			s.mu.Unlock()
		}
	}()
	if err := l.freezeAllLocked(); err != nil {
		return err
	}
	ser, err := l.writeRecordsLocked()
	if err != nil {
		l.unfreezeAllLocked()
		return err
	}
	l.serialized = ser
	l.frozen.Store(true)
	return nil
}

// freezeAllLocked mirrors luo_session_serialize's freeze loop with its
// rollback (luo_file_freeze / __luo_file_unfreeze).
//
// Preconditions:
//   - l.mu and every outgoing session's mu are locked.
func (l *LUO) freezeAllLocked() error {
	for si, s := range l.outgoing {
		for fi, lf := range s.files {
			if err := lf.freeze(); err != nil {
				for j := fi - 1; j >= 0; j-- {
					s.files[j].unfreeze()
				}
				for k := si - 1; k >= 0; k-- {
					prev := l.outgoing[k]
					for j := len(prev.files) - 1; j >= 0; j-- {
						prev.files[j].unfreeze()
					}
				}
				return fmt.Errorf("freezing file %#x (%s) of session %q: %w", lf.token, lf.handler.Compatible, s.name, err)
			}
		}
	}
	return nil
}

// unfreezeAllLocked unfreezes every outgoing file, last first.
//
// Preconditions:
//   - l.mu and every outgoing session's mu are locked.
func (l *LUO) unfreezeAllLocked() {
	for k := len(l.outgoing) - 1; k >= 0; k-- {
		s := l.outgoing[k]
		for j := len(s.files) - 1; j >= 0; j-- {
			s.files[j].unfreeze()
		}
	}
}

// writeRecordsLocked writes luo_session_header_ser, the luo_session_ser
// array, one luo_file_ser array per session with files, and the LUO FDT,
// all in preserved memory, and adds the FDT as KHO subtree "LUO". On error
// it frees what it allocated.
//
// Preconditions:
//   - l.mu and every outgoing session's mu are locked.
func (l *LUO) writeRecordsLocked() (_ *serialized, err error) {
	ser := &serialized{}
	defer func() {
		if err != nil {
			l.freeSerialized(ser)
		}
	}()
	alloc := func(size uint64) (pgalloc.Folio, []byte, error) {
		fo, err := l.kho.AllocPreserve(size)
		if err != nil {
			return pgalloc.Folio{}, nil, err
		}
		ser.blocks = append(ser.blocks, fo)
		b, err := l.kho.MemoryFile().Slice(fo.PFN, fo.Pages())
		return fo, b, err
	}

	hdr, hb, err := alloc(abiluo.SessionHeaderSerSize + uint64(len(l.outgoing))*abiluo.SessionSerSize)
	if err != nil {
		return nil, fmt.Errorf("allocating the session array for %d sessions: %w", len(l.outgoing), err)
	}
	binary.LittleEndian.PutUint64(hb, uint64(len(l.outgoing)))
	for i, s := range l.outgoing {
		var ss abiluo.SessionSer
		abiluo.StrScpy(ss.Name[:], s.name)
		if n := len(s.files); n > 0 {
			fa, fb, err := alloc(uint64(n) * abiluo.FileSerSize)
			if err != nil {
				return nil, fmt.Errorf("allocating the file array of session %q (%d files): %w", s.name, n, err)
			}
			for j, lf := range s.files {
				var fs abiluo.FileSer
				abiluo.StrScpy(fs.Compatible[:], lf.handler.Compatible)
				fs.Data, fs.Token = lf.serializedData, lf.token
				fs.Encode(fb[j*abiluo.FileSerSize:])
			}
			ss.Files, ss.Count = fa.Addr(), uint64(n)
		}
		ss.Encode(hb[abiluo.SessionHeaderSerSize+i*abiluo.SessionSerSize:])
	}

	root := &fdt.Node{}
	root.SetString("compatible", abiluo.FDTCompatible)
	root.SetU64(abiluo.FDTLiveupdateNum, l.liveupdateNum+1)
	sn := root.AddChild(abiluo.FDTSessionNode)
	sn.SetString("compatible", abiluo.FDTSessionCompatible)
	sn.SetU64(abiluo.FDTSessionHeader, hdr.Addr())
	blob, err := fdt.Build(root)
	if err != nil {
		return nil, fmt.Errorf("building the LUO FDT: %w", err)
	}
	fo, fb, err := alloc(uint64(len(blob)))
	if err != nil {
		return nil, fmt.Errorf("allocating the LUO FDT: %w", err)
	}
	copy(fb, blob)
	if err := l.kho.AddSubtree(abiluo.FDTName, fo.Addr()); err != nil {
		return nil, fmt.Errorf("adding the LUO subtree to KHO: %w", err)
	}
	ser.fdtAddr = fo.Addr()
	return ser, nil
}

// freeSerialized unpreserves and frees everything ser holds.
func (l *LUO) freeSerialized(ser *serialized) {
	if ser.fdtAddr != 0 {
		_ = l.kho.RemoveSubtree(ser.fdtAddr)
	}
	for i := len(ser.blocks) - 1; i >= 0; i-- {
		_ = l.kho.UnpreserveFree(ser.blocks[i])
	}
	ser.blocks, ser.fdtAddr = nil, 0
}

// Abort rolls back a successful Serialize for a restart that did not
// happen: the records and the "LUO" subtree go, every file is unfrozen,
// and sessions whose fds were closed in the meantime are released now.
// Abort without a Serialize does nothing.
func (l *LUO) Abort() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.serialized == nil {
		return
	}
	for _, s := range l.outgoing {
		s.mu.Lock()
	}
	l.unfreezeAllLocked()
	l.frozen.Store(false)
	for _, s := range l.outgoing {
		s.mu.Unlock()
	}
	l.freeSerialized(l.serialized)
	l.serialized = nil
	closed := l.closedWhileSerialized
	l.closedWhileSerialized = nil
	for _, s := range closed {
		s.mu.Lock()
		s.unpreserveFilesLocked()
		s.mu.Unlock()
		l.removeLocked(&l.outgoing, s)
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
	defer in.free()
	sessions, num, err := in.read(addr)
	if err != nil {
		return fmt.Errorf("deserializing LUO: %w", err)
	}
	l.incoming = sessions
	l.liveupdateNum = num
	return nil
}

// incomingState reads the previous sentry's records and frees the blocks
// that held them once they are copied.
type incomingState struct {
	luo    *LUO
	blocks []pgalloc.Folio
}

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
		return nil, 0, fmt.Errorf("LUO FDT at %#x: compatible %q (%v), this sentry understands %q: %w", addr, c, err, abiluo.FDTCompatible, unix.EINVAL)
	}
	num, err := root.U64(abiluo.FDTLiveupdateNum)
	if err != nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %w", addr, err)
	}
	sn := root.Child(abiluo.FDTSessionNode)
	if sn == nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: no %q node: %w", addr, abiluo.FDTSessionNode, unix.EINVAL)
	}
	if c, err := sn.String("compatible"); err != nil || c != abiluo.FDTSessionCompatible {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %s compatible %q (%v), this sentry understands %q: %w", addr, abiluo.FDTSessionNode, c, err, abiluo.FDTSessionCompatible, unix.EINVAL)
	}
	hdrAddr, err := sn.U64(abiluo.FDTSessionHeader)
	if err != nil {
		return nil, 0, fmt.Errorf("LUO FDT at %#x: %w", addr, err)
	}
	hb, err := in.restore("luo_session_header_ser", hdrAddr)
	if err != nil {
		return nil, 0, err
	}
	count := binary.LittleEndian.Uint64(hb)
	if max := uint64(len(hb)-abiluo.SessionHeaderSerSize) / abiluo.SessionSerSize; count > max {
		return nil, 0, fmt.Errorf("luo_session_header_ser.count %d at %#x: only %d records fit its %d-byte block: %w", count, hdrAddr, max, len(hb), unix.EINVAL)
	}
	var sessions []*Session
	names := make(map[string]bool)
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
		s := &Session{luo: in.luo, name: name, incoming: true}
		files, err := in.readFiles(i, name, ss)
		if err != nil {
			return nil, 0, err
		}
		s.files = files
		sessions = append(sessions, s)
	}
	return sessions, num, nil
}

func (in *incomingState) readFiles(i uint64, name string, ss abiluo.SessionSer) ([]*luoFile, error) {
	if ss.Count == 0 {
		if ss.Files != 0 {
			return nil, fmt.Errorf("session %q: luo_file_set_ser.files %#x with count 0: %w", name, ss.Files, unix.EINVAL)
		}
		return nil, nil
	}
	fb, err := in.restore(fmt.Sprintf("luo_file_ser array of session %q", name), ss.Files)
	if err != nil {
		return nil, err
	}
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
		files = append(files, &luoFile{token: fs.Token, handler: h, serializedData: fs.Data})
	}
	return files, nil
}
