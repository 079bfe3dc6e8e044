package luo

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"golang.org/x/sys/unix"
)

// Session is a named container of preserved files (struct luo_session),
// reached by guests through a session fd.
type Session struct {
	vfsDefaults
	luo  *LUO
	name string

	// incoming is set for sessions handed over by the previous sentry.
	incoming bool

	// refs counts the fds (and dups) that refer to the session; the last
	// one going releases it (luo_session_release).
	refs atomic.Int64

	mu sync.Mutex

	// retrieved is set once RETRIEVE_SESSION has returned an fd for an
	// incoming session.
	//
	// +checklocks:mu
	retrieved bool

	// files in preservation order.
	//
	// +checklocks:mu
	files []*luoFile

	// rec is the session's part of LUO's records in preserved memory (an
	// outgoing session's, or a carried incoming one's until it is
	// finished), guarded by LUO.recMu.
	rec *sessionRecord
}

// Name returns the session's name.
func (s *Session) Name() string { return s.name }

// IncRef takes a reference on the session's open file.
func (s *Session) IncRef() { s.refs.Add(1) }

// DecRef drops a reference; the last one releases the session.
func (s *Session) DecRef() {
	if s.refs.Add(-1) == 0 {
		s.release()
	}
}

// release mirrors luo_session_release. An outgoing session unpreserves
// all its files, last preserved first, and goes away: a guest that closes
// its session fd before the restart loses its preservations. A retrieved
// incoming session is finished; if finishing fails it stays with LUO until
// the next restart drops it.
func (s *Session) release() {
	l := s.luo
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.incoming {
		s.mu.Lock()
		err := s.finishLocked()
		s.mu.Unlock()
		if err != nil {
			return
		}
		l.removeIncomingLocked(s)
		if len(l.incoming) == 0 {
			// Nothing handed over is reachable any more: whatever
			// the previous sentry preserved and nobody restored is
			// garbage.
			l.kho.ReleaseUnrestored()
		}
		return
	}
	if l.serialized != nil {
		// The files are frozen and their records written: the next
		// sentry owns them. If the restart is aborted, Abort releases
		// the session.
		l.closedWhileSerialized = append(l.closedWhileSerialized, s)
		return
	}
	l.closeOutgoingLocked(s)
}

// closeOutgoingLocked mirrors the outgoing half of luo_session_release: the
// session's record is unpublished first (from then on a crash has lost the
// session, as the completed close would), then every file is unpreserved,
// and the session leaves the outgoing list.
//
// +checklocks:l.mu
func (l *LUO) closeOutgoingLocked(s *Session) {
	s.mu.Lock()
	l.recMu.Lock()
	if err := l.removeSessionRecordLocked(s); err != nil {
		// addSessionRecordLocked gave the records a spare before they
		// held s.
		panic(fmt.Sprintf("luo: closing session %q: %v", s.name, err))
	}
	l.recMu.Unlock()
	s.unpreserveFilesLocked()
	s.mu.Unlock()
	l.removeOutgoingLocked(s)
}

