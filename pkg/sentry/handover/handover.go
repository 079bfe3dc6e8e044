// Package handover carries a sentry's state to the next sentry process at
// a live restart: the handover descriptor (what crosses besides the memory
// file: the KHO root address, the liveupdate number, the ABI strings, the
// sandbox's configuration and the outgoing side's timing), the restart
// protocol on both sides, and its two transports:
//
//   - transfer: the new sentry runs next to the old one, connected by a
//     Unix socket pair. It says Ready; the old one (protocol 5) shows it
//     the memory file and the KHO root before the pause (Preview), which
//     it reads ahead and answers (Previewed); the old one pauses and
//     sends the descriptor with the memory file and the sandbox's
//     listening sockets as SCM_RIGHTS. The new one boots without changing anything the old one
//     could still need, then the restart is decided. Protocol 4: by the
//     decision word (decision_unsafe.go), a word in a sealed memfd that
//     crossed with the descriptor, which the new sentry moves from open to
//     committed and the old one, giving up, from open to abandoned;
//     whichever compare-and-swap comes first decides. The new sentry
//     serves as soon as it wins, and then sends its Ack (with its timing)
//     and Serving. Protocol 3, spoken with builds that know no newer one:
//     the new sentry sends the Ack, then waits for the old one's Commit,
//     sent once the old one has read the Ack within its deadline; it
//     exits untouched if the channel ends instead. Either way the old
//     sentry never rolls back once the new one may have served, and
//     Serving marks the end of the blackout.
//   - exec: the old sentry execve's the new binary; the descriptor goes in
//     an environment variable and the files are inherited (FD_CLOEXEC
//     cleared), their numbers named in the descriptor.
//
// Offer and Accept run the two sides of a transfer-mode restart, OfferExec
// and AcceptExec those of an exec-mode one (protocol.go). They reach the
// sentries only through the Source and Target interfaces, build the undo of
// every step as they go (gvisor.dev/gvisor/pkg/cleanup), and take fault
// points as options, so that every step of both sides is tested in one
// process.
//
// Messages are length-prefixed JSON. Everything received is validated
// field by field (Descriptor.Validate) before it is used, and a bad message
// is an error naming the field, never a panic.
package handover

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// ProtocolVersion is the newest version of the handover messages, and
// OldestProtocol the oldest this build speaks. Version 2 added Commit;
// version 3 carries one Timing in the descriptor and the ack; version 4
// decides a transfer-mode restart with the decision word instead of the
// Commit (one hand-off between processes fewer inside the blackout);
// version 5 shows the new sentry the memory file before the pause
// (Preview), so that it reads KHO's radix tree outside the blackout. Two
// sentries speak the newest version both know; a descriptor of a version
// outside [OldestProtocol, ProtocolVersion] is refused.
const (
	ProtocolVersion = 5
	OldestProtocol  = 3
)

// commitProtocol is the first version decided by the decision word, and
// previewProtocol the first with a Preview.
const (
	commitProtocol  = 4
	previewProtocol = 5
)

// Modes of a live restart.
const (
	ModeTransfer = "transfer"
	ModeExec     = "exec"
	// ModeRecover is no restart but a recovery: the sentry died, and a
	// supervisor that held the memory file starts a new one on it, with
	// the descriptor and inherited files as in exec mode.
	ModeRecover = "recover"
)

// Files names the files that cross, by index into the SCM_RIGHTS array
// (transfer) or by inherited fd number (exec).
type Files struct {
	// MemoryFile is the memory file.
	MemoryFile int `json:"memory_file"`
	// GuestListener is the sandbox's listening guest socket.
	GuestListener int `json:"guest_listener"`
	// ControlListener is the sandbox's listening control socket.
	ControlListener int `json:"control_listener"`
	// Decision is the decision file (transfer mode, protocol 4 and
	// later; 0 and unused otherwise).
	Decision int `json:"decision,omitempty"`
}

