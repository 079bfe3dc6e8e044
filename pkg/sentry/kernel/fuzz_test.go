package kernel

import (
	"io"
	"net"
	"testing"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
)

// FuzzGuestFrames sends arbitrary bytes after a valid handshake: whatever
// they are, the sentry must answer or close the connection without
// panicking, and another guest must be served afterwards.
//
//	go test ./pkg/sentry/kernel -run XXX -fuzz FuzzGuestFrames -fuzztime 1m
func FuzzGuestFrames(f *testing.F) {
	req := func(op abiguest.Op, dataLen uint32, args [5]uint64, payload string) []byte {
		h := abiguest.RequestHeader{Op: op, DataLen: dataLen, Args: args}
		b := make([]byte, abiguest.RequestHeaderSize)
		h.Encode(b)
		return append(b, payload...)
	}
	f.Add(req(abiguest.OpMemfdCreate, 2, [5]uint64{}, "m\x00"))
	f.Add(append(req(abiguest.OpMemfdCreate, 2, [5]uint64{}, "m\x00"), req(abiguest.OpWrite, 5, [5]uint64{0}, "hello")...))
	f.Add(append(req(abiguest.OpOpen, 16, [5]uint64{2}, "/dev/liveupdate\x00"), req(abiguest.OpIoctl, 72, [5]uint64{0, 0xBA00}, "H\x00\x00\x00\x00\x00\x00\x00s\x00")...))
	f.Add(req(abiguest.OpPread64, 0, [5]uint64{0, 1 << 40, 1 << 62}, ""))
	f.Add(req(abiguest.OpDup3, 0, [5]uint64{0, 1 << 33, 0}, ""))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	// No Logf: the kernel logs from its own goroutines, where f.Logf is
	// not allowed during fuzzing.
	k, err := New(Options{MemorySize: 64 << 20})
	if err != nil {
		f.Fatal(err)
	}
	s := startKernel(f, k)
	f.Cleanup(k.Shutdown)
	bystander := s.dial(f)
	fd, err := bystander.MemfdCreate("bystander", 0)
	_ = fd
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.Dial("unix", s.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var b [abiguest.HelloSize]byte
		abiguest.Hello{Version: abiguest.Version}.Encode(b[:])
		c.Write(b[:])
		if _, err := io.ReadFull(c, b[:]); err != nil {
			t.Fatalf("hello: %v", err)
		}
		c.Write(data)
		// Read what comes back for a moment, then hang up.
		c.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
		io.Copy(io.Discard, c)
		c.Close()
		if _, err := bystander.Pwrite(fd, []byte("ok"), 0); err != nil {
			t.Fatalf("the other guest after the fuzzed connection: %v", err)
		}
	})
}