// Ioctl runs an ioctl on the session fd (luo_session_ioctl). PRESERVE_FD
// works only on a session created in this sentry, RETRIEVE_FD and FINISH
// only on a retrieved incoming one (EINVAL otherwise, before the size is
// looked at), GET_NAME on both. FINISH and GET_NAME refuse a non-zero
// reserved field with EINVAL.
func (s *Session) Ioctl(fdt FDTable, cmd uint32, arg []byte) ([]byte, error) {
	i, k, usize, err := decodeIoctl(sessionOps[:], abiluo.CmdSessionBase, cmd, arg, s.incoming)
	if err != nil {
		return nil, err
	}
	switch i {
	case 0:
		var a abiluo.SessionFD
		if err := a.Decode(k); err != nil {
			return nil, err
		}
		if err := s.preserveFD(fdt, a.Token, a.FD); err != nil {
			return nil, err
		}
		return abiluo.Respond(k, usize), nil
	case 1:
		var a abiluo.SessionFD
		if err := a.Decode(k); err != nil {
			return nil, err
		}
		fd, err := s.retrieveFD(fdt, a.Token)
		if err != nil {
			return nil, err
		}
		a.FD = fd
		if err := a.Encode(k); err != nil {
			return nil, err
		}
		return abiluo.Respond(k, usize), nil
	case 2:
		var a abiluo.SessionFinish
		if err := a.Decode(k); err != nil {
			return nil, err
		}
		if a.Reserved != 0 {
			return nil, unix.EINVAL
		}
		if err := s.Finish(); err != nil {
			return nil, err
		}
		return abiluo.Respond(k, usize), nil
	default:
		var a abiluo.SessionGetName
		if err := a.Decode(k); err != nil {
			return nil, err
		}
		if a.Reserved != 0 {
			return nil, unix.EINVAL
		}
		// strscpy, not strscpy_pad: the bytes after the NUL keep what
		// the user passed in.
		n := copy(a.Name[:abiluo.SessionNameLength-1], s.name)
		a.Name[n] = 0
		if err := a.Encode(k); err != nil {
			return nil, err
		}
		return abiluo.Respond(k, usize), nil
	}
}

// preserveFD mirrors luo_session_preserve_fd and luo_preserve_file: EEXIST
// for a token in use in this session, ENOSPC for a full session, EBADF for
// a bad fd, ENOENT if no handler can preserve the file, EBUSY if the file
// is already preserved (in any session), or the handler's error. Preserving
// into an incoming session is EINVAL.
func (s *Session) preserveFD(fdt FDTable, token uint64, fd int32) error {
	l := s.luo
	// A reference dropped here may be the file's last, and releasing a
	// device or session takes LUO.mu: drop it after s.mu (lock order).
	var drop File
	defer func() {
		if drop != nil {
			drop.DecRef()
		}
	}()
	s.mu.Lock()
	defer s.mu.Unlock()
	// Serialize sets frozen before it takes any session's mu to freeze
	// it: a preserve that passed this check finishes before its session
	// is frozen, and one that comes later fails.
	if l.frozen.Load() {
		return unix.EBUSY
	}
	if s.incoming {
		return unix.EINVAL
	}
	for _, f := range s.files {
		if f.token == token {
			return unix.EEXIST
		}
	}
	if len(s.files) >= MaxFilesPerSession {
		return unix.ENOSPC
	}
	file, err := fdt.FileFromFD(fd)
	if err != nil {
		return err
	}
	l.filesMu.Lock()
	h := l.handlerForLocked(file)
	if h == nil {
		l.filesMu.Unlock()
		drop = file
		return unix.ENOENT
	}
	if _, ok := l.preserved[file]; ok {
		l.filesMu.Unlock()
		drop = file
		return unix.EBUSY
	}
	l.preserved[file] = struct{}{}
	l.filesMu.Unlock()

	lf := &luoFile{token: token, handler: h, file: file}
	args := FileOpArgs{Handler: h, File: file}
	if err = h.Ops.Preserve(&args); err != nil {
		l.filesMu.Lock()
		delete(l.preserved, file)
		l.filesMu.Unlock()
		drop = file
		return err
	}
	lf.serializedData, lf.privateData = args.SerializedData, args.PrivateData
	// The handler's records are complete: publishing the file record
	// makes the preservation one a crash keeps.
	l.recMu.Lock()
	err = l.addFileRecordLocked(s, lf)
	l.recMu.Unlock()
	if err != nil {
		h.Ops.Unpreserve(&args)
		l.filesMu.Lock()
		delete(l.preserved, file)
		l.filesMu.Unlock()
		drop = file
		return errnoFor(err, unix.ENOMEM)
	}
	s.files = append(s.files, lf)
	return nil
}