// Descriptor is what the old sentry hands to the new one besides the files.
type Descriptor struct {
	// Protocol is ProtocolVersion of the sender.
	Protocol int `json:"protocol"`
	// Mode is ModeTransfer or ModeExec.
	Mode string `json:"mode"`
	// Version is the old sentry's version string.
	Version string `json:"version"`
	// PID is the old sentry's pid.
	PID int `json:"pid"`
	// Root is the byte address of the KHO root in the memory file.
	Root uint64 `json:"root"`
	// LiveupdateNumber is the old sentry's LUO liveupdate number.
	LiveupdateNumber uint64 `json:"liveupdate_number"`
	// MemorySize is the size of the memory file in bytes.
	MemorySize uint64 `json:"memory_size"`
	// Compatibles are the ABI strings the handover uses: KHO's, LUO's and
	// the file handler of every preserved file. The new sentry refuses,
	// before it touches the memory file, a handover with one it does not
	// know.
	Compatibles []string `json:"compatibles"`
	// Files says where the files are.
	Files Files `json:"files"`
	// Sandbox is the sandbox's configuration, opaque to this package.
	Sandbox []byte `json:"sandbox"`
	// OldGuests are the host pids of guest processes the old sentry
	// launched that the new one must stop (exec mode: they are its
	// children now).
	OldGuests []int `json:"old_guests,omitempty"`
	// OldGuestStarts are the start times of OldGuests, in order (clock
	// ticks since boot, /proc/PID/stat's 22nd field): with its pid, a
	// guest's identity, which the new sentry waits on without reading
	// /proc. Absent from sentries of protocol 3.
	OldGuestStarts []uint64 `json:"old_guest_starts,omitempty"`
	// Timing has the old sentry's half of the restart's timing: Mode,
	// Freeze, Finalize, PausedAt, SentAt, OldPID, OldVersion.
	Timing Timing `json:"timing"`
	// Generation (protocol 5, transfer mode) is the KHO tree generation
	// the old sentry finalized with: if it is the Preview's, the tree
	// has not changed since the Preview, and the new sentry may boot
	// from what it read then. 0 (absent) otherwise.
	Generation uint64 `json:"generation,omitempty"`
}

