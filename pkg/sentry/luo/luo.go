// Package luo is the Live Update Orchestrator: /dev/liveupdate, sessions of
// preserved files, and the file-handler state machine (preserve, freeze,
// unfreeze, retrieve, finish, unpreserve), mirroring Linux v6.19
// kernel/liveupdate/luo_{core,session,file}.c, with the 2026 uapi
// (LIVEUPDATE_SESSION_GET_NAME, session name checks, session types), on top
// of pkg/sentry/kho.
//
// LUO core never knows what a memfd is: file types register a FileHandler,
// an ops table keyed by a compatible string, as in Linux.
//
// Formats. Every record is named by a compatible string. Formats lists the
// strings this build reads and writes, per subsystem: the LUO FDT
// ("luo-v1"), its session node ("luo-session-v2") and each family of file
// handlers (memfd: "memfd-v2", "memfd-v1"). Deserialize reads every format
// a registered handler reads; SerializeWith writes, per subsystem, the
// newest format the next sentry reads.
//
// A sentry's LUO goes through these phases:
//
//   - Running: guests create sessions and preserve files through the
//     device and session ioctls. Preservation does the heavy work.
//   - Serialize (restart, inside the blackout): every preserved file is
//     frozen in session order and preservation order; the first failure
//     unfreezes what was frozen, in reverse, and fails the restart. Then the
//     session and file records are written to preserved memory and a "LUO"
//     KHO subtree points at them. Abort undoes a successful Serialize when
//     the next sentry refuses the handover.
//   - Deserialize (live-update boot of the next sentry, before it
//     acknowledges the handover): the records are read, validated and
//     matched with handlers. Linux does this at the first open of
//     /dev/liveupdate and panics on corrupt state; we do it at boot so
//     that a bad or incompatible handover is refused while the previous
//     sentry can still resume.
//
// Lock order:
//
//	LUO.mu
//	  Session.mu
//	    LUO.recMu
//	    LUO.filesMu
package luo

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/vfs"
	"golang.org/x/sys/unix"
)

// File is an open file description (vfs.FileDescription): what LUO
// preserves and what its ioctls install. LUO itself uses only its
// references: it holds one on a preserved file from preserve until
// unpreserve or finish, as Linux holds an fget reference.
type File = vfs.FileDescription

// FDTable is the calling guest's file descriptor table.
type FDTable = vfs.FDTable

// FileOpArgs is struct liveupdate_file_op_args: what a handler's ops see.
type FileOpArgs struct {
	// Handler is the handler the op belongs to.
	Handler *FileHandler
	// RetrieveStatus is 0 if retrieve was never attempted, 1 if it
	// succeeded and a negative errno if it failed (v7.0 / 6.19.y
	// retrieve_status, which replaced the bool "retrieved").
	RetrieveStatus int
	// File is the preserved file (in), or the retrieved one (retrieve:
	// out).
	File File
	// SerializedData is the handler's opaque handle, usually the address
	// of its record in preserved memory. Preserve sets it; freeze may
	// update it.
	SerializedData uint64
	// PrivateData is runtime-only state set by preserve and passed to
	// freeze, unfreeze and unpreserve.
	PrivateData any
}

// FileOps is struct liveupdate_file_ops. CanPreserve, Preserve, Unpreserve,
// Retrieve and Finish are required; Freeze, Unfreeze and CanFinish are
// optional and may be nil.
type FileOps struct {
	CanPreserve func(h *FileHandler, f File) bool
	Preserve    func(args *FileOpArgs) error
	Unpreserve  func(args *FileOpArgs)
	Freeze      func(args *FileOpArgs) error
	Unfreeze    func(args *FileOpArgs)
	Retrieve    func(args *FileOpArgs) error
	CanFinish   func(args *FileOpArgs) bool
	Finish      func(args *FileOpArgs)
}