// unpreserveFilesLocked mirrors luo_file_unpreserve_files: every file is
// unpreserved, last preserved first, and LUO drops its reference.
//
// +checklocks:s.mu
func (s *Session) unpreserveFilesLocked() {
	for len(s.files) > 0 {
		lf := s.files[len(s.files)-1]
		s.files = s.files[:len(s.files)-1]
		args := lf.args()
		lf.handler.Ops.Unpreserve(&args)
		s.luo.dropFile(lf.file)
	}
}

// dropFile forgets a file LUO managed and drops LUO's reference.
func (l *LUO) dropFile(f File) {
	l.filesMu.Lock()
	delete(l.preserved, f)
	l.filesMu.Unlock()
	f.DecRef()
}

// retrieveFD mirrors luo_session_retrieve_fd and luo_retrieve_file: ENOENT
// for an unknown token; a file retrieved before is returned again (a new
// fd to the same file); a retrieve that failed before fails again with the
// same error without being retried. Retrieving from an outgoing session is
// EINVAL.
func (s *Session) retrieveFD(fdt FDTable, token uint64) (int32, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.incoming {
		return -1, unix.EINVAL
	}
	var lf *luoFile
	for _, f := range s.files {
		if f.token == token {
			lf = f
			break
		}
	}
	if lf == nil {
		return -1, unix.ENOENT
	}
	switch {
	case lf.retrieveStatus < 0:
		return -1, lf.retrieveErr
	case lf.retrieveStatus == 0:
		args := lf.args()
		err := lf.handler.Ops.Retrieve(&args)
		// What the handler keeps until finish, whether the retrieve
		// worked or not (memfd, for a carried handover).
		lf.privateData = args.PrivateData
		if err != nil {
			lf.retrieveStatus, lf.retrieveErr = -errnoOf(err), err
			return -1, err
		}
		// LUO keeps the handler's reference until finish.
		lf.file = args.File
		lf.retrieveStatus = 1
		s.luo.filesMu.Lock()
		s.luo.preserved[lf.file] = struct{}{}
		s.luo.filesMu.Unlock()
	}
	return fdt.InstallFD(lf.file, true)
}

// errnoFor returns the errno inside err, or def: what a guest sees of an
// internal error.
func errnoFor(err error, def unix.Errno) unix.Errno {
	var e unix.Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	return def
}

// errnoOf returns the errno inside err, or EIO.
func errnoOf(err error) int {
	var e unix.Errno
	if errors.As(err, &e) && e != 0 {
		return int(e)
	}
	return int(unix.EIO)
}

// Finish mirrors LIVEUPDATE_SESSION_FINISH (luo_file_finish): every file's
// CanFinish is asked first and any refusal fails the whole finish with
// EBUSY, changing nothing; then every file is finished, last first,
// including files never retrieved (their handler frees what they held),
// and LUO drops its references. Finishing an empty session succeeds.
// Finishing an outgoing session is EINVAL.
func (s *Session) Finish() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.incoming {
		return unix.EINVAL
	}
	return s.finishLocked()
}

// finishLocked mirrors luo_file_finish.
//
// +checklocks:s.mu
func (s *Session) finishLocked() error {
	for _, lf := range s.files {
		if lf.handler.Ops.CanFinish == nil {
			continue
		}
		args := lf.args()
		if !lf.handler.Ops.CanFinish(&args) {
			return unix.EBUSY
		}
	}
	// A carried session's record goes first: from here a crash has lost
	// the session, as the finish will have (carry.go).
	s.luo.recMu.Lock()
	err := s.luo.removeSessionRecordLocked(s)
	s.luo.recMu.Unlock()
	if err != nil {
		// Nothing finished: the guest may try again.
		return errnoFor(err, unix.ENOMEM)
	}
	for len(s.files) > 0 {
		lf := s.files[len(s.files)-1]
		s.files = s.files[:len(s.files)-1]
		args := lf.args()
		lf.handler.Ops.Finish(&args)
		if lf.file != nil {
			s.luo.dropFile(lf.file)
		}
	}
	return nil
}
