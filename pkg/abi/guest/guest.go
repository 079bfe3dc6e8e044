// Package guest is the wire format of the guest protocol: the frames a
// guest program (pkg/guest) and the sentry (pkg/sentry/kernel) exchange over
// one connection of the sandbox's guest socket. It has layouts, constants and
// encode/decode with size checks, and no behaviour.
//
// A connection is one guest process. It starts with a handshake: the guest
// sends a Hello (magic and the protocol version it speaks) and the sentry
// answers with a Hello carrying its own version and an errno (0, or
// EPROTONOSUPPORT when it does not speak the guest's version, after which it
// closes the connection).
//
// Then the guest sends one request at a time: a RequestHeader followed by
// DataLen bytes of payload (a name, a path, ioctl argument bytes, or the
// bytes of a write, which the sentry streams straight into the memfd). The
// sentry answers with zero or more data frames (a ResponseHeader of kind
// KindData followed by Len bytes; read, pread64 and nothing else use them,
// and each is one contiguous run of the memory file written without a copy)
// and then exactly one result frame (KindResult: the call's result or errno
// and Len bytes of reply payload, such as a Stat or the ioctl reply struct).
// A frame the sentry cannot parse gets a KindFatal frame (Len bytes of
// message) and the connection is closed; the sentry and other guests go on.
//
// Version 2 adds memory mappings and process life cycle: mmap answers with
// a KindFile frame whose bytes carry the memory file as SCM_RIGHTS (the
// guest maps the runs of folios it is told straight from it, then closes
// it), KindData frames holding MmapRuns, and the result (the mapping's id);
// munmap unpins; fork, attach and execve keep the fd table and the mappings
// as Linux does across fork and exec.
//
// Version 3 adds restarting calls: a call that a restart's pause
// interrupted (a read or write whose data the guest was still exchanging,
// or any call whose payload had not fully arrived) is answered with the
// errno ErrnoRestart and, as its result, the bytes already done. The data
// frames sent and the bytes written before the interruption count; the
// guest repeats the call for the rest once the sentry serves again, as
// Linux restarts a syscall that returned -ERESTARTSYS. The sentry answers
// older versions as Linux answers a call interrupted by a signal without
// SA_RESTART: the bytes done, or EINTR if none.
//
// The sentry accepts versions MinVersion to Version.
//
// Everything is little-endian.
package guest

import (
	"encoding/binary"
	"fmt"
)

