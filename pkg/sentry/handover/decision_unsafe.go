package handover

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The decision word of a transfer-mode restart (protocol 4): one 32-bit
// word in a sealed 4 KiB memfd that only the two sentries map. It starts
// open; the new sentry moves it to committed once it has booted, the old
// one to abandoned when it gives up (its deadline, a refusal, the channel
// ending). Whichever compare-and-swap comes first decides the restart, so
// the new sentry serves the moment it wins, without waiting for a message
// from the old one, and a rollback can never meet a new sentry that
// served. (Protocol 3 decided by messages instead: the ack, then the old
// sentry's Commit, one more hand-off between processes inside the
// blackout.)
const (
	decisionOpen      uint32 = 0
	decisionCommitted uint32 = 1
	decisionAbandoned uint32 = 2

	// decisionSize is the size of the decision file: one page.
	decisionSize = 4096
	// decisionSeals are the seals the file must carry: a peer that could
	// shrink it could make the other's access fault (SIGBUS).
	decisionSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
)

// decision is one side's mapping of the decision word.
type decision struct {
	file *os.File
	mem  []byte
	word *uint32
}

// newDecision creates the decision file, open, and maps it (the old
// sentry, before the pause).
func newDecision() (*decision, error) {
	fd, err := unix.MemfdCreate("livesentry-handover-decision", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("the decision file: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "handover-decision")
	if err := unix.Ftruncate(fd, decisionSize); err != nil {
		f.Close()
		return nil, fmt.Errorf("the decision file: ftruncate: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, decisionSeals); err != nil {
		f.Close()
		return nil, fmt.Errorf("the decision file: sealing: %w", err)
	}
	d, err := mapDecision(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	// The file's page is allocated now, not by the new sentry's first
	// look at the word, inside the blackout.
	atomic.StoreUint32(d.word, decisionOpen)
	return d, nil
}

// openDecision maps a decision file received from the old sentry (the new
// sentry), after checking that it is a sealed memfd of one page whose word
// is still open. It takes f, even on error.
func openDecision(f *os.File) (*decision, error) {
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("handover descriptor: files.decision is not a memfd (F_GET_SEALS: %w)", err)
	}
	if seals&decisionSeals != decisionSeals {
		f.Close()
		return nil, fmt.Errorf("handover descriptor: files.decision has seals %#x, want at least %#x (shrink, grow, seal)", seals, decisionSeals)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("handover descriptor: files.decision: fstat: %w", err)
	}
	if st.Size != decisionSize {
		f.Close()
		return nil, fmt.Errorf("handover descriptor: files.decision is %d bytes, want %d", st.Size, decisionSize)
	}
	d, err := mapDecision(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	if w := atomic.LoadUint32(d.word); w != decisionOpen {
		d.close()
		return nil, fmt.Errorf("handover descriptor: files.decision holds %d, want %d (open)", w, decisionOpen)
	}
	return d, nil
}

func mapDecision(f *os.File) (*decision, error) {
	// Populated: the new sentry maps it inside the blackout, where a
	// fault on the word would cost a trap more.
	mem, err := unix.Mmap(int(f.Fd()), 0, decisionSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("the decision file: mmap: %w", err)
	}
	return &decision{file: f, mem: mem, word: (*uint32)(unsafe.Pointer(&mem[0]))}, nil
}

// commit moves the word from open to committed; false if the old sentry
// abandoned the restart first.
func (d *decision) commit() bool {
	return atomic.CompareAndSwapUint32(d.word, decisionOpen, decisionCommitted)
}

// abandon moves the word from open to abandoned; false if the new sentry
// committed first.
func (d *decision) abandon() bool {
	return atomic.CompareAndSwapUint32(d.word, decisionOpen, decisionAbandoned)
}

// committed reports whether the new sentry committed.
func (d *decision) committed() bool {
	return atomic.LoadUint32(d.word) == decisionCommitted
}

// close unmaps the word and closes the file; nil-safe.
func (d *decision) close() {
	if d == nil {
		return
	}
	unix.Munmap(d.mem)
	d.file.Close()
}