// FileHandler is struct liveupdate_file_handler: the ops of one file type
// and the compatible string that names its serialized format.
type FileHandler struct {
	Compatible string
	Ops        *FileOps
	// Family names the file type when several handlers serve it in
	// different formats (memfd: "memfd-v2" and "memfd-v1"). Handlers of one
	// family share their private data: any of them may freeze, unfreeze
	// and unpreserve a file another preserved, and its Freeze (required)
	// writes the file's record in its own format. Registration order is
	// preference order, newest format first. Empty means a family of one,
	// named by the compatible string.
	Family string
}

// familyName returns the name of h's family.
func familyName(h *FileHandler) string {
	if h.Family == "" {
		return h.Compatible
	}
	return h.Family
}

const (
	// maxRecordBytes is the largest record array one AllocPreserve can
	// hold (an order-10 folio).
	maxRecordBytes = 4 << 20
	// MaxSessions is the most outgoing sessions (LUO_SESSION_MAX): as many
	// luo_session_ser records as fit with their header in 4 MiB. Linux
	// v6.19 has 16 pages (819 sessions); the 2026 block ABI lifts the
	// limit, and the selftests create 2000.
	MaxSessions = (maxRecordBytes - abiluo.SessionHeaderSerSize) / abiluo.SessionSerSize
	// MaxFilesPerSession is the most files in one session (LUO_FILE_MAX):
	// as many luo_file_ser records as fit in 4 MiB. Linux v6.19 has 2
	// pages (128 files); the selftests preserve 500.
	MaxFilesPerSession = maxRecordBytes / abiluo.FileSerSize
)

// LUO is one sentry's Live Update Orchestrator.
type LUO struct {
	kho *kho.KHO

	mu sync.Mutex

	// +checklocks:mu
	outgoing []*Session
	// outgoingNames indexes outgoing by name.
	//
	// +checklocks:mu
	outgoingNames map[string]*Session
	// +checklocks:mu
	incoming []*Session
	// liveupdateNum counts the live updates before this sentry: 0 after a
	// cold boot, the incoming liveupdate-number after a live one.
	//
	// +checklocks:mu
	liveupdateNum uint64
	// +checklocks:mu
	deviceOpen bool
	// deserialized is set once Deserialize has run.
	//
	// +checklocks:mu
	deserialized bool
	// incomingRecords are the blocks the previous sentry's records were
	// read from, restored by Deserialize and freed by
	// ReleaseIncomingRecords, after the restart's blackout.
	//
	// +checklocks:mu
	incomingRecords []pgalloc.Folio
	// serialized holds what a successful Serialize wrote, until Abort.
	//
	// +checklocks:mu
	serialized *serialized
	// frozen is set from the start of a serialization until it fails or
	// Abort undoes it, for readers that hold a session's mu rather than
	// mu: PRESERVE_FD checks it under the session's mu, and Serialize
	// takes each session's mu after setting it, so no file is added to a
	// session once it has been frozen.
	frozen atomic.Bool
	// closedWhileSerialized holds outgoing sessions whose last fd went
	// while serialized: released by Abort, dropped with the sentry
	// otherwise.
	//
	// +checklocks:mu
	closedWhileSerialized []*Session

	// recMu guards the records in preserved memory (records.go) and each
	// session's part of them (Session.rec).
	recMu sync.Mutex

	// rec is the outgoing state in preserved memory, nil until the first
	// session (or Serialize) makes it, or Deserialize carries the
	// incoming one (carry.go).
	//
	// +checklocks:recMu
	rec *records
	// carried is set when rec was carried over from the previous sentry;
	// settled once Settle has run.
	//
	// +checklocks:recMu
	carried bool
	// +checklocks:recMu
	settled bool
	// carriedNum is the liveupdate-number the carried FDT came with;
	// bumped is set once it holds carriedNum + 1 (carry.go).
	//
	// +checklocks:recMu
	carriedNum uint64
	// +checklocks:recMu
	bumped bool

	filesMu sync.Mutex

	// handlers in registration order.
	//
	// +checklocks:filesMu
	handlers []*FileHandler
	// preserved holds every file LUO manages, in any session, outgoing
	// or retrieved: the same file cannot be preserved twice.
	//
	// +checklocks:filesMu
	preserved map[File]struct{}
}