// Validate checks every field of a received descriptor; the error names the
// first bad one. nfiles is how many files came with it in a message (whose
// Files are indexes into them); 0 for a descriptor whose files are
// inherited fds (exec mode, or a recovery started by the supervisor).
// known reports whether the receiver understands an ABI string.
func (d *Descriptor) Validate(nfiles int, known func(string) bool) error {
	if d.Protocol < OldestProtocol || d.Protocol > ProtocolVersion {
		return fmt.Errorf("handover descriptor: protocol %d, this sentry speaks %d to %d", d.Protocol, OldestProtocol, ProtocolVersion)
	}
	if d.Mode != ModeTransfer && d.Mode != ModeExec && d.Mode != ModeRecover {
		return fmt.Errorf("handover descriptor: mode %q is none of %q, %q, %q", d.Mode, ModeTransfer, ModeExec, ModeRecover)
	}
	if d.Timing.Mode != d.Mode {
		return fmt.Errorf("handover descriptor: timing.mode %q differs from mode %q", d.Timing.Mode, d.Mode)
	}
	if d.PID <= 1 {
		return fmt.Errorf("handover descriptor: pid %d is not a sentry's", d.PID)
	}
	if d.Root == 0 || d.Root%4096 != 0 {
		return fmt.Errorf("handover descriptor: root %#x is not a non-zero page address", d.Root)
	}
	if d.MemorySize == 0 || d.MemorySize%4096 != 0 || d.Root >= d.MemorySize {
		return fmt.Errorf("handover descriptor: memory size %d is not a page multiple holding root %#x", d.MemorySize, d.Root)
	}
	for _, c := range d.Compatibles {
		if !known(c) {
			return fmt.Errorf("handover descriptor: unknown compatible %q (the old sentry %q preserved state this sentry cannot read)", c, d.Version)
		}
	}
	fs := []struct {
		name string
		v    int
	}{{"memory_file", d.Files.MemoryFile}, {"guest_listener", d.Files.GuestListener}, {"control_listener", d.Files.ControlListener}}
	if d.decidedByWord() {
		fs = append(fs, struct {
			name string
			v    int
		}{"decision", d.Files.Decision})
	} else if d.Files.Decision != 0 {
		return fmt.Errorf("handover descriptor: files.decision = %d in a %s-mode protocol %d handover, which has none", d.Files.Decision, d.Mode, d.Protocol)
	}
	// Over a channel the files come with the descriptor and are named by
	// index (transfer mode, and a recovery handed to a spare sentry);
	// otherwise they are inherited fds.
	inMessage := d.Mode == ModeTransfer || nfiles > 0
	for i, f := range fs {
		if inMessage && (f.v < 0 || f.v >= nfiles) {
			return fmt.Errorf("handover descriptor: files.%s = %d, but %d files came", f.name, f.v, nfiles)
		}
		if !inMessage && f.v < 3 {
			return fmt.Errorf("handover descriptor: files.%s = %d is not an inherited fd", f.name, f.v)
		}
		for _, g := range fs[:i] {
			if g.v == f.v {
				return fmt.Errorf("handover descriptor: files.%s and files.%s are both %d", g.name, f.name, f.v)
			}
		}
	}
	for _, pid := range d.OldGuests {
		if pid <= 1 {
			return fmt.Errorf("handover descriptor: old guest pid %d", pid)
		}
	}
	if d.OldGuestStarts != nil && len(d.OldGuestStarts) != len(d.OldGuests) {
		return fmt.Errorf("handover descriptor: %d old_guest_starts for %d old_guests", len(d.OldGuestStarts), len(d.OldGuests))
	}
	for i, st := range d.OldGuestStarts {
		if st == 0 {
			return fmt.Errorf("handover descriptor: old_guest_starts[%d] is 0 (no start time)", i)
		}
	}
	if d.Generation != 0 && (d.Mode != ModeTransfer || d.Protocol < previewProtocol) {
		return fmt.Errorf("handover descriptor: generation %d in a %s-mode protocol %d handover, which has no preview", d.Generation, d.Mode, d.Protocol)
	}
	if d.Timing.PausedAt <= 0 || d.Timing.SentAt < d.Timing.PausedAt {
		return fmt.Errorf("handover descriptor: timing.paused_at %d, timing.sent_at %d: not increasing monotonic times", d.Timing.PausedAt, d.Timing.SentAt)
	}
	return nil
}

// decidedByWord reports whether d's restart is decided by the decision
// word: transfer mode, protocol 4 or later.
func (d *Descriptor) decidedByWord() bool {
	return d.Mode == ModeTransfer && d.Protocol >= commitProtocol
}

// Ready is the new sentry's first message in transfer mode.
type Ready struct {
	// Protocol is the version the new sentry speaks with an old sentry
	// that reads no Newest: OldestProtocol (builds of protocol 3 accept
	// only a Ready of their own version).
	Protocol int `json:"protocol"`
	// Newest is the newest version the new sentry speaks; the old one
	// speaks the newest both know. Absent (0) from protocol 3 builds.
	Newest int `json:"newest_protocol,omitempty"`
	// Version is the new sentry's version string.
	Version string `json:"version"`
	// PID is the new sentry's pid.
	PID int `json:"pid"`
	// Reads are the ABI strings the new sentry reads, every subsystem's
	// together: the old sentry writes, per subsystem, the newest format
	// in it.
	Reads []string `json:"reads"`
}

// previewKind is the Kind of every Preview, which tells it apart from a
// Descriptor (which has no kind) as the first message after Ready.
const previewKind = "preview"

