package luo

import (
	"fmt"
	"sync/atomic"

	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"golang.org/x/sys/unix"
)

// Device is an open /dev/liveupdate (luo_fops in luo_core.c).
type Device struct {
	vfsDefaults
	luo  *LUO
	refs atomic.Int64
}

// IncRef takes a reference on the open device (dup).
func (d *Device) IncRef() { d.refs.Add(1) }

// DecRef drops a reference; the last one closes the device, freeing the
// single-open slot (luo_release). Sessions live on.
func (d *Device) DecRef() {
	if d.refs.Add(-1) != 0 {
		return
	}
	l := d.luo
	l.mu.Lock()
	l.deviceOpen = false
	l.mu.Unlock()
}

// sessionType is enum luo_ioctl_type: the sessions a session ioctl applies
// to.
type sessionType int

const (
	// anySession ioctls work on every session (LUO_IOCTL_ALL), and every
	// device ioctl.
	anySession sessionType = iota
	// incomingSession ioctls work only on a retrieved incoming session
	// (LUO_IOCTL_INCOMING).
	incomingSession
	// outgoingSession ioctls work only on a session created in this
	// sentry (LUO_IOCTL_OUTGOING).
	outgoingSession
)

// ioctlOp is struct luo_ioctl_op.
type ioctlOp struct {
	size, minSize int
	num           uint32
	typ           sessionType
}

// deviceOps is luo_ioctl_ops, indexed by nr - LIVEUPDATE_CMD_BASE.
var deviceOps = [...]ioctlOp{
	{size: abiluo.CreateSessionSize, minSize: abiluo.CreateSessionSize, num: abiluo.IoctlCreateSession},
	{size: abiluo.RetrieveSessionSize, minSize: abiluo.RetrieveSessionSize, num: abiluo.IoctlRetrieveSession},
}

// sessionOps is luo_session_ioctl_ops, indexed by nr -
// LIVEUPDATE_CMD_SESSION_BASE, with the session type each applies to
// ("liveupdate: validate session type before performing operation",
// 2026, for stable) and GET_NAME (d6b3d47bdaf8, for every session).
var sessionOps = [...]ioctlOp{
	{size: abiluo.SessionPreserveFDSize, minSize: abiluo.SessionPreserveFDSize, num: abiluo.IoctlSessionPreserve, typ: outgoingSession},
	{size: abiluo.SessionRetrieveFDSize, minSize: abiluo.SessionRetrieveFDSize, num: abiluo.IoctlSessionRetrieve, typ: incomingSession},
	{size: abiluo.SessionFinishSize, minSize: abiluo.SessionFinishSize, num: abiluo.IoctlSessionFinish, typ: incomingSession},
	{size: abiluo.SessionGetNameSize, minSize: abiluo.SessionGetNameSize, num: abiluo.IoctlSessionGetName, typ: anySession},
}

// decodeIoctl mirrors the common part of luo_ioctl and luo_session_ioctl:
// nr outside the table is EINVAL; an unreadable size is EFAULT; a number
// whose nr matches but whose other bits do not is ENOTTY (-ENOIOCTLCMD); an
// op for the other kind of session is EINVAL (luo_ioctl_type_valid; incoming
// says whether the session is an incoming one); a size below the struct's
// minimum is EINVAL; a larger struct with non-zero bytes past ours is E2BIG.
// It returns the op's index, the kernel copy of the struct and the user's
// size.
func decodeIoctl(ops []ioctlOp, base, cmd uint32, arg []byte, incoming bool) (int, []byte, uint32, error) {
	nr := abiluo.IocNr(cmd)
	if nr-base >= uint32(len(ops)) || nr < base {
		return 0, nil, 0, unix.EINVAL
	}
	usize, err := abiluo.UserSize(arg)
	if err != nil {
		return 0, nil, 0, err
	}
	i := int(nr - base)
	op := ops[i]
	if op.num != cmd {
		return 0, nil, 0, unix.ENOTTY
	}
	if (op.typ == incomingSession && !incoming) || (op.typ == outgoingSession && incoming) {
		return 0, nil, 0, unix.EINVAL
	}
	if usize < uint32(op.minSize) {
		return 0, nil, 0, unix.EINVAL
	}
	k, err := abiluo.CopyStructFromUser(op.size, arg)
	if err != nil {
		return 0, nil, 0, err
	}
	return i, k, usize, nil
}

