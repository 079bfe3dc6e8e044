// Package luo holds the byte layouts of Linux's Live Update Orchestrator:
// the /dev/liveupdate ioctl structures (include/uapi/linux/liveupdate.h,
// v6.19 plus LIVEUPDATE_SESSION_GET_NAME of 2026) and the records LUO hands
// to the next kernel (include/linux/kho/abi/luo.h, "luo-v1" with
// "luo-session-v2"). It has no behaviour beyond encoding and decoding with
// size checks.
package luo

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// Ioctl numbers. All LUO ioctls are _IO(0xBA, nr): no size or direction
// bits.
const (
	IoctlType = 0xBA

	CmdBase        = 0x00 // LIVEUPDATE_CMD_BASE
	CmdSessionBase = 0x40 // LIVEUPDATE_CMD_SESSION_BASE

	IoctlCreateSession    = IoctlType<<8 | (CmdBase + 0x00)        // LIVEUPDATE_IOCTL_CREATE_SESSION
	IoctlRetrieveSession  = IoctlType<<8 | (CmdBase + 0x01)        // LIVEUPDATE_IOCTL_RETRIEVE_SESSION
	IoctlSessionPreserve  = IoctlType<<8 | (CmdSessionBase + 0x00) // LIVEUPDATE_SESSION_PRESERVE_FD
	IoctlSessionRetrieve  = IoctlType<<8 | (CmdSessionBase + 0x01) // LIVEUPDATE_SESSION_RETRIEVE_FD
	IoctlSessionFinish    = IoctlType<<8 | (CmdSessionBase + 0x02) // LIVEUPDATE_SESSION_FINISH
	IoctlSessionGetName   = IoctlType<<8 | (CmdSessionBase + 0x03) // LIVEUPDATE_SESSION_GET_NAME
	SessionNameLength     = 64                                     // LIVEUPDATE_SESSION_NAME_LENGTH, with the NUL
	CreateSessionSize     = 72                                     // sizeof(struct liveupdate_ioctl_create_session)
	RetrieveSessionSize   = 72                                     // sizeof(struct liveupdate_ioctl_retrieve_session)
	SessionPreserveFDSize = 16                                     // sizeof(struct liveupdate_session_preserve_fd)
	SessionRetrieveFDSize = 16                                     // sizeof(struct liveupdate_session_retrieve_fd)
	SessionFinishSize     = 8                                      // sizeof(struct liveupdate_session_finish)
	// SessionGetNameSize is sizeof(struct liveupdate_session_get_name)
	// {size, reserved, name[64]} as merged ("liveupdate: add
	// LIVEUPDATE_SESSION_GET_NAME ioctl", d6b3d47bdaf8 in the liveupdate
	// tree, pulled into linux-next). A first version without reserved (68
	// bytes) sat in the mm tree for a while and was replaced.
	SessionGetNameSize = 72
)

// IocNr returns _IOC_NR(cmd), the low 8 bits of an ioctl number.
func IocNr(cmd uint32) uint32 { return cmd & 0xff }

// CopyStructFromUser mirrors Linux's copy_struct_from_user: it copies the
// user's struct (arg, whose first u32 is its size as userspace knows it)
// into a kernel struct of ksize bytes. A smaller user struct is
// zero-extended; a larger one must have only zero bytes past ksize, else
// E2BIG. arg shorter than the size it declares is EFAULT (the kernel would
// fault reading past the user's buffer).
//
// The caller checks the user size against the struct's minimum first.
func CopyStructFromUser(ksize int, arg []byte) ([]byte, error) {
	usize, err := UserSize(arg)
	if err != nil {
		return nil, err
	}
	if uint64(usize) > uint64(len(arg)) {
		return nil, unix.EFAULT
	}
	k := make([]byte, ksize)
	n := copy(k, arg[:usize])
	for _, b := range arg[n:usize] {
		if b != 0 {
			return nil, unix.E2BIG
		}
	}
	return k, nil
}

// UserSize reads the size field that starts every LUO ioctl struct, like
// get_user(ucmd.user_size, ...). Fewer than four bytes is EFAULT.
func UserSize(arg []byte) (uint32, error) {
	if len(arg) < 4 {
		return 0, unix.EFAULT
	}
	return binary.LittleEndian.Uint32(arg), nil
}

// Respond mirrors luo_ucmd_respond: the reply is the kernel struct cut to
// min(user size, kernel size) bytes.
func Respond(k []byte, usize uint32) []byte {
	if uint64(usize) < uint64(len(k)) {
		return k[:usize]
	}
	return k
}

// CreateSession is struct liveupdate_ioctl_create_session (and, with the
// same layout, struct liveupdate_ioctl_retrieve_session).
type CreateSession struct {
	Size uint32
	FD   int32 // out
	Name [SessionNameLength]byte
}