const (
	// Magic opens every Hello.
	Magic = "LSGUEST\x00"
	// Version is the protocol version this package describes.
	Version = 3
	// RestartVersion is the first version whose guests restart interrupted
	// calls (ErrnoRestart).
	RestartVersion = 3
	// ErrnoRestart is the errno of a call interrupted by a pause: Linux's
	// ERESTARTSYS, which its syscalls return to the kernel's signal code
	// and never to a program. The result is the bytes done.
	ErrnoRestart = 512
	// MinVersion is the oldest version the sentry still accepts.
	MinVersion = 1

	// HelloSize is the size of a Hello.
	HelloSize = 16
	// RequestHeaderSize is the size of a RequestHeader.
	RequestHeaderSize = 48
	// ResponseHeaderSize is the size of a ResponseHeader.
	ResponseHeaderSize = 24
	// StatSize is the size of an encoded Stat.
	StatSize = 40
	// MmapRunSize is the size of an encoded MmapRun.
	MmapRunSize = 24
	// MmapReplySize is the size of mmap's reply payload: MmapFlags as a
	// little-endian uint64.
	MmapReplySize = 8
	// MmapMayWrite, in mmap's reply, says the mapping may be made
	// writable later (VM_MAYWRITE): unset for a shared mapping of a
	// write-sealed file, whose mprotect(PROT_WRITE) must fail with EACCES.
	MmapMayWrite = 1

	// ForkTimeoutSeconds is how long the sentry keeps a forked child's copy of
	// the fd table and mappings waiting for the child to attach.
	ForkTimeoutSeconds = 30

	// MaxSmallPayload is the largest payload of a request that is not a
	// write: a name, a path or ioctl argument bytes.
	MaxSmallPayload = 4096
	// MaxWritePayload is the largest payload of write and pwrite64
	// (MAX_RW_COUNT).
	MaxWritePayload = 0x7ffff000
	// MaxReadCount is the largest count read and pread64 accept; larger
	// counts are shortened to it, as Linux does.
	MaxReadCount = 0x7ffff000
	// MaxReplyPayload is the largest payload of a result frame.
	MaxReplyPayload = 4096

	// EnvSocket is the environment variable through which the sentry tells
	// a guest program where its guest socket is.
	EnvSocket = "LIVESENTRY_GUEST_SOCKET"
	// EnvLiveupdateNumber is the environment variable holding the
	// sandbox's liveupdate number when the sentry launched the guest: 0
	// after a cold boot, n after the n-th live restart.
	EnvLiveupdateNumber = "LIVESENTRY_LIVEUPDATE_NUMBER"
	// EnvStartFD names the fd of a guest's start gate: a stream socket on
	// which a guest the sentry started early (a transfer restart's
	// relaunched entrypoint, started before the pause) writes one byte
	// (StartGateWaiting) once it has loaded, then waits for one byte
	// (StartGateOpen) before it runs the program's own code. The sentry
	// opens the gate once the previous sentry's guests are gone; the end
	// of the socket without it means the restart did not happen, and the
	// guest exits. A guest that honours the gate (pkg/guest, the libc
	// shim) says so in its Hello (HelloStartGate), and the sentry starts
	// early only an entrypoint that did.
	EnvStartFD = "LIVESENTRY_START_FD"
	// StartGateWaiting is what a guest writes at the start gate.
	StartGateWaiting = 'w'
	// StartGateOpen is what the sentry writes to open the start gate.
	StartGateOpen = 'g'
	// HelloStartGate, in a guest's Hello flags, says that the guest
	// program waits at a start gate when it is given one (EnvStartFD).
	HelloStartGate = 1
)

// Op is a guest call, named after the Linux system call it mirrors.
type Op uint32

// The guest calls. Args and payload of each are given as (args; payload)
// and the result as what Result holds on success.
const (
	// OpMemfdCreate is memfd_create(name, flags): (flags; name) → fd.
	OpMemfdCreate Op = 1 + iota
	// OpClose is close(fd): (fd) → 0.
	OpClose
	// OpDup is dup(fd): (fd) → new fd.
	OpDup
	// OpDup3 is dup3(oldfd, newfd, flags): (oldfd, newfd, flags) → newfd.
	OpDup3
	// OpRead is read(fd, count): (fd, count) → bytes read, as data frames.
	OpRead
	// OpWrite is write(fd, buf): (fd; bytes) → bytes written.
	OpWrite
	// OpPread64 is pread64(fd, count, off): (fd, count, off) → bytes read,
	// as data frames.
	OpPread64
	// OpPwrite64 is pwrite64(fd, buf, off): (fd, off; bytes) → bytes
	// written.
	OpPwrite64
	// OpLseek is lseek(fd, off, whence): (fd, off, whence) → new offset.
	OpLseek
	// OpFtruncate is ftruncate(fd, length): (fd, length) → 0.
	OpFtruncate
	// OpFallocate is fallocate(fd, mode, off, len): (fd, mode, off, len) → 0.
	OpFallocate
	// OpFstat is fstat(fd): (fd) → 0, with a Stat as reply payload.
	OpFstat
	// OpFcntl is fcntl(fd, cmd, arg): (fd, cmd, arg) → the call's result.
	OpFcntl
	// OpOpen is open(path, flags): (flags; path) → fd.
	OpOpen
	// OpIoctl is ioctl(fd, cmd, arg): (fd, cmd; the argument struct's bytes)
	// → the call's result, with the bytes to copy back as reply payload.
	OpIoctl
	// OpMmap is mmap(addr, length, prot, flags, fd, off): (fd, off,
	// length, prot, flags) → the mapping's id. The response is a KindFile
	// frame carrying the memory file, KindData frames holding the
	// mapping's MmapRuns (pages past the end of the file have none), and
	// the result, whose reply payload is MmapReplySize bytes of MmapFlags.
	// Mapped folios stay pinned until unmapped, or until the process execs
	// or disconnects. Version 2.
	OpMmap
	// OpMunmap is munmap of part of a mapping: (id, page offset in the
	// mapping, pages) → 0. A folio is unpinned once none of its pages in
	// the mapping is mapped. Version 2.
	OpMunmap
	// OpFork is the parent's half of fork: () → a token. The sentry copies
	// the process's fd table (every fd with its file and FD_CLOEXEC) and
	// its mappings into a child that waits, at most ForkTimeoutSeconds,
	// for a connection to attach it. Version 2.
	OpFork
	// OpAttach is the child's half of fork, the first call on its new
	// connection: (token) → 0; the connection becomes the forked child.
	// EINVAL for an unknown or expired token, EBUSY on a connection that
	// has fds already. Version 2.
	OpAttach
	// OpExecve tells the sentry that the process has exec'd: () → 0.
	// Every FD_CLOEXEC fd is closed and every mapping dropped, as a
	// successful execve does. Version 2.
	OpExecve

	// opEnd is one past the last op.
	opEnd
)