// Preview (protocol 5, transfer mode) is the old sentry's first message
// after Ready, before the pause: what it will hand over, with the memory
// file attached (SCM_RIGHTS) unless Root is 0, which says there is nothing
// to read ahead (the handover will be in kho-v1, or the Source cannot
// say). The new sentry reads the KHO radix tree while the old one still
// runs, answers Previewed, and boots from what it read if the
// descriptor's Generation is this one (nothing was preserved or
// unpreserved in between); otherwise it reads the handover again, as
// without a Preview. Nothing in it is trusted beyond that: the descriptor
// and the memory file decide.
type Preview struct {
	// Kind is previewKind.
	Kind string `json:"kind"`
	// Root is the byte address of the KHO root in the memory file; 0:
	// nothing to read ahead, and no file attached.
	Root uint64 `json:"root,omitempty"`
	// MemorySize is the size of the memory file in bytes.
	MemorySize uint64 `json:"memory_size,omitempty"`
	// Generation is the old sentry's KHO tree generation, read before the
	// memory file was attached.
	Generation uint64 `json:"generation,omitempty"`
}

// Validate checks a received preview with nfiles files attached; the error
// names the first bad field.
func (p *Preview) Validate(nfiles int) error {
	switch {
	case p.Kind != previewKind:
		return fmt.Errorf("handover preview: kind %q, want %q", p.Kind, previewKind)
	case p.Root == 0 && (nfiles != 0 || p.MemorySize != 0 || p.Generation != 0):
		return fmt.Errorf("handover preview: root 0 (nothing to read ahead) with %d files, memory size %d, generation %d", nfiles, p.MemorySize, p.Generation)
	case p.Root == 0:
		return nil
	case nfiles != 1:
		return fmt.Errorf("handover preview: %d files came, want the memory file only", nfiles)
	case p.Root%4096 != 0:
		return fmt.Errorf("handover preview: root %#x is not a page address", p.Root)
	case p.MemorySize == 0 || p.MemorySize%4096 != 0 || p.Root >= p.MemorySize:
		return fmt.Errorf("handover preview: memory size %d is not a page multiple holding root %#x", p.MemorySize, p.Root)
	}
	return nil
}

// Previewed is the new sentry's answer to a Preview, once it has read
// ahead what it could. Error says why it refused a malformed Preview;
// then it exits, and the old sentry rolls back.
type Previewed struct {
	Error string `json:"error,omitempty"`
}

// Ack is the new sentry's answer to a descriptor.
type Ack struct {
	// Accepted is true if the new sentry took over; false if it refused,
	// in which case it touched nothing and exits.
	Accepted bool `json:"accepted"`
	// Error says why it refused.
	Error string `json:"error,omitempty"`
	// Version is the new sentry's version string.
	Version string `json:"version"`
	// PID is the new sentry's pid.
	PID int `json:"pid"`
	// Committed (protocol 4) says the new sentry won the decision word
	// and serves; an accepted Ack of protocol 3 waits for the Commit.
	Committed bool `json:"committed,omitempty"`
	// Timing is the descriptor's timing with the new sentry's half added:
	// ReceivedAt, Map, Ingest, LUO, AcceptingAt (protocol 3: the time the
	// ack was sent; 4: the time it started serving), NewPID and
	// NewVersion.
	Timing Timing `json:"timing"`
}

// Commit is the old sentry's answer to an accepted Ack (protocol 3): it
// read the Ack within its deadline, handed off, and will never roll back.
// Only then may the new sentry commit (scrub), serve guests and relaunch
// the entrypoint. Protocol 4 has the decision word instead.
type Commit struct {
	// PID is the old sentry's pid.
	PID int `json:"pid"`
}

// Serving is the new sentry's last message in transfer mode: once the
// restart is its own (protocol 3: the old sentry's Commit; 4: the decision
// word) it commits (lets its allocator scrub what was not
// preserved), then serves guests. At is the CLOCK_MONOTONIC time (ns) it
// started serving, the end of the blackout.
type Serving struct {
	At int64 `json:"at"`
}

// Monotonic returns CLOCK_MONOTONIC in nanoseconds, comparable between
// processes on one host.
func Monotonic() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(fmt.Sprintf("clock_gettime(CLOCK_MONOTONIC): %v", err))
	}
	return ts.Nano()
}