// New returns the LUO of a sentry, over its KHO.
func New(k *kho.KHO) *LUO {
	return &LUO{kho: k, preserved: make(map[File]struct{}), outgoingNames: make(map[string]*Session)}
}

// RegisterFileHandler mirrors liveupdate_register_file_handler: EINVAL for
// a missing required op or a compatible string that is empty or does not
// fit LIVEUPDATE_HNDL_COMPAT_LENGTH, EBUSY while any session exists, EEXIST
// for a compatible string already registered.
func (l *LUO) RegisterFileHandler(h *FileHandler) error {
	if h == nil || h.Ops == nil || h.Ops.CanPreserve == nil || h.Ops.Preserve == nil ||
		h.Ops.Unpreserve == nil || h.Ops.Retrieve == nil || h.Ops.Finish == nil {
		return fmt.Errorf("registering a file handler without every required op: %w", unix.EINVAL)
	}
	if h.Compatible == "" || len(h.Compatible) >= abiluo.HandlerCompatLength {
		return fmt.Errorf("registering file handler %q: compatible must be 1 to %d bytes: %w", h.Compatible, abiluo.HandlerCompatLength-1, unix.EINVAL)
	}
	if h.Family != "" && h.Ops.Freeze == nil {
		return fmt.Errorf("registering file handler %q of family %q without Freeze, which writes its format: %w", h.Compatible, h.Family, unix.EINVAL)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.outgoing) > 0 || len(l.incoming) > 0 {
		return fmt.Errorf("registering file handler %q while sessions exist: %w", h.Compatible, unix.EBUSY)
	}
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	for _, o := range l.handlers {
		if o.Compatible == h.Compatible {
			return fmt.Errorf("registering file handler %q twice: %w", h.Compatible, unix.EEXIST)
		}
	}
	l.handlers = append(l.handlers, h)
	return nil
}