// Decode reads s from a 72-byte kernel copy.
func (s *CreateSession) Decode(b []byte) error {
	if len(b) < CreateSessionSize {
		return short("liveupdate_ioctl_create_session", len(b), CreateSessionSize)
	}
	s.Size = binary.LittleEndian.Uint32(b[0:])
	s.FD = int32(binary.LittleEndian.Uint32(b[4:]))
	copy(s.Name[:], b[8:72])
	return nil
}

// Encode writes s into the first 72 bytes of b.
func (s *CreateSession) Encode(b []byte) error {
	if len(b) < CreateSessionSize {
		return short("liveupdate_ioctl_create_session", len(b), CreateSessionSize)
	}
	binary.LittleEndian.PutUint32(b[0:], s.Size)
	binary.LittleEndian.PutUint32(b[4:], uint32(s.FD))
	copy(b[8:72], s.Name[:])
	return nil
}

// SessionFD is struct liveupdate_session_preserve_fd and struct
// liveupdate_session_retrieve_fd, which share one layout.
type SessionFD struct {
	Size  uint32
	FD    int32
	Token uint64
}

// Decode reads s from a 16-byte kernel copy.
func (s *SessionFD) Decode(b []byte) error {
	if len(b) < SessionPreserveFDSize {
		return short("liveupdate_session_preserve_fd", len(b), SessionPreserveFDSize)
	}
	s.Size = binary.LittleEndian.Uint32(b[0:])
	s.FD = int32(binary.LittleEndian.Uint32(b[4:]))
	s.Token = binary.LittleEndian.Uint64(b[8:])
	return nil
}

// Encode writes s into the first 16 bytes of b.
func (s *SessionFD) Encode(b []byte) error {
	if len(b) < SessionPreserveFDSize {
		return short("liveupdate_session_preserve_fd", len(b), SessionPreserveFDSize)
	}
	binary.LittleEndian.PutUint32(b[0:], s.Size)
	binary.LittleEndian.PutUint32(b[4:], uint32(s.FD))
	binary.LittleEndian.PutUint64(b[8:], s.Token)
	return nil
}

// SessionFinish is struct liveupdate_session_finish.
type SessionFinish struct {
	Size     uint32
	Reserved uint32 // documented "must be zero"; LUO answers EINVAL otherwise
}

// Decode reads s from an 8-byte kernel copy.
func (s *SessionFinish) Decode(b []byte) error {
	if len(b) < SessionFinishSize {
		return short("liveupdate_session_finish", len(b), SessionFinishSize)
	}
	s.Size = binary.LittleEndian.Uint32(b[0:])
	s.Reserved = binary.LittleEndian.Uint32(b[4:])
	return nil
}

// Encode writes s into the first 8 bytes of b.
func (s *SessionFinish) Encode(b []byte) error {
	if len(b) < SessionFinishSize {
		return short("liveupdate_session_finish", len(b), SessionFinishSize)
	}
	binary.LittleEndian.PutUint32(b[0:], s.Size)
	binary.LittleEndian.PutUint32(b[4:], s.Reserved)
	return nil
}

// SessionGetName is struct liveupdate_session_get_name.
type SessionGetName struct {
	Size     uint32
	Reserved uint32 // must be zero, else EINVAL
	Name     [SessionNameLength]byte
}

// Decode reads s from a 72-byte kernel copy.
func (s *SessionGetName) Decode(b []byte) error {
	if len(b) < SessionGetNameSize {
		return short("liveupdate_session_get_name", len(b), SessionGetNameSize)
	}
	s.Size = binary.LittleEndian.Uint32(b[0:])
	s.Reserved = binary.LittleEndian.Uint32(b[4:])
	copy(s.Name[:], b[8:72])
	return nil
}

// Encode writes s into the first 72 bytes of b.
func (s *SessionGetName) Encode(b []byte) error {
	if len(b) < SessionGetNameSize {
		return short("liveupdate_session_get_name", len(b), SessionGetNameSize)
	}
	binary.LittleEndian.PutUint32(b[0:], s.Size)
	binary.LittleEndian.PutUint32(b[4:], s.Reserved)
	copy(b[8:72], s.Name[:])
	return nil
}

// StrNLen mirrors strnlen(b, len(b)): the length of the C string in b, or
// len(b) if b holds no NUL.
func StrNLen(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return len(b)
}

// CString returns the bytes of b up to its first NUL, or all of b.
func CString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// StrScpy mirrors strscpy(dst, src, len(dst)): it copies at most
// len(dst)-1 bytes of the C string src and NUL-terminates dst, truncating
// silently.
func StrScpy(dst []byte, src string) {
	n := copy(dst[:len(dst)-1], src)
	clear(dst[n:])
}

func short(what string, got, want int) error {
	return fmt.Errorf("%s: %d bytes, want %d: %w", what, got, want, unix.EINVAL)
}
