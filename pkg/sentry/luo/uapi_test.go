package luo_test

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"golang.org/x/sys/unix"
)

// getNameStruct is struct liveupdate_session_get_name of size bytes with
// the given reserved field.
func getNameStruct(size uint32, reserved uint32) []byte {
	b := make([]byte, max(int(size), 8))
	binary.LittleEndian.PutUint32(b, size)
	binary.LittleEndian.PutUint32(b[4:], reserved)
	return b
}

// getSessionName is the selftests' get_session_name helper.
func (s *sentry) getSessionName(tb testing.TB, sfd int32) string {
	tb.Helper()
	reply, err := s.session(tb, sfd).Ioctl(s.fdt, abiluo.IoctlSessionGetName, getNameStruct(abiluo.SessionGetNameSize, 0))
	if err != nil {
		tb.Fatalf("LIVEUPDATE_SESSION_GET_NAME: %v", err)
	}
	if len(reply) != abiluo.SessionGetNameSize {
		tb.Fatalf("GET_NAME replied %d bytes, want %d", len(reply), abiluo.SessionGetNameSize)
	}
	return abiluo.CString(reply[8:])
}

// The selftest get_session_name (liveupdate.c, with d6b3d47bdaf8).
func TestGetSessionName(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "get-name-test-session")
	if got := s.getSessionName(t, sfd); got != "get-name-test-session" {
		t.Fatalf("GET_NAME = %q, want %q", got, "get-name-test-session")
	}
}

// The selftest get_session_name_max_length: a 63-byte name round-trips.
func TestGetSessionNameMaxLength(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	long := strings.Repeat("A", abiluo.SessionNameLength-1)
	sfd := s.createSession(t, dev, long)
	if got := s.getSessionName(t, sfd); got != long {
		t.Fatalf("GET_NAME = %q, want the 63-byte name", got)
	}
}

// GET_NAME works on both kinds of session (LUO_IOCTL_ALL): a retrieved
// incoming session reports the name it had before the restart.
func TestGetSessionNameAfterARestart(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	s.createSession(t, dev, "named before the restart")
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "named before the restart")
	if got := n.getSessionName(t, r); got != "named before the restart" {
		t.Fatalf("GET_NAME of a retrieved session = %q", got)
	}
}

// The selftests create_session_no_null_termination and
// create_session_empty_name ("liveupdate: reject
// LIVEUPDATE_IOCTL_CREATE_SESSION with invalid name length"), and the
// lengths around them.
func TestSessionNameLengths(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	x64 := []byte(strings.Repeat("X", 64))
	for _, tc := range []struct {
		name string
		arg  []byte
		want error
	}{
		{"an empty name is EINVAL", nameStruct(72, nil), unix.EINVAL},
		{"a name filling all 64 bytes without a NUL is EINVAL", nameStruct(72, x64), unix.EINVAL},
		{"a one-byte name works", nameStruct(72, []byte("x")), nil},
		{"a 63-byte name works", nameStruct(72, x64[:63]), nil},
		{"bytes after the NUL are ignored", nameStruct(72, []byte("after\x00junk")), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := dev.Ioctl(s.fdt, abiluo.IoctlCreateSession, tc.arg)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("CREATE_SESSION = %v", err)
				}
				return
			}
			wantErrno(t, "CREATE_SESSION", err, tc.want.(unix.Errno))
		})
	}
	if st := s.l.Status(); len(st.Sessions) != 3 || st.Sessions[2].Name != "after" {
		t.Fatalf("sessions after the name cases: %+v", st.Sessions)
	}
	// RETRIEVE_SESSION compares all 64 bytes: a name without a NUL
	// matches no session, even one whose 63 bytes it starts with.
	s.createSession(t, dev, strings.Repeat("r", 63))
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	_, err := dev2.Ioctl(n.fdt, abiluo.IoctlRetrieveSession, nameStruct(72, []byte(strings.Repeat("r", 64))))
	wantErrno(t, "RETRIEVE_SESSION with 64 bytes and no NUL", err, unix.ENOENT)
	n.retrieveSession(t, dev2, strings.Repeat("r", 63))
}