var opNames = [...]string{
	OpMemfdCreate: "memfd_create",
	OpClose:       "close",
	OpDup:         "dup",
	OpDup3:        "dup3",
	OpRead:        "read",
	OpWrite:       "write",
	OpPread64:     "pread64",
	OpPwrite64:    "pwrite64",
	OpLseek:       "lseek",
	OpFtruncate:   "ftruncate",
	OpFallocate:   "fallocate",
	OpFstat:       "fstat",
	OpFcntl:       "fcntl",
	OpOpen:        "open",
	OpIoctl:       "ioctl",
	OpMmap:        "mmap",
	OpMunmap:      "munmap",
	OpFork:        "fork",
	OpAttach:      "attach",
	OpExecve:      "execve",
}

// String returns the name of the system call op mirrors.
func (op Op) String() string {
	if op > 0 && op < opEnd {
		return opNames[op]
	}
	return fmt.Sprintf("op(%d)", uint32(op))
}

// Valid reports whether op is a known call.
func (op Op) Valid() bool { return op > 0 && op < opEnd }

// MaxPayload returns the largest payload a request for op may carry.
func (op Op) MaxPayload() uint32 {
	switch op {
	case OpWrite, OpPwrite64:
		return MaxWritePayload
	case OpMemfdCreate, OpOpen, OpIoctl:
		return MaxSmallPayload
	default:
		return 0
	}
}

// Hello is the first frame in each direction.
type Hello struct {
	// Version is the protocol version the sender speaks.
	Version uint32
	// Errno is the second word of the sentry's Hello: 0, or the errno
	// that refuses the connection: EPROTONOSUPPORT for another version,
	// EAGAIN when the sandbox has as many guests as it takes.
	Errno uint32
	// Flags is the second word of a guest's Hello (HelloStartGate). A
	// guest's Hello has no Errno and the sentry's no Flags; sentries
	// that predate Flags ignore the word.
	Flags uint32
}

// Encode writes h into b, which must be HelloSize bytes long. The second
// word is Errno or Flags, whichever the sender's direction uses.
func (h Hello) Encode(b []byte) {
	copy(b[0:8], Magic)
	binary.LittleEndian.PutUint32(b[8:], h.Version)
	binary.LittleEndian.PutUint32(b[12:], h.Errno|h.Flags)
}

// DecodeHello decodes a Hello from b, checking its size and magic.
func DecodeHello(b []byte) (Hello, error) {
	if len(b) != HelloSize {
		return Hello{}, fmt.Errorf("hello: %d bytes, want %d", len(b), HelloSize)
	}
	if string(b[0:8]) != Magic {
		return Hello{}, fmt.Errorf("hello: magic %q, want %q", b[0:8], Magic)
	}
	w := binary.LittleEndian.Uint32(b[12:])
	// The reader takes the field of the sender's direction: Errno from
	// the sentry, Flags from a guest.
	return Hello{Version: binary.LittleEndian.Uint32(b[8:]), Errno: w, Flags: w}, nil
}

