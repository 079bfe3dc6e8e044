package guest

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

func TestLayoutSizes(t *testing.T) {
	tests := []struct {
		name string
		got  int
		want int
	}{
		{"a hello is 16 bytes", len(Magic) + 8, HelloSize},
		{"a request header is 48 bytes", 4 + 4 + 5*8, RequestHeaderSize},
		{"a response header is 24 bytes", 4 + 4 + 4 + 4 + 8, ResponseHeaderSize},
		{"a stat is 40 bytes", 8 + 8 + 8 + 4 + 4 + 8, StatSize},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Fatalf("%d, want %d", tc.got, tc.want)
			}
		})
	}
}

func TestRoundTrips(t *testing.T) {
	// The second word is the sentry's Errno or a guest's Flags.
	b := make([]byte, HelloSize)
	Hello{Version: Version, Errno: 93}.Encode(b)
	if got, err := DecodeHello(b); err != nil || got.Version != Version || got.Errno != 93 {
		t.Fatalf("the sentry's hello: %+v, %v", got, err)
	}
	Hello{Version: Version, Flags: HelloStartGate}.Encode(b)
	if got, err := DecodeHello(b); err != nil || got.Version != Version || got.Flags != HelloStartGate {
		t.Fatalf("a guest's hello: %+v, %v", got, err)
	}
	rq := RequestHeader{Op: OpPwrite64, DataLen: 12345, Args: [5]uint64{3, 1 << 40, 0, 0, 7}}
	b = make([]byte, RequestHeaderSize)
	rq.Encode(b)
	if got, err := DecodeRequestHeader(b); err != nil || got != rq {
		t.Fatalf("request: %+v, %v", got, err)
	}
	rs := ResponseHeader{Kind: KindResult, Len: StatSize, Errno: 0, Result: -1}
	b = make([]byte, ResponseHeaderSize)
	rs.Encode(b)
	if got, err := DecodeResponseHeader(b); err != nil || got != rs {
		t.Fatalf("response: %+v, %v", got, err)
	}
	st := Stat{Size: 1 << 33, Blocks: 99, Blksize: 4096, Mode: 0o100777, Nlink: 0, Ino: 42}
	b = make([]byte, StatSize)
	st.Encode(b)
	if got, err := DecodeStat(b); err != nil || got != st {
		t.Fatalf("stat: %+v, %v", got, err)
	}
}

func TestDecodeRejects(t *testing.T) {
	req := func(op Op, dataLen uint32) []byte {
		b := make([]byte, RequestHeaderSize)
		(&RequestHeader{Op: op, DataLen: dataLen}).Encode(b)
		return b
	}
	resp := func(kind Kind, n uint32, reserved uint32) []byte {
		b := make([]byte, ResponseHeaderSize)
		(&ResponseHeader{Kind: kind, Len: n}).Encode(b)
		binary.LittleEndian.PutUint32(b[12:], reserved)
		return b
	}
	tests := []struct {
		name   string
		decode func() error
		want   string
	}{
		{"a hello with another magic is rejected", func() error { _, err := DecodeHello(bytes.Repeat([]byte{'x'}, HelloSize)); return err }, "magic"},
		{"a short hello is rejected", func() error { _, err := DecodeHello(make([]byte, 3)); return err }, "3 bytes"},
		{"op 0 is rejected", func() error { _, err := DecodeRequestHeader(req(0, 0)); return err }, "op 0"},
		{"an op past the last is rejected", func() error { _, err := DecodeRequestHeader(req(opEnd, 0)); return err }, "not a known call"},
		{"a close with a payload is rejected", func() error { _, err := DecodeRequestHeader(req(OpClose, 1)); return err }, "close with a payload of 1"},
		{"an ioctl payload above 4 KiB is rejected", func() error { _, err := DecodeRequestHeader(req(OpIoctl, MaxSmallPayload+1)); return err }, "ioctl"},
		{"a write above MAX_RW_COUNT is rejected", func() error { _, err := DecodeRequestHeader(req(OpWrite, MaxWritePayload+1)); return err }, "write"},
		{"an unknown response kind is rejected", func() error { _, err := DecodeResponseHeader(resp(9, 0, 0)); return err }, "unknown kind 9"},
		{"a non-zero reserved field is rejected", func() error { _, err := DecodeResponseHeader(resp(KindResult, 0, 1)); return err }, "reserved"},
		{"a result payload above 4 KiB is rejected", func() error { _, err := DecodeResponseHeader(resp(KindResult, MaxReplyPayload+1, 0)); return err }, "payload bytes"},
		{"a short stat is rejected", func() error { _, err := DecodeStat(make([]byte, 39)); return err }, "39 bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.decode()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