// The argument checks of GET_NAME and FINISH: size rules as for every LUO
// ioctl, and a reserved field that must be zero.
func TestGetNameAndFinishArgumentChecks(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	sfd := s.createSession(t, dev, "args")
	ss := s.session(t, sfd)
	for _, tc := range []struct {
		name      string
		arg       []byte
		want      error
		replySize int
	}{
		{"the 68-byte struct of the first posting is EINVAL", getNameStruct(68, 0), unix.EINVAL, 0},
		{"a non-zero reserved is EINVAL", getNameStruct(72, 1), unix.EINVAL, 0},
		{"a larger struct with a zero tail gets 72 bytes back", getNameStruct(80, 0), nil, 72},
		{"a larger struct with a non-zero tail is E2BIG", append(getNameStruct(80, 0)[:79], 1), unix.E2BIG, 0},
		{"a name in the input is overwritten up to the NUL, the rest kept (strscpy)", append(getNameStruct(72, 0)[:8], []byte(strings.Repeat("z", 64))...), nil, 72},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reply, err := ss.Ioctl(s.fdt, abiluo.IoctlSessionGetName, tc.arg)
			if tc.want != nil {
				wantErrno(t, "GET_NAME", err, tc.want.(unix.Errno))
				return
			}
			if err != nil || len(reply) != tc.replySize || abiluo.CString(reply[8:]) != "args" || reply[8+len("args")] != 0 {
				t.Fatalf("GET_NAME = %q, %v; want %d bytes naming %q", reply, err, tc.replySize, "args")
			}
			if rest := reply[8+len("args")+1 : 72]; !bytes.Equal(rest, tc.arg[8+len("args")+1:72]) {
				t.Fatalf("GET_NAME changed the bytes after the name's NUL: % x", rest)
			}
		})
	}

	// FINISH with a non-zero reserved is EINVAL and finishes nothing: the
	// file is still there to retrieve.
	if err := s.preserveFD(sfd, s.memfdWith(t, []byte("still here")), 5); err != nil {
		t.Fatal(err)
	}
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	r := n.retrieveSession(t, dev2, "args")
	bad := make([]byte, abiluo.SessionFinishSize)
	binary.LittleEndian.PutUint32(bad, abiluo.SessionFinishSize)
	binary.LittleEndian.PutUint32(bad[4:], 7)
	_, err := n.session(t, r).Ioctl(n.fdt, abiluo.IoctlSessionFinish, bad)
	wantErrno(t, "FINISH with reserved 7", err, unix.EINVAL)
	n.verify(t, r, 5, []byte("still here"))
	if err := n.finish(r); err != nil {
		t.Fatal(err)
	}
}

// The session type is checked before the struct's size and contents
// (luo_ioctl_type_valid comes right after the ENOTTY check), so a
// wrong-direction call is EINVAL even where its struct would be E2BIG.
func TestSessionTypeIsCheckedBeforeTheStruct(t *testing.T) {
	s := coldBoot(t)
	dev, _ := s.openDevice(t)
	out := s.createSession(t, dev, "out")
	if err := s.preserveFD(out, s.memfdWith(t, []byte("x")), 1); err != nil {
		t.Fatal(err)
	}
	s.createSession(t, dev, "in")
	n := s.restart(t)
	dev2, _ := n.openDevice(t)
	in := n.retrieveSession(t, dev2, "in")
	out2 := n.createSession(t, dev2, "out2")
	// A 32-byte struct whose last byte is set: past the 16 or 8 bytes of
	// PRESERVE_FD, RETRIEVE_FD and FINISH, short of GET_NAME's 72.
	tail := func() []byte {
		b := make([]byte, 32)
		binary.LittleEndian.PutUint32(b, 32)
		b[31] = 1
		return b
	}
	for _, tc := range []struct {
		name string
		sfd  int32
		cmd  uint32
		want unix.Errno
	}{
		{"PRESERVE_FD on an incoming session is EINVAL", in, abiluo.IoctlSessionPreserve, unix.EINVAL},
		{"PRESERVE_FD with a non-zero tail on an outgoing session is E2BIG", out2, abiluo.IoctlSessionPreserve, unix.E2BIG},
		{"RETRIEVE_FD on an outgoing session is EINVAL", out2, abiluo.IoctlSessionRetrieve, unix.EINVAL},
		{"RETRIEVE_FD with a non-zero tail on an incoming session is E2BIG", in, abiluo.IoctlSessionRetrieve, unix.E2BIG},
		{"FINISH on an outgoing session is EINVAL", out2, abiluo.IoctlSessionFinish, unix.EINVAL},
		{"FINISH with a non-zero tail on an incoming session is E2BIG", in, abiluo.IoctlSessionFinish, unix.E2BIG},
		{"GET_NAME, allowed on every session, checks its size: 32 bytes is EINVAL", in, abiluo.IoctlSessionGetName, unix.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := n.session(t, tc.sfd).Ioctl(n.fdt, tc.cmd, tail())
			wantErrno(t, "ioctl", err, tc.want)
		})
	}
}
