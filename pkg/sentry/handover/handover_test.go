package handover

import (
	"encoding/binary"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func goodDescriptor() Descriptor {
	return Descriptor{
		Protocol: ProtocolVersion, Mode: ModeTransfer, Version: "v1", Root: 0x5000, LiveupdateNumber: 3,
		MemorySize: 64 << 20, Compatibles: []string{"kho-v1", "memfd-v1"},
		PID: 42, Files: Files{MemoryFile: 0, GuestListener: 1, ControlListener: 2, Decision: 3},
		Timing: Timing{Mode: ModeTransfer, PausedAt: 100, SentAt: 200},
	}
}

func known(s string) bool { return s == "kho-v1" || s == "memfd-v1" }

func TestValidateRejectsEachBadField(t *testing.T) {
	tests := []struct {
		name   string
		modify func(d *Descriptor)
		want   string
	}{
		{"a good descriptor passes", func(d *Descriptor) {}, ""},
		{"an older protocol version is refused", func(d *Descriptor) { d.Protocol = OldestProtocol - 1 }, "protocol 2, this sentry speaks 3 to 5"},
		{"a newer protocol version is refused", func(d *Descriptor) { d.Protocol = ProtocolVersion + 1 }, "protocol 6"},
		{"a protocol 5 transfer descriptor passes with a generation", func(d *Descriptor) { d.Generation = 9 }, ""},
		{"a protocol 4 descriptor with a generation is refused", func(d *Descriptor) { d.Protocol, d.Generation = 4, 9 }, "generation 9 in a transfer-mode protocol 4 handover"},
		{"an exec-mode descriptor with a generation is refused", func(d *Descriptor) {
			d.Mode, d.Timing.Mode, d.Files, d.Generation = ModeExec, ModeExec, Files{MemoryFile: 3, GuestListener: 4, ControlListener: 5}, 9
		}, "generation 9 in a exec-mode"},
		{"a protocol 3 transfer descriptor passes without a decision file", func(d *Descriptor) { d.Protocol, d.Files.Decision = 3, 0 }, ""},
		{"a protocol 3 transfer descriptor naming a decision file is refused", func(d *Descriptor) { d.Protocol = 3 }, "files.decision = 3 in a transfer-mode protocol 3 handover"},
		{"a decision file that did not come is refused", func(d *Descriptor) { d.Files.Decision = 4 }, "files.decision = 4, but 4 files came"},
		{"a decision file that is the memory file is refused", func(d *Descriptor) { d.Files.Decision = 0 }, "files.memory_file and files.decision are both 0"},
		{"an unknown mode is refused", func(d *Descriptor) { d.Mode = "teleport" }, `mode "teleport"`},
		{"a zero root is refused", func(d *Descriptor) { d.Root = 0 }, "root 0x0"},
		{"an unaligned root is refused", func(d *Descriptor) { d.Root = 0x5008 }, "root 0x5008"},
		{"a root beyond the memory file is refused", func(d *Descriptor) { d.Root = 128 << 20 }, "memory size"},
		{"an unknown compatible is refused", func(d *Descriptor) { d.Compatibles = append(d.Compatibles, "memfd-v9") }, `unknown compatible "memfd-v9"`},
		{"a file index beyond the files received is refused", func(d *Descriptor) { d.Files.ControlListener = 4 }, "files.control_listener = 4"},
		{"two roles on one file are refused", func(d *Descriptor) { d.Files.GuestListener = 0 }, "files.memory_file and files.guest_listener"},
		{"an exec descriptor naming stdio is refused", func(d *Descriptor) {
			d.Mode, d.Timing.Mode = ModeExec, ModeExec
			d.Files = Files{MemoryFile: 2, GuestListener: 10, ControlListener: 11}
		}, "files.memory_file = 2"},
		{"a pid 1 old guest is refused", func(d *Descriptor) { d.OldGuests = []int{1} }, "old guest pid 1"},
		{"old guests with their start times pass", func(d *Descriptor) { d.OldGuests, d.OldGuestStarts = []int{7, 8}, []uint64{100, 200} }, ""},
		{"start times for other old guests are refused", func(d *Descriptor) { d.OldGuests, d.OldGuestStarts = []int{7, 8}, []uint64{100} }, "1 old_guest_starts for 2 old_guests"},
		{"a start time of 0 is refused", func(d *Descriptor) { d.OldGuests, d.OldGuestStarts = []int{7}, []uint64{0} }, "old_guest_starts[0] is 0"},
		{"times going backwards are refused", func(d *Descriptor) { d.Timing.SentAt = 50 }, "monotonic"},
		{"a timing of another mode is refused", func(d *Descriptor) { d.Timing.Mode = ModeExec }, "timing.mode"},
		{"a pid that is no sentry's is refused", func(d *Descriptor) { d.PID = 1 }, "pid 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := goodDescriptor()
			tc.modify(&d)
			nfiles := 4
			if d.Mode == ModeExec {
				// Its files are inherited, not in a message.
				nfiles = 0
			}
			err := d.Validate(nfiles, known)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// channelPair returns the two ends of a connected channel, closed when the
// test ends.
func channelPair(t *testing.T) (a, b *Channel) {
	t.Helper()
	a, peer, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b, err = NewChannel(peer)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return a, b
}

func TestChannelCarriesDescriptorAndFiles(t *testing.T) {
	a, b := channelPair(t)
	fd, err := unix.MemfdCreate("handover-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	mem := os.NewFile(uintptr(fd), "mem")
	defer mem.Close()
	mem.WriteString("contents")
	d := goodDescriptor()
	d.Files = Files{MemoryFile: 0, GuestListener: 1, ControlListener: 2}
	if err := a.Send(&d, mem, mem, mem); err != nil {
		t.Fatal(err)
	}
	var got Descriptor
	files, err := b.Recv(&got)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 || got.Root != d.Root || got.LiveupdateNumber != 3 {
		t.Fatalf("got %+v with %d files", got, len(files))
	}
	buf := make([]byte, 8)
	if n, err := files[0].ReadAt(buf, 0); string(buf[:n]) != "contents" {
		t.Fatalf("received memfd reads %q, %v", buf[:n], err)
	}
	if fl, _ := unix.FcntlInt(files[0].Fd(), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("a received file is not close-on-exec")
	}
	for _, f := range files {
		f.Close()
	}
}

// A spare sentry receives a recovery with its three files by index, in the
// order memory file, guest listener, control listener; another mode, or
// a descriptor naming a file that did not come, is refused and every file
// received closed.
func TestRecvRecoveryTakesOnlyARecovery(t *testing.T) {
	recovery := func() Descriptor {
		d := goodDescriptor()
		d.Mode, d.Timing.Mode = ModeRecover, ModeRecover
		d.Files = Files{MemoryFile: 2, GuestListener: 0, ControlListener: 1}
		return d
	}
	tests := []struct {
		name   string
		modify func(d *Descriptor)
		want   string
	}{
		{"a recovery is taken", func(d *Descriptor) {}, ""},
		{"a transfer descriptor is refused", func(d *Descriptor) { d.Mode, d.Timing.Mode, d.Protocol = ModeTransfer, ModeTransfer, OldestProtocol }, `mode "transfer" over a recover channel`},
		{"a file that did not come is refused", func(d *Descriptor) { d.Files.ControlListener = 3 }, "files.control_listener = 3, but 3 files came"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := channelPair(t)
			var sent []*os.File
			for _, name := range []string{"guest", "control", "memory"} {
				fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
				if err != nil {
					t.Fatal(err)
				}
				f := os.NewFile(uintptr(fd), name)
				defer f.Close()
				f.WriteString(name)
				sent = append(sent, f)
			}
			d := recovery()
			tc.modify(&d)
			if err := a.Send(&d, sent...); err != nil {
				t.Fatal(err)
			}
			got, files, err := RecvRecovery(b, known)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) || files != nil {
					t.Fatalf("RecvRecovery: %v with %d files, want an error containing %q and no file", err, len(files), tc.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("RecvRecovery: %v", err)
			}
			defer closeFiles(files)
			if got.Mode != ModeRecover || len(files) != 3 {
				t.Fatalf("RecvRecovery: mode %q, %d files", got.Mode, len(files))
			}
			for i, want := range []string{"memory", "guest", "control"} {
				buf := make([]byte, 16)
				if n, _ := files[i].ReadAt(buf, 0); string(buf[:n]) != want {
					t.Errorf("file %d reads %q, want %q", i, buf[:n], want)
				}
			}
		})
	}
}

func TestRecvRejectsMalformedMessages(t *testing.T) {
	hdr := func(size, nfiles uint32) []byte {
		b := make([]byte, 8)
		binary.LittleEndian.PutUint32(b, size)
		binary.LittleEndian.PutUint32(b[4:], nfiles)
		return b
	}
	tests := []struct {
		name string
		raw  []byte
		want string
	}{
		{"an oversized length is refused", hdr(maxMessage+1, 0), "exceeds"},
		{"announced files that did not come are refused", append(hdr(2, 1), "{}"...), "announces 1 files, 0 came"},
		{"a body that is not JSON is refused", append(hdr(3, 0), "{x}"...), "decoding"},
		{"a truncated body is refused", append(hdr(100, 0), "{}"...), "body"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, peer, err := Pair()
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			go func() {
				peer.Write(tc.raw)
				time.Sleep(50 * time.Millisecond)
				peer.Close()
			}()
			var d Descriptor
			_, err = a.Recv(&d)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Recv: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestAwaitCommitAcceptsOnlyTheOldSentrysCommit(t *testing.T) {
	tests := []struct {
		name string
		old  func(c *Channel)
		want string
	}{
		{"the old sentry's commit", func(c *Channel) { c.Send(&Commit{PID: 42}) }, ""},
		{"the channel ends instead (the old sentry rolled back or died)", func(c *Channel) {}, "EOF"},
		{"a commit from another pid", func(c *Channel) { c.Send(&Commit{PID: 7}) }, "pid 7"},
		{"a commit with a file attached", func(c *Channel) { c.Send(&Commit{PID: 42}, os.Stdin) }, "1 files"},
		{"garbage", func(c *Channel) { c.conn.Write([]byte{3, 0, 0, 0, 0, 0, 0, 0, 'x', 'y', 'z'}) }, "decoding"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			old, peer, err := Pair()
			if err != nil {
				t.Fatal(err)
			}
			newc, err := NewChannel(peer)
			if err != nil {
				t.Fatal(err)
			}
			defer newc.Close()
			tc.old(old)
			old.Close()
			err = newc.AwaitCommit(42)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("AwaitCommit: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("AwaitCommit: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// Sending a file must not make its open file description blocking: a
// listener serving on a dup of it shares the description.
func TestSendLeavesTheFilesNonBlocking(t *testing.T) {
	a, peer, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := NewChannel(peer)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "nonblocking")
	defer f.Close()
	defer unix.Close(fds[1])
	go func() {
		var m struct{}
		if files, err := b.Recv(&m); err == nil {
			for _, f := range files {
				f.Close()
			}
		}
	}()
	if err := a.Send(&struct{}{}, f); err != nil {
		t.Fatal(err)
	}
	if _, err := Inherit(f); err != nil {
		t.Fatal(err)
	}
	fl, err := unix.FcntlInt(uintptr(fds[1]), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	rc, _ := f.SyscallConn()
	rc.Control(func(fd uintptr) { fl, _ = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if fl&unix.O_NONBLOCK == 0 {
		t.Fatal("sending the file made it blocking")
	}
}