// Ioctl runs an ioctl on /dev/liveupdate (luo_ioctl). arg is the user's
// struct as bytes; the result is the reply to copy back, min(user size,
// kernel size) bytes. New session fds go into fdt with FD_CLOEXEC.
//
// CREATE_SESSION refuses an empty name and a name that fills all 64 bytes
// without a NUL with EINVAL (luo_session_create, "liveupdate: reject
// LIVEUPDATE_IOCTL_CREATE_SESSION with invalid name length"). RETRIEVE_SESSION
// compares all 64 bytes (strncmp), so a name without a NUL matches no
// session: ENOENT.
func (d *Device) Ioctl(fdt FDTable, cmd uint32, arg []byte) ([]byte, error) {
	i, k, usize, err := decodeIoctl(deviceOps[:], abiluo.CmdBase, cmd, arg, false)
	if err != nil {
		return nil, err
	}
	var s abiluo.CreateSession
	if err := s.Decode(k); err != nil {
		return nil, err
	}
	n := abiluo.StrNLen(s.Name[:])
	name := string(s.Name[:n])
	var fd int32
	switch i {
	case 0:
		if n == 0 || n > abiluo.SessionNameLength-1 {
			return nil, unix.EINVAL
		}
		fd, err = d.luo.createSession(fdt, name)
	case 1:
		if n > abiluo.SessionNameLength-1 {
			return nil, unix.ENOENT
		}
		fd, err = d.luo.retrieveSession(fdt, name)
	}
	if err != nil {
		return nil, err
	}
	s.FD = fd
	if err := s.Encode(k); err != nil {
		return nil, err
	}
	return abiluo.Respond(k, usize), nil
}

// createSession mirrors luo_session_create: EEXIST for a name already in
// the outgoing list, ENOMEM beyond MaxSessions, EBUSY while serialized.
func (l *LUO) createSession(fdt FDTable, name string) (int32, error) {
	l.mu.Lock()
	if l.serialized != nil {
		l.mu.Unlock()
		return -1, unix.EBUSY
	}
	// luo_session_insert checks the limit before the name.
	if len(l.outgoing) >= MaxSessions {
		l.mu.Unlock()
		return -1, unix.ENOMEM
	}
	if _, ok := l.outgoingNames[name]; ok {
		l.mu.Unlock()
		return -1, unix.EEXIST
	}
	s := &Session{luo: l, name: name}
	l.recMu.Lock()
	err := l.unpublishIncomingLocked(name)
	if err == nil {
		err = l.addSessionRecordLocked(s)
	}
	l.recMu.Unlock()
	if err != nil {
		l.mu.Unlock()
		return -1, errnoFor(err, unix.ENOMEM)
	}
	l.outgoing = append(l.outgoing, s)
	l.outgoingNames[name] = s
	l.mu.Unlock()

	fd, err := fdt.InstallFD(s, true)
	if err != nil {
		l.mu.Lock()
		l.recMu.Lock()
		// Records holding s have a spare: this cannot fail.
		_ = l.removeSessionRecordLocked(s)
		l.recMu.Unlock()
		l.removeOutgoingLocked(s)
		l.mu.Unlock()
		return -1, err
	}
	return fd, nil
}

// retrieveSession mirrors luo_session_retrieve: ENOENT if no incoming
// session has the name, EINVAL if it was retrieved already.
func (l *LUO) retrieveSession(fdt FDTable, name string) (int32, error) {
	l.mu.Lock()
	var s *Session
	for _, o := range l.incoming {
		if o.name == name {
			s = o
			break
		}
	}
	if s == nil {
		l.mu.Unlock()
		return -1, unix.ENOENT
	}
	s.mu.Lock()
	if s.retrieved {
		s.mu.Unlock()
		l.mu.Unlock()
		return -1, unix.EINVAL
	}
	s.retrieved = true
	s.mu.Unlock()
	l.mu.Unlock()

	fd, err := fdt.InstallFD(s, true)
	if err != nil {
		s.mu.Lock()
		s.retrieved = false
		s.mu.Unlock()
		return -1, err
	}
	return fd, nil
}

// removeOutgoingLocked removes s from the outgoing sessions.
//
// +checklocks:l.mu
func (l *LUO) removeOutgoingLocked(s *Session) {
	delete(l.outgoingNames, s.name)
	l.outgoing = removeSession(l.outgoing, s)
}

// removeIncomingLocked removes s from the incoming sessions.
//
// +checklocks:l.mu
func (l *LUO) removeIncomingLocked(s *Session) {
	l.incoming = removeSession(l.incoming, s)
}

// removeSession returns list without s, which it must hold.
func removeSession(list []*Session, s *Session) []*Session {
	for i, o := range list {
		if o == s {
			return append(list[:i], list[i+1:]...)
		}
	}
	panic(fmt.Sprintf("luo: session %q is not in its list", s.name))
}
