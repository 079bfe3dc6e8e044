package luo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// The constants of include/uapi/linux/liveupdate.h (torvalds/linux
// 16cec0d26521, GET_NAME from d6b3d47bdaf8) and include/linux/kho/abi/luo.h
// (torvalds/linux cc4adab164b7).
func TestConstantsMatchTheSpec(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want int
	}{
		{"LIVEUPDATE_IOCTL_CREATE_SESSION is _IO(0xBA, 0x00)", IoctlCreateSession, 0xBA00},
		{"LIVEUPDATE_IOCTL_RETRIEVE_SESSION is _IO(0xBA, 0x01)", IoctlRetrieveSession, 0xBA01},
		{"LIVEUPDATE_SESSION_PRESERVE_FD is _IO(0xBA, 0x40)", IoctlSessionPreserve, 0xBA40},
		{"LIVEUPDATE_SESSION_RETRIEVE_FD is _IO(0xBA, 0x41)", IoctlSessionRetrieve, 0xBA41},
		{"LIVEUPDATE_SESSION_FINISH is _IO(0xBA, 0x42)", IoctlSessionFinish, 0xBA42},
		{"LIVEUPDATE_SESSION_GET_NAME is _IO(0xBA, 0x43)", IoctlSessionGetName, 0xBA43},
		{"LIVEUPDATE_SESSION_NAME_LENGTH is 64", SessionNameLength, 64},
		{"liveupdate_ioctl_create_session is 72 bytes", CreateSessionSize, 72},
		{"liveupdate_ioctl_retrieve_session is 72 bytes", RetrieveSessionSize, 72},
		{"liveupdate_session_preserve_fd is 16 bytes", SessionPreserveFDSize, 16},
		{"liveupdate_session_retrieve_fd is 16 bytes", SessionRetrieveFDSize, 16},
		{"liveupdate_session_finish is 8 bytes", SessionFinishSize, 8},
		{"liveupdate_session_get_name is 72 bytes", SessionGetNameSize, 72},
		{"LIVEUPDATE_HNDL_COMPAT_LENGTH is 48", HandlerCompatLength, 48},
		{"luo_session_header_ser is 8 bytes", SessionHeaderSerSize, 8},
		{"luo_session_ser is 80 bytes", SessionSerSize, 80},
		{"luo_file_ser is 64 bytes", FileSerSize, 64},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: got %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
	for _, tc := range []struct{ name, got, want string }{
		{"LUO_FDT_KHO_ENTRY_NAME", FDTName, "LUO"},
		{"LUO_FDT_COMPATIBLE", FDTCompatible, "luo-v1"},
		{"LUO_FDT_SESSION_NODE_NAME", FDTSessionNode, "luo-session"},
		{"LUO_FDT_SESSION_COMPATIBLE of the 80-byte records", FDTSessionCompatible, "luo-session-v2"},
		{"LUO_FDT_SESSION_HEADER", FDTSessionHeader, "luo-session-header"},
		{"LUO_FDT_LIVEUPDATE_NUM", FDTLiveupdateNum, "liveupdate-number"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s is %q, want %q", tc.name, tc.got, tc.want)
		}
	}
}

func TestStructLayouts(t *testing.T) {
	cs := CreateSession{Size: 72, FD: -1, Name: [64]byte{'a', 'b'}}
	b := make([]byte, CreateSessionSize)
	if err := cs.Encode(b); err != nil {
		t.Fatal(err)
	}
	want := append([]byte{72, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 'a', 'b'}, make([]byte, 62)...)
	if !bytes.Equal(b, want) {
		t.Fatalf("create_session encodes as % x", b)
	}
	var back CreateSession
	if err := back.Decode(b); err != nil || back != cs {
		t.Fatalf("decode = %+v, %v", back, err)
	}

	fd := SessionFD{Size: 16, FD: 7, Token: 0x1122334455667788}
	b = make([]byte, SessionPreserveFDSize)
	if err := fd.Encode(b); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint64(b[8:]) != fd.Token || b[4] != 7 {
		t.Fatalf("preserve_fd encodes as % x (token at offset 8, aligned)", b)
	}

	fs := FileSer{Data: 0xabc, Token: 0x1a}
	StrScpy(fs.Compatible[:], "memfd-v1")
	b = make([]byte, FileSerSize)
	fs.Encode(b)
	if CString(b[:48]) != "memfd-v1" || binary.LittleEndian.Uint64(b[48:]) != 0xabc || binary.LittleEndian.Uint64(b[56:]) != 0x1a {
		t.Fatalf("luo_file_ser encodes as % x", b)
	}
	ss := SessionSer{Files: 0x5000, Count: 3}
	StrScpy(ss.Name[:], "s")
	b = make([]byte, SessionSerSize)
	ss.Encode(b)
	var ss2 SessionSer
	if err := ss2.Decode(b); err != nil || ss2 != ss || binary.LittleEndian.Uint64(b[64:]) != 0x5000 {
		t.Fatalf("luo_session_ser round trip = %+v, %v", ss2, err)
	}
}

