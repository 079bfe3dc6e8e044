// Package handover carries a sentry's state to the next sentry process at
// a live restart: the handover descriptor (what crosses besides the memory
// file: the KHO root address, the liveupdate number, the ABI strings, the
// sandbox's configuration and the outgoing side's timing) and the two
// transports of DESIGN.md's "Live restart":
//
//   - transfer: the new sentry runs next to the old one, connected by a
//     Unix socket pair. It says Ready; the old one sends the descriptor
//     with the memory file and the sandbox's listening sockets as
//     SCM_RIGHTS; the new one answers with an Ack (accepted, with its
//     timing, or refused, with the reason). An accepted Ack is followed by
//     the old sentry's Commit: the new sentry must not change anything the
//     old one could still need (scrub, serve guests, relaunch the
//     entrypoint) before it has the Commit, because until the old one has
//     read the Ack it may still time out and roll back. The new sentry
//     exits untouched if the channel ends instead; the old one never rolls
//     back once it has sent the Commit. Serving, the new sentry's last
//     message, marks the end of the blackout.
//   - exec: the old sentry execve's the new binary; the descriptor goes in
//     an environment variable and the files are inherited (FD_CLOEXEC
//     cleared), their numbers named in the descriptor.
//
// Messages are length-prefixed JSON. Everything received is validated
// field by field (Descriptor.Validate) before it is used, and a bad message
// is an error naming the field, never a panic.
package handover

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// ProtocolVersion is the version of the handover messages. A sentry
// refuses a descriptor of another version. Version 2 added Commit.
const ProtocolVersion = 2

// Modes of a live restart.
const (
	ModeTransfer = "transfer"
	ModeExec     = "exec"
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
	// PausedAt is the CLOCK_MONOTONIC time (ns) at which the old sentry
	// paused guest dispatch: the start of the blackout.
	PausedAt int64 `json:"paused_at"`
	// Freeze and Finalize are how long LUO freeze and KHO finalize took.
	Freeze   time.Duration `json:"freeze_ns"`
	Finalize time.Duration `json:"finalize_ns"`
	// SentAt is the CLOCK_MONOTONIC time (ns) just before the descriptor
	// was sent (transfer) or execve was called (exec).
	SentAt int64 `json:"sent_at"`
}

// Validate checks every field of a received descriptor; the error names the
// first bad one. known reports whether the receiver understands an ABI
// string.
func (d *Descriptor) Validate(nfiles int, known func(string) bool) error {
	if d.Protocol != ProtocolVersion {
		return fmt.Errorf("handover descriptor: protocol %d, this sentry speaks %d", d.Protocol, ProtocolVersion)
	}
	if d.Mode != ModeTransfer && d.Mode != ModeExec {
		return fmt.Errorf("handover descriptor: mode %q is neither %q nor %q", d.Mode, ModeTransfer, ModeExec)
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
	for i, f := range fs {
		if d.Mode == ModeTransfer && (f.v < 0 || f.v >= nfiles) {
			return fmt.Errorf("handover descriptor: files.%s = %d, but %d files came", f.name, f.v, nfiles)
		}
		if d.Mode == ModeExec && f.v < 3 {
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
	if d.PausedAt <= 0 || d.SentAt < d.PausedAt {
		return fmt.Errorf("handover descriptor: paused_at %d, sent_at %d: not increasing monotonic times", d.PausedAt, d.SentAt)
	}
	return nil
}

// Ready is the new sentry's first message in transfer mode.
type Ready struct {
	// Protocol is ProtocolVersion of the new sentry.
	Protocol int `json:"protocol"`
	// Version is the new sentry's version string.
	Version string `json:"version"`
	// PID is the new sentry's pid.
	PID int `json:"pid"`
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
	// ReceivedAt is the CLOCK_MONOTONIC time (ns) the descriptor arrived.
	ReceivedAt int64 `json:"received_at"`
	// Map, Ingest and LUO are the new sentry's boot steps.
	Map    time.Duration `json:"map_ns"`
	Ingest time.Duration `json:"ingest_ns"`
	LUO    time.Duration `json:"luo_ns"`
	// AcceptingAt is the CLOCK_MONOTONIC time (ns) the Ack was sent; the
	// old sentry replaces it with Serving.At, the end of the blackout.
	AcceptingAt int64 `json:"accepting_at"`
}

// Commit is the old sentry's answer to an accepted Ack: it read the Ack
// within its deadline, handed off, and will never roll back. Only then may
// the new sentry commit (scrub), serve guests and relaunch the entrypoint.
type Commit struct {
	// PID is the old sentry's pid.
	PID int `json:"pid"`
}

// Serving is the new sentry's last message in transfer mode: after the
// old sentry's Commit it commits (lets its allocator scrub what was not preserved), then
// serves guests. At is the CLOCK_MONOTONIC time (ns) it started serving,
// the end of the blackout.
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

// Timing is the breakdown of one live restart, as runsc-luo restart prints
// it.
type Timing struct {
	Mode string `json:"mode"`
	// Freeze is LUO serialize (freeze) in the old sentry.
	Freeze time.Duration `json:"freeze_ns"`
	// Finalize is KHO finalize in the old sentry.
	Finalize time.Duration `json:"finalize_ns"`
	// Send is from just before the send (or execve) until the new sentry
	// had the descriptor.
	Send time.Duration `json:"send_ns"`
	// Map, Ingest (parse and adopt) and LUO are the new sentry's boot
	// steps.
	Map    time.Duration `json:"map_ns"`
	Ingest time.Duration `json:"ingest_ns"`
	LUO    time.Duration `json:"luo_ns"`
	// Ready is from the end of LUO deserialize to accepting guests.
	Ready time.Duration `json:"ready_ns"`
	// Blackout is from guest dispatch paused in the old sentry to the new
	// sentry accepting guests.
	Blackout time.Duration `json:"blackout_ns"`
	// OldPID and NewPID are the sentries' pids (equal in exec mode).
	OldPID int `json:"old_pid"`
	NewPID int `json:"new_pid"`
	// OldVersion and NewVersion are their version strings.
	OldVersion string `json:"old_version"`
	NewVersion string `json:"new_version"`
	// LiveupdateNumber is the new sentry's liveupdate number.
	LiveupdateNumber uint64 `json:"liveupdate_number"`
	// PausedAt and AcceptingAt are the CLOCK_MONOTONIC times (ns) of the
	// blackout's start and end, to relate guest-side times to it.
	PausedAt    int64 `json:"paused_at"`
	AcceptingAt int64 `json:"accepting_at"`
}

// MakeTiming combines the old sentry's descriptor and the new one's ack.
func MakeTiming(d *Descriptor, a *Ack, oldPID int) Timing {
	t := Timing{
		Mode:             d.Mode,
		Freeze:           d.Freeze,
		Finalize:         d.Finalize,
		Send:             time.Duration(a.ReceivedAt - d.SentAt),
		Map:              a.Map,
		Ingest:           a.Ingest,
		LUO:              a.LUO,
		Blackout:         time.Duration(a.AcceptingAt - d.PausedAt),
		OldPID:           oldPID,
		NewPID:           a.PID,
		OldVersion:       d.Version,
		NewVersion:       a.Version,
		LiveupdateNumber: d.LiveupdateNumber + 1,
		PausedAt:         d.PausedAt,
		AcceptingAt:      a.AcceptingAt,
	}
	t.Ready = time.Duration(a.AcceptingAt-a.ReceivedAt) - a.Map - a.Ingest - a.LUO
	return t
}