// RequestHeader starts a request.
type RequestHeader struct {
	// Op is the call.
	Op Op
	// DataLen is the number of payload bytes after the header.
	DataLen uint32
	// Args are the call's integer arguments, in the order of the system
	// call's parameters without the buffers (see the Op constants).
	Args [5]uint64
}

// Encode writes h into b, which must be RequestHeaderSize bytes long.
func (h *RequestHeader) Encode(b []byte) {
	binary.LittleEndian.PutUint32(b[0:], uint32(h.Op))
	binary.LittleEndian.PutUint32(b[4:], h.DataLen)
	for i, a := range h.Args {
		binary.LittleEndian.PutUint64(b[8+8*i:], a)
	}
}

// DecodeRequestHeader decodes a RequestHeader from b and checks it: a known
// op and a payload no longer than the op allows. The error names the field.
func DecodeRequestHeader(b []byte) (RequestHeader, error) {
	var h RequestHeader
	if len(b) != RequestHeaderSize {
		return h, fmt.Errorf("request header: %d bytes, want %d", len(b), RequestHeaderSize)
	}
	h.Op = Op(binary.LittleEndian.Uint32(b[0:]))
	h.DataLen = binary.LittleEndian.Uint32(b[4:])
	for i := range h.Args {
		h.Args[i] = binary.LittleEndian.Uint64(b[8+8*i:])
	}
	if !h.Op.Valid() {
		return h, fmt.Errorf("request header: op %d is not a known call", uint32(h.Op))
	}
	if h.DataLen > h.Op.MaxPayload() {
		return h, fmt.Errorf("request header: %s with a payload of %d bytes (at most %d)", h.Op, h.DataLen, h.Op.MaxPayload())
	}
	return h, nil
}

// Kind says what a response frame is.
type Kind uint32

const (
	// KindData carries Len bytes of file data.
	KindData Kind = 1
	// KindResult ends a response: the result or errno, and Len bytes of
	// reply payload.
	KindResult Kind = 2
	// KindFatal carries Len bytes of message saying why the sentry closes
	// the connection.
	KindFatal Kind = 3
	// KindFile has no bytes after the header (Len 0); the header's bytes
	// carry one file as SCM_RIGHTS (close-on-exec on receipt with
	// MSG_CMSG_CLOEXEC). Version 2.
	KindFile Kind = 4
)

// ResponseHeader starts a response frame.
type ResponseHeader struct {
	// Kind is the frame's kind.
	Kind Kind
	// Len is the number of bytes after the header.
	Len uint32
	// Errno is 0 or the Linux errno of a failed call (KindResult only).
	Errno uint32
	// Result is the call's return value when Errno is 0 (KindResult only).
	Result int64
}

// Encode writes h into b, which must be ResponseHeaderSize bytes long.
func (h *ResponseHeader) Encode(b []byte) {
	binary.LittleEndian.PutUint32(b[0:], uint32(h.Kind))
	binary.LittleEndian.PutUint32(b[4:], h.Len)
	binary.LittleEndian.PutUint32(b[8:], h.Errno)
	binary.LittleEndian.PutUint32(b[12:], 0)
	binary.LittleEndian.PutUint64(b[16:], uint64(h.Result))
}

