package luo

import (
	"bytes"
	"fmt"
)

// Carried records. When KHO carries the incoming handover over as its
// outgoing state (kho.KHO.Carried: the same root, the same radix tree,
// every incoming block still preserved), LUO does the same with its
// records: the incoming LUO FDT, session header and file arrays become the
// outgoing records as they are, each incoming session keeping its slot.
// Nothing is written before the commit, and from then on the records
// describe, at every instant, every incoming session that is not yet
// finished together with every session made in this sentry, so that a
// crash of this sentry loses no incoming session (docs/crash.md):
//
//   - FINISH (and the close of a retrieved session, which finishes it)
//     unpublishes the session's record, then finishes its files, whose
//     handlers free their records and folios (memfd keeps them until
//     then, see memfd.luoHandler.finish);
//   - a session created under the name of an incoming one whose record is
//     still published unpublishes that record first (a header never names
//     two sessions alike; the guest has taken the name over);
//   - liveupdate-number + 1 is stored into the carried FDT (one aligned
//     store) before the first change this sentry makes to the records, or
//     at a freeze (undone by Abort): a sentry recovered from records this
//     one never changed gets the number this one had, as if the handover
//     that started this one happened again, and one recovered after a
//     change counts this sentry's live update, as a planned restart would;
//   - Settle, after the commit, makes the spare header block a carried
//     header lacks;
//   - a planned restart hands carried sessions over again, as they came.
//
// Records are carried only when their FDT is exactly what this sentry
// would write (buildFDT); otherwise they are read, copied and freed after
// the commit (ReleaseIncomingRecords), and a crash loses the incoming
// sessions not yet preserved again, as with a kho-v1 handover.

// carryLocked makes the records in (read by Deserialize, holding sessions)
// the outgoing records, if KHO carried the handover and the FDT is laid out
// as buildFDT lays it out. It writes nothing.
//
// +checklocks:l.mu
func (l *LUO) carryLocked(in *incomingState, sessions []*Session) bool {
	if !l.kho.Carried() || len(in.blocks) < 2 || len(in.files) != len(sessions) {
		return false
	}
	want, hdrOff, numOff, err := buildFDT(in.num, in.hdrAddr)
	if err != nil || len(want) > len(in.fdtBlob) || !bytes.Equal(want, in.fdtBlob[:len(want)]) {
		return false
	}
	r := &records{fdt: in.blocks[0], hdrOff: hdrOff, numOff: numOff}
	r.hdr[0] = in.blocks[1]
	for i, s := range sessions {
		sr := &sessionRecord{s: s, slot: i, files: in.files[i], n: len(in.compat[i]), compat: in.compat[i]}
		r.slots = append(r.slots, sr)
		s.rec = sr
	}
	l.recMu.Lock()
	l.rec = r
	l.carried = true
	l.carriedNum = in.num
	l.recMu.Unlock()
	return true
}

// Carried reports whether Deserialize carried the incoming records over as
// the outgoing ones: incoming sessions not yet finished are then in the
// records, and cross a crash or a planned restart as they came.
func (l *LUO) Carried() bool {
	l.recMu.Lock()
	defer l.recMu.Unlock()
	return l.carried
}

// Settle finishes carrying the records (see carryLocked) once the handover
// is committed: it makes the spare header block. Nothing is done for
// records that were not carried, or twice.
func (l *LUO) Settle() {
	l.recMu.Lock()
	defer l.recMu.Unlock()
	if !l.carried || l.settled {
		return
	}
	l.settled = true
	l.spareLocked()
}

// bumpLocked stores this sentry's liveupdate-number + 1 into carried
// records that still hold the previous sentry's, before a change to them
// (or a freeze), and reports whether it stored it.
//
// +checklocks:l.recMu
func (l *LUO) bumpLocked() bool {
	if !l.carried || l.bumped {
		return false
	}
	l.bumped = true
	store64(l.mf().Bytes(l.rec.fdt)[l.rec.numOff:], l.carriedNum+1)
	return true
}

// unbumpLocked undoes a bumpLocked of a freeze that is aborted.
//
// +checklocks:l.recMu
func (l *LUO) unbumpLocked() {
	l.bumped = false
	store64(l.mf().Bytes(l.rec.fdt)[l.rec.numOff:], l.carriedNum)
}

// unpublishIncomingLocked unpublishes the record of the incoming session
// called name, if it has one: a session of that name is being created. It
// fails like removeSessionRecordLocked.
//
// +checklocks:l.mu
// +checklocks:l.recMu
func (l *LUO) unpublishIncomingLocked(name string) error {
	for _, s := range l.incoming {
		if s.name == name && s.rec != nil {
			return l.removeSessionRecordLocked(s)
		}
	}
	return nil
}

// checkCarriedLocked fails a serialization for a next sentry that cannot
// read a carried file record as it is (carried records are handed over
// unchanged): ErrNoCommonFormat, naming the session and the token.
//
// +checklocks:l.recMu
func (l *LUO) checkCarriedLocked(opts SerializeOptions) error {
	if opts.PeerReads == nil || l.rec == nil {
		return nil
	}
	for _, sr := range l.rec.slots {
		if !sr.s.incoming {
			continue
		}
		for j, c := range sr.compat {
			if !contains(opts.PeerReads, c) {
				return fmt.Errorf("%w: incoming session %q, handed over again as it came, has file record %d in %q; the next sentry reads %q (retrieve and finish the session, or preserve its files again, first)", ErrNoCommonFormat, sr.s.name, j, c, opts.PeerReads)
			}
		}
	}
	// The FDT and session formats are checked for every handover
	// (planLocked).
	return nil
}
