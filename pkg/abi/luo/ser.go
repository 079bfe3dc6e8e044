package luo

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// Compatible strings and names of LUO's KHO subtree, as
// include/linux/kho/abi/luo.h defines them in torvalds/linux at
// cc4adab164b7 (v6.19): the FDT is "luo-v1" and its session node
// "luo-session-v2". Any change to the layouts below must change these
// strings.
const (
	// FDTName is the name of LUO's subtree in the KHO root
	// (LUO_FDT_KHO_ENTRY_NAME).
	FDTName = "LUO"
	// FDTCompatible is the compatible of LUO's FDT (LUO_FDT_COMPATIBLE).
	FDTCompatible = "luo-v1"
	// FDTLiveupdateNum names the u64 count of live updates
	// (LUO_FDT_LIVEUPDATE_NUM).
	FDTLiveupdateNum = "liveupdate-number"
	// FDTSessionNode is the node describing the sessions
	// (LUO_FDT_SESSION_NODE_NAME).
	FDTSessionNode = "luo-session"
	// FDTSessionCompatible is that node's compatible
	// (LUO_FDT_SESSION_COMPATIBLE): an 8-byte luo_session_header_ser
	// followed by 80-byte luo_session_ser records, each pointing at an
	// array of 64-byte luo_file_ser records.
	FDTSessionCompatible = "luo-session-v2"
	// FDTSessionCompatibleV1 is the session node's compatible before
	// luo-session-v2. It names no single layout: torvalds/linux
	// at 0153094d03df has an 8-byte header and 64-byte records without
	// files under "luo-session-header", while a linux-next tree
	// (07e09e137986, include/linux/liveupdate/abi/luo.h) has a 16-byte header
	// {pgcnt, count} and 88-byte records {name, files, pgcnt, count}, and
	// earlier postings call the property "luo-session-head". A reader cannot
	// tell them apart, so none is read.
	FDTSessionCompatibleV1 = "luo-session-v1"
	// FDTSessionHeader names the u64 address of the session header
	// (LUO_FDT_SESSION_HEADER).
	FDTSessionHeader = "luo-session-header"

	// HandlerCompatLength is LIVEUPDATE_HNDL_COMPAT_LENGTH: the size of a
	// handler's compatible field, with its NUL.
	HandlerCompatLength = 48

	// SessionHeaderSerSize is sizeof(struct luo_session_header_ser).
	SessionHeaderSerSize = 8
	// SessionSerSize is sizeof(struct luo_session_ser).
	SessionSerSize = 80
	// FileSerSize is sizeof(struct luo_file_ser).
	FileSerSize = 64
)

// SessionHeaderSer is struct luo_session_header_ser: the number of
// luo_session_ser records that follow it.
type SessionHeaderSer struct {
	Count uint64
}

// SessionSer is struct luo_session_ser: a session's name and its
// luo_file_set_ser (the address and length of its file records).
type SessionSer struct {
	Name  [SessionNameLength]byte
	Files uint64 // address of the luo_file_ser array, 0 if Count is 0
	Count uint64
}

// Encode writes s into the first SessionSerSize bytes of b.
func (s *SessionSer) Encode(b []byte) {
	copy(b[0:64], s.Name[:])
	binary.LittleEndian.PutUint64(b[64:], s.Files)
	binary.LittleEndian.PutUint64(b[72:], s.Count)
}

// Decode reads s from b.
func (s *SessionSer) Decode(b []byte) error {
	if len(b) < SessionSerSize {
		return fmt.Errorf("luo_session_ser: %d bytes, want %d: %w", len(b), SessionSerSize, unix.EINVAL)
	}
	copy(s.Name[:], b[0:64])
	s.Files = binary.LittleEndian.Uint64(b[64:])
	s.Count = binary.LittleEndian.Uint64(b[72:])
	return nil
}

// FileSer is struct luo_file_ser: one preserved file's handler, its
// handler's serialized data and the user's token.
type FileSer struct {
	Compatible [HandlerCompatLength]byte
	Data       uint64
	Token      uint64
}

// Encode writes f into the first FileSerSize bytes of b.
func (f *FileSer) Encode(b []byte) {
	copy(b[0:48], f.Compatible[:])
	binary.LittleEndian.PutUint64(b[48:], f.Data)
	binary.LittleEndian.PutUint64(b[56:], f.Token)
}

// Decode reads f from b.
func (f *FileSer) Decode(b []byte) error {
	if len(b) < FileSerSize {
		return fmt.Errorf("luo_file_ser: %d bytes, want %d: %w", len(b), FileSerSize, unix.EINVAL)
	}
	copy(f.Compatible[:], b[0:48])
	f.Data = binary.LittleEndian.Uint64(b[48:])
	f.Token = binary.LittleEndian.Uint64(b[56:])
	return nil
}

// NulTerminated reports whether b holds a NUL, i.e. is a valid C string of
// at most len(b)-1 bytes.
func NulTerminated(b []byte) bool {
	for _, c := range b {
		if c == 0 {
			return true
		}
	}
	return false
}