// UnregisterFileHandler mirrors liveupdate_unregister_file_handler: EBUSY
// while any session exists, ENOENT if h is not registered.
func (l *LUO) UnregisterFileHandler(h *FileHandler) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.outgoing) > 0 || len(l.incoming) > 0 {
		return fmt.Errorf("unregistering file handler %q while sessions exist: %w", h.Compatible, unix.EBUSY)
	}
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	for i, o := range l.handlers {
		if o == h {
			l.handlers = append(l.handlers[:i], l.handlers[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("unregistering file handler %q, which is not registered: %w", h.Compatible, unix.ENOENT)
}

// handlerForLocked returns the first registered handler that can preserve
// f.
//
// +checklocks:l.filesMu
func (l *LUO) handlerForLocked(f File) *FileHandler {
	for _, h := range l.handlers {
		if h.Ops.CanPreserve(h, f) {
			return h
		}
	}
	return nil
}

// handlerByCompatible returns the handler registered under compatible.
func (l *LUO) handlerByCompatible(compatible string) *FileHandler {
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	for _, h := range l.handlers {
		if h.Compatible == compatible {
			return h
		}
	}
	return nil
}

// family returns the registered handlers of h's family, in registration
// order.
func (l *LUO) family(h *FileHandler) []*FileHandler {
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	var hs []*FileHandler
	for _, o := range l.handlers {
		if familyName(o) == familyName(h) {
			hs = append(hs, o)
		}
	}
	return hs
}

// Format lists the compatible strings of one subsystem that this build
// reads and writes.
type Format struct {
	// Subsystem is "luo" (the LUO FDT), "luo-session" (its session node)
	// or the family of a file handler ("memfd").
	Subsystem string `json:"subsystem"`
	// Reads are the compatible strings Deserialize accepts.
	Reads []string `json:"reads"`
	// Writes are the compatible strings SerializeWith can write, newest
	// (preferred) first.
	Writes []string `json:"writes"`
}

// Formats returns the formats of this build: the LUO FDT, the session node,
// then one entry per family of registered file handlers, in registration
// order. The next step of a restart gives the next sentry's Reads, all
// together, to SerializeWith.
func (l *LUO) Formats() []Format {
	fs := []Format{
		{Subsystem: "luo", Reads: []string{abiluo.FDTCompatible}, Writes: []string{abiluo.FDTCompatible}},
		{Subsystem: abiluo.FDTSessionNode, Reads: []string{abiluo.FDTSessionCompatible}, Writes: []string{abiluo.FDTSessionCompatible}},
	}
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	index := map[string]int{}
	for _, h := range l.handlers {
		name := familyName(h)
		i, ok := index[name]
		if !ok {
			i = len(fs)
			index[name] = i
			fs = append(fs, Format{Subsystem: name})
		}
		fs[i].Reads = append(fs[i].Reads, h.Compatible)
		fs[i].Writes = append(fs[i].Writes, h.Compatible)
	}
	return fs
}

// compatibles returns the registered compatible strings, for errors.
func (l *LUO) compatibles() []string {
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	var cs []string
	for _, h := range l.handlers {
		cs = append(cs, h.Compatible)
	}
	return cs
}

// LiveupdateNumber returns the number of live updates before this sentry.
func (l *LUO) LiveupdateNumber() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.liveupdateNum
}

// OpenDevice opens /dev/liveupdate. Only one open file may exist at a
// time: a second open fails with EBUSY until the first is closed (its last
// reference dropped). Closing it does not affect sessions.
func (l *LUO) OpenDevice() (*Device, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.deviceOpen {
		return nil, unix.EBUSY
	}
	l.deviceOpen = true
	d := &Device{luo: l}
	d.refs.Store(1)
	return d, nil
}

// Status describes LUO's state for runsc-luo's "luo status".
type Status struct {
	LiveupdateNumber uint64          `json:"liveupdate_number"`
	Serialized       bool            `json:"serialized"`
	DeviceOpen       bool            `json:"device_open"`
	Handlers         []string        `json:"handlers"`
	Sessions         []SessionStatus `json:"sessions"`
}

// SessionStatus describes one session.
type SessionStatus struct {
	Name      string       `json:"name"`
	Direction string       `json:"direction"` // "outgoing" or "incoming"
	Retrieved bool         `json:"retrieved,omitempty"`
	Files     []FileStatus `json:"files"`
}

// FileStatus describes one preserved file.
type FileStatus struct {
	Token      uint64 `json:"token"`
	Compatible string `json:"compatible"`
	// State is "preserved", "frozen", "not retrieved", "retrieved" or
	// "retrieve failed: <error>".
	State string `json:"state"`
	// Bytes is the file's size and AllocatedBytes the memory it holds
	// (st_blocks), both known while LUO holds the file itself: preserved
	// (outgoing) or retrieved; nil for an incoming file not retrieved yet.
	Bytes          *int64 `json:"bytes,omitempty"`
	AllocatedBytes *int64 `json:"allocated_bytes,omitempty"`
}

// Status returns a snapshot of every session and file.
func (l *LUO) Status() Status {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := Status{
		LiveupdateNumber: l.liveupdateNum,
		Serialized:       l.serialized != nil,
		DeviceOpen:       l.deviceOpen,
		Handlers:         l.compatibles(),
	}
	for _, s := range l.incoming {
		st.Sessions = append(st.Sessions, s.status("incoming"))
	}
	for _, s := range l.outgoing {
		st.Sessions = append(st.Sessions, s.status("outgoing"))
	}
	return st
}

// status describes s, a session in the dir list.
func (s *Session) status(dir string) SessionStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := SessionStatus{Name: s.name, Direction: dir, Retrieved: s.retrieved, Files: []FileStatus{}}
	for _, f := range s.files {
		fs := FileStatus{Token: f.token, Compatible: f.compatible(), State: f.state()}
		if f.file != nil {
			st := f.file.Stat()
			alloc := st.Blocks * 512
			fs.Bytes, fs.AllocatedBytes = &st.Size, &alloc
		}
		ss.Files = append(ss.Files, fs)
	}
	sort.Slice(ss.Files, func(i, j int) bool { return ss.Files[i].Token < ss.Files[j].Token })
	return ss
}