// DecodeResponseHeader decodes a ResponseHeader from b and checks its kind,
// its reserved field and, for a result frame, the payload length.
func DecodeResponseHeader(b []byte) (ResponseHeader, error) {
	var h ResponseHeader
	if len(b) != ResponseHeaderSize {
		return h, fmt.Errorf("response header: %d bytes, want %d", len(b), ResponseHeaderSize)
	}
	h.Kind = Kind(binary.LittleEndian.Uint32(b[0:]))
	h.Len = binary.LittleEndian.Uint32(b[4:])
	h.Errno = binary.LittleEndian.Uint32(b[8:])
	h.Result = int64(binary.LittleEndian.Uint64(b[16:]))
	if r := binary.LittleEndian.Uint32(b[12:]); r != 0 {
		return h, fmt.Errorf("response header: reserved field %#x, want 0", r)
	}
	switch h.Kind {
	case KindData:
	case KindFile:
		if h.Len != 0 {
			return h, fmt.Errorf("response header: a file frame with %d payload bytes", h.Len)
		}
	case KindResult, KindFatal:
		if h.Len > MaxReplyPayload {
			return h, fmt.Errorf("response header: kind %d with %d payload bytes (at most %d)", h.Kind, h.Len, MaxReplyPayload)
		}
	default:
		return h, fmt.Errorf("response header: unknown kind %d", h.Kind)
	}
	return h, nil
}

// Stat is what fstat returns: the fields of struct stat a guest can see.
type Stat struct {
	// Size is st_size.
	Size int64
	// Blocks is st_blocks (512-byte units).
	Blocks int64
	// Blksize is st_blksize.
	Blksize int64
	// Mode is st_mode.
	Mode uint32
	// Nlink is st_nlink.
	Nlink uint32
	// Ino is st_ino.
	Ino uint64
}

// Encode writes s into b, which must be StatSize bytes long.
func (s *Stat) Encode(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], uint64(s.Size))
	binary.LittleEndian.PutUint64(b[8:], uint64(s.Blocks))
	binary.LittleEndian.PutUint64(b[16:], uint64(s.Blksize))
	binary.LittleEndian.PutUint32(b[24:], s.Mode)
	binary.LittleEndian.PutUint32(b[28:], s.Nlink)
	binary.LittleEndian.PutUint64(b[32:], s.Ino)
}

// DecodeStat decodes a Stat from b.
func DecodeStat(b []byte) (Stat, error) {
	if len(b) != StatSize {
		return Stat{}, fmt.Errorf("stat: %d bytes, want %d", len(b), StatSize)
	}
	return Stat{
		Size:    int64(binary.LittleEndian.Uint64(b[0:])),
		Blocks:  int64(binary.LittleEndian.Uint64(b[8:])),
		Blksize: int64(binary.LittleEndian.Uint64(b[16:])),
		Mode:    binary.LittleEndian.Uint32(b[24:]),
		Nlink:   binary.LittleEndian.Uint32(b[28:]),
		Ino:     binary.LittleEndian.Uint64(b[32:]),
	}, nil
}

// MmapRun is one run of a mapping: Length bytes at MapOffset in the mapping
// are the same bytes at FileOffset in the memory file. All three are
// multiples of the page size.
type MmapRun struct {
	MapOffset  uint64
	FileOffset uint64
	Length     uint64
}

// Encode writes r into b, which must be MmapRunSize bytes long.
func (r *MmapRun) Encode(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], r.MapOffset)
	binary.LittleEndian.PutUint64(b[8:], r.FileOffset)
	binary.LittleEndian.PutUint64(b[16:], r.Length)
}

// DecodeMmapRun decodes a MmapRun from b and checks that it describes
// whole pages of a mapping length bytes long.
func DecodeMmapRun(b []byte, length uint64) (MmapRun, error) {
	if len(b) != MmapRunSize {
		return MmapRun{}, fmt.Errorf("mmap run: %d bytes, want %d", len(b), MmapRunSize)
	}
	r := MmapRun{
		MapOffset:  binary.LittleEndian.Uint64(b[0:]),
		FileOffset: binary.LittleEndian.Uint64(b[8:]),
		Length:     binary.LittleEndian.Uint64(b[16:]),
	}
	const page = 4096
	if r.MapOffset%page != 0 || r.FileOffset%page != 0 || r.Length%page != 0 || r.Length == 0 {
		return r, fmt.Errorf("mmap run %+v: not whole pages", r)
	}
	if r.MapOffset >= length || r.Length > length-r.MapOffset {
		return r, fmt.Errorf("mmap run %+v: outside a mapping of %d bytes", r, length)
	}
	return r, nil
}