// struct liveupdate_session_get_name: size at 0, reserved at 4, name at 8.
func TestGetNameLayout(t *testing.T) {
	g := SessionGetName{Size: 72, Reserved: 0x01020304}
	StrScpy(g.Name[:], "get-name-test-session")
	b := make([]byte, SessionGetNameSize)
	if err := g.Encode(b); err != nil {
		t.Fatal(err)
	}
	want := append([]byte{72, 0, 0, 0, 4, 3, 2, 1}, []byte("get-name-test-session")...)
	want = append(want, make([]byte, 64-len("get-name-test-session"))...)
	if !bytes.Equal(b, want) {
		t.Fatalf("liveupdate_session_get_name encodes as % x", b)
	}
	var back SessionGetName
	if err := back.Decode(b); err != nil || back != g {
		t.Fatalf("decode = %+v, %v", back, err)
	}
	if err := back.Decode(b[:71]); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("decoding 71 bytes = %v, want EINVAL", err)
	}
}

func TestStrNLen(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want int
	}{
		{"an empty string is 0", []byte{0, 'a'}, 0},
		{"the length stops at the first NUL", []byte("ab\x00c"), 2},
		{"no NUL gives the whole buffer", []byte("abc"), 3},
	} {
		if got := StrNLen(tc.b); got != tc.want {
			t.Errorf("%s: StrNLen(%q) = %d, want %d", tc.name, tc.b, got, tc.want)
		}
	}
}

func TestCopyStructFromUser(t *testing.T) {
	arg := func(size uint32, n int, tail byte) []byte {
		b := make([]byte, n)
		binary.LittleEndian.PutUint32(b, size)
		if tail != 0 {
			b[n-1] = tail
		}
		return b
	}
	for _, tc := range []struct {
		name string
		arg  []byte
		want error
	}{
		{"a struct of our size is copied", arg(16, 16, 0), nil},
		{"a smaller struct is zero-extended", arg(8, 8, 0), nil},
		{"a larger struct with a zero tail is accepted", arg(24, 24, 0), nil},
		{"a larger struct with a non-zero tail is E2BIG", arg(24, 24, 1), unix.E2BIG},
		{"a size beyond the buffer is EFAULT", arg(32, 24, 0), unix.EFAULT},
		{"no room for the size is EFAULT", []byte{1, 2}, unix.EFAULT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := CopyStructFromUser(16, tc.arg)
			if !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
				t.Fatalf("CopyStructFromUser = %v, want %v", err, tc.want)
			}
			if err == nil && len(k) != 16 {
				t.Fatalf("kernel copy is %d bytes", len(k))
			}
		})
	}
	if got := Respond(make([]byte, 72), 80); len(got) != 72 {
		t.Errorf("reply to a larger user struct is %d bytes, want 72", len(got))
	}
	if got := Respond(make([]byte, 72), 40); len(got) != 40 {
		t.Errorf("reply to a smaller user struct is %d bytes, want 40", len(got))
	}
}

func TestStrScpyCutsAtLenMinusOne(t *testing.T) {
	dst := make([]byte, 4)
	StrScpy(dst, "abcdef")
	if !bytes.Equal(dst, []byte{'a', 'b', 'c', 0}) {
		t.Fatalf("strscpy into 4 bytes = %q", dst)
	}
	if NulTerminated([]byte("abc")) || !NulTerminated([]byte("ab\x00")) {
		t.Fatal("NulTerminated is wrong")
	}
}
