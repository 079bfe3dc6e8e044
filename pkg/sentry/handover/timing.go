package handover

import "time"

// Timing is the breakdown of one live restart: the one type both sentries
// fill, the CLI prints, the state file keeps and the tests decode. The old
// sentry fills its half and sends it in the Descriptor; the new sentry adds
// its half and sends it back in the Ack; Finish derives the rest.
//
// Every duration is a phase of the blackout, in the order they run:
//
//	freeze     LUO serialize in the old sentry: every preserved file frozen, the records written
//	finalize   KHO finalize in the old sentry: the preserved-memory map written
//	send       the descriptor and files crossing (transfer), or execve (exec)
//	map        the new sentry mapping the memory file (0 after a preview: mapped before the pause)
//	ingest     the new sentry reading the KHO root and map and adopting the preserved folios
//	           (read ahead: the root page read again and compared, the tree read before the pause adopted)
//	luo        the new sentry registering file handlers and deserializing LUO
//	ready      the rest until the new sentry serves guests: the decision (protocol 3: the ack, the old sentry's commit)
//	blackout   all of it: guest calls paused in the old sentry until the new one serves
type Timing struct {
	Mode string `json:"mode"`
	// Freeze and Finalize are the old sentry's phases.
	Freeze   time.Duration `json:"freeze_ns"`
	Finalize time.Duration `json:"finalize_ns"`
	// Send is from SentAt to ReceivedAt.
	Send time.Duration `json:"send_ns"`
	// Map, Ingest (parse and adopt) and LUO are the new sentry's boot
	// phases.
	Map    time.Duration `json:"map_ns"`
	Ingest time.Duration `json:"ingest_ns"`
	LUO    time.Duration `json:"luo_ns"`
	// ReadAhead says the new sentry booted from the KHO tree it read
	// before the pause (protocol 5's Preview): Ingest read only the root
	// page again. (Map is 0 whenever the preview's mapping was taken,
	// even if the tree had to be read again.)
	ReadAhead bool `json:"read_ahead,omitempty"`
	// Ready is from the end of LUO deserialize to serving guests.
	Ready time.Duration `json:"ready_ns"`
	// Blackout is from PausedAt to AcceptingAt.
	Blackout time.Duration `json:"blackout_ns"`
	// OldPID and NewPID are the sentries' pids (equal in exec mode).
	OldPID int `json:"old_pid"`
	NewPID int `json:"new_pid"`
	// OldVersion and NewVersion are their version strings.
	OldVersion string `json:"old_version"`
	NewVersion string `json:"new_version"`
	// LiveupdateNumber is the new sentry's liveupdate number.
	LiveupdateNumber uint64 `json:"liveupdate_number"`
	// Formats are the formats the handover was written in (the
	// descriptor's Compatibles).
	Formats []string `json:"formats,omitempty"`
	// PausedAt, SentAt, ReceivedAt and AcceptingAt are CLOCK_MONOTONIC
	// times (ns, see Monotonic): guest calls paused in the old sentry, the
	// descriptor sent (or execve called), the descriptor received, and
	// the new sentry serving guests (the end of the blackout). They relate
	// guest-side times to the blackout.
	PausedAt    int64 `json:"paused_at"`
	SentAt      int64 `json:"sent_at"`
	ReceivedAt  int64 `json:"received_at"`
	AcceptingAt int64 `json:"accepting_at"`
}

// Finish derives Send, Ready and Blackout from the times, once AcceptingAt
// is the end of the blackout.
func (t *Timing) Finish() {
	t.Send = time.Duration(t.ReceivedAt - t.SentAt)
	t.Blackout = time.Duration(t.AcceptingAt - t.PausedAt)
	t.Ready = time.Duration(t.AcceptingAt-t.ReceivedAt) - t.Map - t.Ingest - t.LUO
}

// Phases returns the phases in order with their names, as the CLI prints
// them and docs/restart.md defines them.
func (t *Timing) Phases() []Phase {
	return []Phase{
		{"freeze", t.Freeze}, {"finalize", t.Finalize}, {"send", t.Send}, {"map", t.Map},
		{"ingest", t.Ingest}, {"luo", t.LUO}, {"ready", t.Ready}, {"blackout", t.Blackout},
	}
}

// Phase is one named duration of a restart.
type Phase struct {
	Name     string
	Duration time.Duration
}
