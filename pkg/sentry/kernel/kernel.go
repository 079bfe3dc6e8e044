// Package kernel is the sentry: the memory file, KHO and LUO (with the memfd
// file handler registered), guest processes with their fd tables, and the
// dispatcher of guest calls.
//
// A Kernel is made by a cold boot (New: a fresh memory file) or a
// live-update boot (NewFromHandover: the memory file and KHO root the
// previous sentry handed over). Guests reach it through Serve, one
// connection per guest process (see pkg/abi/guest for the wire format).
//
// A live restart drives a Kernel through these steps, mirroring Linux's
// reboot(KEXEC) path: Pause (stop dispatching guest calls; guests stay
// connected and their fds stay open, so no outgoing LUO session is closed),
// PrepareHandover (LUO serialize, i.e. freeze, then KHO finalize), then
// either Handoff (the next sentry acknowledged: forget every guest without
// running any release path, since the state now belongs to the next sentry)
// or AbortHandover and Resume (the restart was refused: unfreeze, discard
// the finalize output, go on serving).
//
// Lock order: Kernel.mu → FDTable.mu; files' own locks are taken by the
// calls with neither held. The dispatch gate is a count of calls in
// progress under Kernel.mu, not a lock: a call "holds" it between enter
// and exit.
package kernel

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"golang.org/x/sys/unix"
)

// Options configures a Kernel.
type Options struct {
	// MemorySize is the size of the memory file of a cold boot, in bytes;
	// 0 means pgalloc.DefaultSize.
	MemorySize uint64
	// Logf, if not nil, receives one line per notable event (a guest
	// connecting or dropped for a malformed frame).
	Logf func(format string, args ...any)
	// Fault, if not nil, is called by a live-update boot at
	// handover.AcceptIngested, between KHO's ingest and LUO's
	// deserialize: an error from it fails the boot.
	Fault func(handover.Point) error
}

// Kernel is one sentry's state. It is safe for concurrent use.
type Kernel struct {
	mf   *pgalloc.MemoryFile
	kho  *kho.KHO
	luo  *luo.LUO
	logf func(format string, args ...any)

	// background counts work started by Commit that Shutdown waits for.
	background sync.WaitGroup
	// recovered says the kernel came from Recover: at Commit, if no
	// session was recovered, what the dead sentry preserved without
	// recording it is freed.
	recovered bool

	mu sync.Mutex

	// cond is signalled (L is &mu) whenever active, pause, handedOver or
	// shutdown changes.
	//
	// +checklocks:mu
	cond sync.Cond

	// procs are the connected guest processes.
	//
	// +checklocks:mu
	procs map[*Process]struct{}

	// active counts the guest calls in progress. It is the dispatch gate:
	// a call enters only while pause is pauseNone, and Pause waits for
	// active to drop to 0.
	//
	// +checklocks:mu
	active int

	// pause is where the kernel is in Pause/Resume.
	//
	// +checklocks:mu
	pause pauseState

	// handedOver is set by Handoff: the state belongs to the next sentry
	// and no guest's exit may release anything.
	//
	// +checklocks:mu
	handedOver bool

	// shutdown is set by Shutdown: no new guest is accepted.
	//
	// +checklocks:mu
	shutdown bool

	// lastID numbers guest processes.
	//
	// +checklocks:mu
	lastID uint64

	// pausing is set while Pause waits for the calls in progress: a call
	// entering an interruptible section then is interrupted at once.
	pausing atomic.Bool
	// interrupts counts the calls pauses interrupted.
	interrupts atomic.Uint64

	// forks are the forked children waiting for their connection to
	// attach them, by token.
	//
	// +checklocks:mu
	forks map[uint64]*forkedChild
}

// pauseState is a Kernel's state in Pause/Resume.
type pauseState int

const (
	// pauseNone: calls are dispatched.
	pauseNone pauseState = iota
	// pausePending: Pause is waiting for the calls in progress; new calls
	// wait.
	pausePending
	// pauseHeld: Pause returned; no call runs until Resume.
	pauseHeld
)

// New boots a sentry cold: a fresh memory file of opts.MemorySize bytes,
// a fresh KHO, and LUO with the memfd handler registered.
func New(opts Options) (*Kernel, error) {
	mf, err := pgalloc.New(pgalloc.Options{Size: opts.MemorySize})
	if err != nil {
		return nil, fmt.Errorf("creating the memory file: %w", err)
	}
	k, err := kho.New(mf)
	if err != nil {
		mf.Close()
		return nil, fmt.Errorf("starting KHO: %w", err)
	}
	l, err := newLUO(mf, k)
	if err != nil {
		mf.Close()
		return nil, err
	}
	return newKernel(mf, k, l, opts), nil
}

// NewFromHandover boots a sentry from what the previous one handed over:
// file is the memory file (NewFromHandover takes ownership of it) and root
// the byte address of the KHO root in it. It maps the file, ingests the KHO
// handover (which adopts the preserved folios), and deserializes LUO with
// the memfd handler registered. Any error — an unknown compatible string, a
// corrupt record — refuses the handover: the error names what was wrong,
// and the caller must exit without touching the file further so that the
// previous sentry can take it back.
//
// Releases stay held (pgalloc.Open starts so; see
// pgalloc.MemoryFile.HoldReleases): nothing the previous sentry still uses
// is scrubbed, and allocations that would need scrubbing fail with ENOMEM.
// The caller calls Commit once the previous sentry has been told the
// handover is accepted, and serves guests only after that.
//
// t, if not nil, gets the boot's phases: Map (pgalloc.Open), Ingest
// (kho.Ingest, which adopts the preserved folios) and LUO (registering the
// memfd handler and luo.Deserialize).
func NewFromHandover(file *os.File, root uint64, opts Options, t *handover.Timing) (*Kernel, error) {
	return bootFrom(file, root, opts, t, kho.Ingest)
}

// PrepareIncoming readies this process, ahead of a restart's pause, for a
// NewFromHandover of a memory file of up to memorySize bytes (0 means
// pgalloc.DefaultSize): it faults in the memory KHO's Ingest will hold the
// map in (kho.PrepareIngest), so that the blackout pays no page fault for
// it. A new sentry calls it before it says it is ready; a larger file
// still boots, with the rest of its map in fresh memory. It then
// rehearses the boot on a small state of its own (see rehearse); an error
// of the rehearsal costs only the blackout time it was to save.
func PrepareIncoming(memorySize uint64) error {
	if memorySize == 0 {
		memorySize = pgalloc.DefaultSize
	}
	// The rehearsal first: it takes pages from the pool it finds.
	_, err := rehearse()
	kho.PrepareIngest(memorySize)
	if err != nil {
		return fmt.Errorf("rehearsing a live-update boot: %w", err)
	}
	return nil
}

// Preview returns what a restart shows the next sentry before the pause
// (handover.Preview), for a sentry that reads peerReads: the KHO root's
// address and tree generation (kho.KHO.TreeGeneration). ok is false when
// the handover will be in kho-v1, whose map is written at the finalize.
// (A sentry that has preserved nothing yet has no tree: the next one's
// PrereadHandover fails, and it boots as without.)
func (k *Kernel) Preview(peerReads []string) (root, generation uint64, ok bool) {
	if f, err := khoFormatFor(peerReads); err != nil || f != abikho.CompatibleV2 {
		return 0, 0, false
	}
	// Read first: a preserve after it changes the generation.
	generation = k.kho.TreeGeneration()
	return k.kho.RootAddr(), generation, true
}

// Preread is a memory file mapped and its KHO handover read and checked
// ahead of a restart's pause (PrereadHandover), for NewFromPreread.
type Preread struct {
	mf         *pgalloc.MemoryFile
	kho        *kho.Prepared
	root       uint64
	generation uint64
	dev, ino   uint64
}

// PrereadHandover maps file, the memory file a restart's old sentry
// showed before the pause with the KHO root at root and the tree
// generation generation (handover.Preview), and reads and checks the
// handover's KHO radix tree (kho.Preread) while the old sentry still runs.
// It changes nothing in the file. NewFromPreread boots from the result
// once the old sentry has paused. On error file is closed.
func PrereadHandover(file *os.File, root, generation uint64) (*Preread, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(file.Fd()), &st); err != nil {
		file.Close()
		return nil, fmt.Errorf("reading the handover ahead: fstat of the memory file: %w", err)
	}
	mf, err := pgalloc.Open(file, pgalloc.Options{})
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("reading the handover ahead: mapping the memory file: %w", err)
	}
	p, err := kho.Preread(mf, root)
	if err != nil {
		mf.Close()
		return nil, err
	}
	return &Preread{mf: mf, kho: p, root: root, generation: generation, dev: st.Dev, ino: st.Ino}, nil
}

// Close drops a Preread that NewFromPreread did not take: the mapping and
// the file are closed; nothing in the file changes.
func (p *Preread) Close() {
	if p != nil && p.mf != nil {
		p.mf.Close()
		p.mf = nil
	}
}

// NewFromPreread is NewFromHandover(file, root, opts, t) for a restart
// whose old sentry showed its handover before the pause, read into p. If
// file is the memory file p mapped (same device and inode), root is p's and
// generation, the tree generation the old sentry finalized with
// (Handover.Generation), is the one it showed, the tree has not changed
// since: the boot takes p's mapping (t.Map is 0: it was made before the
// pause), file is closed, and what p read is adopted if the root page
// reads as it did (kho.IngestPrepared; t.ReadAhead says it was).
// Otherwise p is dropped and the boot is NewFromHandover's. p is used up
// either way.
func NewFromPreread(p *Preread, file *os.File, root, generation uint64, opts Options, t *handover.Timing) (*Kernel, error) {
	var st unix.Stat_t
	if p == nil || p.mf == nil || p.root != root || p.generation != generation ||
		unix.Fstat(int(file.Fd()), &st) != nil || st.Dev != p.dev || st.Ino != p.ino || uint64(st.Size) != p.mf.Size() {
		p.Close()
		return NewFromHandover(file, root, opts, t)
	}
	file.Close()
	mf, prepared := p.mf, p.kho
	*p = Preread{}
	if t == nil {
		t = new(handover.Timing)
	}
	t.Map = 0
	return bootMapped(mf, root, opts, t, func(mf *pgalloc.MemoryFile, root uint64) (*kho.KHO, error) {
		k, used, err := kho.IngestPrepared(mf, root, prepared)
		t.ReadAhead = used
		return k, err
	})
}

// bootFrom maps file, reads KHO at root with ingest (which adopts the
// preserved folios) and deserializes LUO, filling t's Map, Ingest and LUO.
func bootFrom(file *os.File, root uint64, opts Options, t *handover.Timing, ingest func(*pgalloc.MemoryFile, uint64) (*kho.KHO, error)) (*Kernel, error) {
	if t == nil {
		t = new(handover.Timing)
	}
	t0 := time.Now()
	mf, err := pgalloc.Open(file, pgalloc.Options{})
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("mapping the memory file: %w", err)
	}
	t.Map = time.Since(t0)
	return bootMapped(mf, root, opts, t, ingest)
}

// bootMapped is bootFrom once the memory file is mapped as mf.
func bootMapped(mf *pgalloc.MemoryFile, root uint64, opts Options, t *handover.Timing, ingest func(*pgalloc.MemoryFile, uint64) (*kho.KHO, error)) (*Kernel, error) {
	t1 := time.Now()
	k, err := ingest(mf, root)
	if err != nil {
		mf.Close()
		return nil, err
	}
	t2 := time.Now()
	t.Ingest = t2.Sub(t1)
	if opts.Fault != nil {
		if err := opts.Fault(handover.AcceptIngested); err != nil {
			mf.Close()
			return nil, err
		}
	}
	l, err := newLUO(mf, k)
	if err != nil {
		mf.Close()
		return nil, err
	}
	if err := l.Deserialize(); err != nil {
		mf.Close()
		return nil, fmt.Errorf("deserializing LUO: %w", err)
	}
	t.LUO = time.Since(t2)
	return newKernel(mf, k, l, opts), nil
}

// Recover boots a sentry from the memory file of one that died without
// freezing (a crash: SIGKILL, a bug, the host OOM killer): file is the
// memory file (Recover takes ownership of it) and root the byte address of
// the dead sentry's KHO root, the same address it would have handed over.
// KHO's radix tree and root and LUO's session and file records are written
// through at every change, so the file is read exactly as after a planned
// restart (kho.Recover, luo.Deserialize), with the same validation, and
// every session whose create, and every file whose preserve, had returned
// is there, with the position each file had at preserve (see docs/crash.md
// for what a crash may lose). Any error refuses the file like
// NewFromHandover does.
//
// The kernel is quarantined as after NewFromHandover until Commit: nothing
// of the file but the root page (which KHO reuses as its outgoing root) is
// written, so that should this sentry die before it commits, another can
// recover the same file once the root page is put back. At Commit, if no
// session was recovered, whatever the dead sentry had preserved without
// recording it (a preserve in flight) is freed. t gets the phases as with
// NewFromHandover.
func Recover(file *os.File, root uint64, opts Options, t *handover.Timing) (*Kernel, error) {
	kk, err := bootFrom(file, root, opts, t, kho.Recover)
	if err != nil {
		return nil, err
	}
	kk.recovered = true
	return kk, nil
}

func newKernel(mf *pgalloc.MemoryFile, k *kho.KHO, l *luo.LUO, opts Options) *Kernel {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	kk := &Kernel{mf: mf, kho: k, luo: l, logf: logf, procs: make(map[*Process]struct{})}
	kk.cond.L = &kk.mu
	return kk
}

// Commit ends the quarantine of a live-update boot: the previous sentry
// has been told the handover is accepted, so the memory it did not
// preserve may now be scrubbed in the background, and, in the background
// too, a carried handover is settled (LUO's liveupdate-number, its spare
// header block, KHO's kho-v1 reserve) or the blocks of LUO's incoming
// records, when they were not carried, are freed: allocating and freeing
// build page metadata (luo.LUO.Deserialize), which must not delay the end
// of the blackout. The page metadata of every adopted folio is built after
// them, also in the background. Shutdown waits for both.
func (k *Kernel) Commit() {
	k.mf.ResumeReleases()
	k.luo.Commit()
	if k.recovered && len(k.luo.Status().Sessions) == 0 {
		k.kho.ReleaseUnrestored()
	}
	k.background.Add(1)
	go func() {
		defer k.background.Done()
		// A carried handover (kho.Ingest, luo's carry.go) gets what
		// the new sentry could not allocate before it committed.
		k.luo.Settle()
		k.kho.Settle()
		k.luo.ReleaseIncomingRecords()
		// The page metadata of the adopted folios, before the relaunched
		// guests retrieve and map them.
		k.mf.FillMetadata()
		// What a restart's PrepareMetadata made and nothing took.
		pgalloc.ReleaseMetadataPool()
	}()
}

// WaitGone waits, for at most timeout, until the kernel has let go of the
// guest processes with the given host pids: their connections ended and
// their fds closed, as at exit. A kernel paused for a restart holds those
// deaths until the restart's outcome (Process.serve), so WaitGone then
// returns at once. It is for tests that kill a guest at a chosen point of
// a restart and need what its death does to have happened before the
// next step.
func (k *Kernel) WaitGone(pids []int, timeout time.Duration) {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		k.mu.Lock()
		held := k.pause != pauseNone || k.handedOver || k.shutdown
		found := false
		for p := range k.procs {
			found = found || slices.Contains(pids, int(p.pid))
		}
		k.mu.Unlock()
		if held || !found {
			return
		}
	}
}

// StartGated reports whether a guest connected from host process pid said
// in its Hello that it waits at a start gate (abiguest.HelloStartGate): a
// transfer restart may then start that program's next life before the
// pause.
func (k *Kernel) StartGated(pid int) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	for p := range k.procs {
		if int(p.pid) == pid && p.helloFlags.Load()&abiguest.HelloStartGate != 0 {
			return true
		}
	}
	return false
}

// MemoryFile returns the kernel's memory file.
func (k *Kernel) MemoryFile() *pgalloc.MemoryFile { return k.mf }

// KHO returns the kernel's KHO state.
func (k *Kernel) KHO() *kho.KHO { return k.kho }

// LUO returns the kernel's LUO.
func (k *Kernel) LUO() *luo.LUO { return k.luo }

// maxGuests bounds the guest connections of one kernel: past it a new
// connection is closed at once. A variable so that tests can lower it.
var maxGuests = 4096

// acceptBackoff bounds the wait between accepts after a resource error.
const acceptBackoff = time.Second

// Serve accepts guest connections on l until l is closed, serving each in
// its own goroutine. It returns nil when l was closed. Running out of fds
// or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) or a connection aborted
// before it was accepted does not end it: it backs off (5 ms, doubling up
// to a second) and accepts again.
func (k *Kernel) Serve(l *net.UnixListener) error {
	var delay time.Duration
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if !retryableAcceptError(err) {
				return fmt.Errorf("accepting a guest: %w", err)
			}
			delay = min(max(2*delay, 5*time.Millisecond), acceptBackoff)
			k.logf("accepting a guest: %v; retrying in %v", err, delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		go k.ServeConn(c)
	}
}

// retryableAcceptError reports whether accept failed for a reason that
// passes: resources that other connections hold, or a connection that went
// away before it was accepted.
func retryableAcceptError(err error) bool {
	for _, e := range []unix.Errno{unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNABORTED, unix.EINTR, unix.EPROTO} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ServeConn serves one guest process on c until it disconnects, breaks
// the protocol or the kernel hands over; then it closes c. Unless the
// kernel has handed over, the process's fds are closed as by its exit.
func (k *Kernel) ServeConn(c *net.UnixConn) {
	p, full := k.newProcess(c)
	if full {
		refuseFull(c)
	}
	if p == nil {
		c.Close()
		return
	}
	p.serve()
}

// ErrPauseTimeout is returned by Pause when calls in progress did not
// finish by its deadline.
var ErrPauseTimeout = errors.New("guest calls still in progress at the pause deadline")

// Pause stops dispatching guest calls: it waits for calls in progress to
// finish and holds new ones until Resume. Guests stay connected and their
// fds stay open. If calls are still in progress at deadline (the zero
// time: no deadline), Pause gives up: dispatch goes on as before, nothing
// else changed, and the error (ErrPauseTimeout) says how many calls were
// stuck. A kernel already paused, pausing, handed over or shut down is not
// paused again (an error): Pause and Resume are used by one restart at a
// time.
func (k *Kernel) Pause(deadline time.Time) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch {
	case k.handedOver:
		return fmt.Errorf("pausing: the kernel has handed over")
	case k.shutdown:
		return fmt.Errorf("pausing: the kernel is shut down")
	case k.pause != pauseNone:
		return fmt.Errorf("pausing: the kernel is already paused")
	}
	k.pause = pausePending
	k.pausing.Store(true)
	defer k.pausing.Store(false)
	for p := range k.procs {
		p.interrupt()
	}
	expired := false
	if !deadline.IsZero() {
		t := time.AfterFunc(time.Until(deadline), func() {
			k.mu.Lock()
			expired = true
			k.cond.Broadcast()
			k.mu.Unlock()
		})
		defer t.Stop()
	}
	for k.active > 0 {
		if expired {
			n := k.active
			k.pause = pauseNone
			k.cond.Broadcast()
			return fmt.Errorf("pausing: %d %w", n, ErrPauseTimeout)
		}
		k.cond.Wait()
	}
	k.pause = pauseHeld
	return nil
}

// Resume undoes a Pause that returned nil. It does nothing unless the
// kernel is paused and not handed over: it never releases a pause it does
// not hold.
func (k *Kernel) Resume() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.pause != pauseHeld || k.handedOver {
		return
	}
	k.pause = pauseNone
	k.cond.Broadcast()
}

// enter lets a guest call in, waiting while the kernel is paused or
// pausing; it fails once the kernel has handed over. The caller calls
// exit when the call is done.
func (k *Kernel) enter() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for k.pause != pauseNone && !k.handedOver {
		k.cond.Wait()
	}
	if k.handedOver {
		return errors.New("the sentry has handed over")
	}
	k.active++
	return nil
}

// exit ends a call let in by enter.
func (k *Kernel) exit() {
	k.mu.Lock()
	k.active--
	if k.active == 0 {
		k.cond.Broadcast()
	}
	k.mu.Unlock()
}

// Handover is what the next sentry needs besides the memory file.
type Handover struct {
	// Root is the byte address of the KHO root in the memory file.
	Root uint64
	// LiveupdateNumber is LUO's liveupdate number of this sentry.
	LiveupdateNumber uint64
	// Written are the formats the handover is written in: KHO's, LUO's
	// and those of the preserved files, each once.
	Written []string
	// Generation is KHO's tree generation once finalized
	// (kho.KHO.TreeGeneration): equal to a Preview's, the next sentry
	// may use the tree it read ahead (NewFromPreread).
	Generation uint64
}

// PrepareHandover makes the kernel's state ready to cross a restart, the
// part of Linux's liveupdate_reboot that runs in the old kernel: LUO
// serialize (freeze every preserved file, write the records) and KHO
// finalize. The kernel must be paused. It also holds the memory file's
// background releases, so that nothing is punched out of the file once it
// is handed over. On error everything is rolled back and the kernel can be
// resumed. t, if not nil, gets the phases Freeze (luo.Serialize) and
// Finalize (kho.Finalize).
//
// peerReads are the formats the next sentry reads (see Reads): every
// subsystem writes the newest format of this build that is among them, and
// one with none fails the handover before anything is frozen, with an error
// wrapping luo.ErrNoCommonFormat that names the subsystem and both lists.
// Nil writes this build's default formats.
func (k *Kernel) PrepareHandover(t *handover.Timing, peerReads []string) (Handover, error) {
	return k.PrepareHandoverWith(t, peerReads, nil)
}

// PrepareHandoverWith is PrepareHandover with a fault hook, called at
// handover.OfferFrozen, between LUO's freeze and KHO's finalize: an error
// from it unfreezes LUO and is returned.
func (k *Kernel) PrepareHandoverWith(t *handover.Timing, peerReads []string, fault func(handover.Point) error) (Handover, error) {
	if t == nil {
		t = new(handover.Timing)
	}
	k.mu.Lock()
	paused := k.pause == pauseHeld && !k.handedOver
	k.mu.Unlock()
	if !paused {
		return Handover{}, fmt.Errorf("preparing a handover: the kernel is not paused")
	}
	khoFormat, err := khoFormatFor(peerReads)
	if err != nil {
		return Handover{}, err
	}
	t0 := time.Now()
	if err := k.luo.SerializeWith(luo.SerializeOptions{PeerReads: peerReads}); err != nil {
		return Handover{}, fmt.Errorf("LUO freeze: %w", err)
	}
	t1 := time.Now()
	t.Freeze = t1.Sub(t0)
	if fault != nil {
		if err := fault(handover.OfferFrozen); err != nil {
			k.luo.Abort()
			return Handover{}, err
		}
	}
	if err := k.kho.FinalizeFormat(khoFormat); err != nil {
		k.luo.Abort()
		return Handover{}, fmt.Errorf("KHO finalize: %w", err)
	}
	// Finalize has held the memory file's releases: from here on it is
	// the next sentry's.
	t.Finalize = time.Since(t1)
	return Handover{Root: k.kho.RootAddr(), LiveupdateNumber: k.luo.LiveupdateNumber(), Written: append([]string{khoFormat}, k.luo.Written()...), Generation: k.kho.TreeGeneration()}, nil
}

// AbortHandover rolls back a successful PrepareHandover whose restart was
// refused: it discards KHO's finalize output (which also lets the memory
// file release again) and unfreezes LUO's files. The kernel is still
// paused.
func (k *Kernel) AbortHandover() error {
	err := k.kho.Abort()
	k.luo.Abort()
	if err != nil {
		return fmt.Errorf("KHO abort: %w", err)
	}
	return nil
}

// Handoff forgets every guest process after the next sentry has
// acknowledged the handover: their connections are closed, their fd tables
// emptied without dropping a reference (so no LUO session is closed and
// nothing is unpreserved or freed), and no guest call runs again. The
// kernel must be paused; it stays paused for good.
func (k *Kernel) Handoff() {
	k.mu.Lock()
	k.handedOver = true
	procs := make([]*Process, 0, len(k.procs))
	for p := range k.procs {
		procs = append(procs, p)
	}
	forks := k.forks
	k.forks = nil
	k.cond.Broadcast()
	k.mu.Unlock()
	for _, p := range procs {
		p.fdt.drop()
		p.mm.drop()
		p.conn.Close()
	}
	for _, ch := range forks {
		ch.timer.Stop()
		ch.fdt.drop()
		ch.mm.drop()
	}
}

// Shutdown closes every guest connection (their fds are closed as by
// process exit, unless the kernel has handed over) and then the memory
// file. The kernel must not be used afterwards; a second Shutdown does
// nothing. A restart in flight (Pause returned, neither Resume nor Handoff
// yet, or Pause still waiting) is waited for first: Shutdown never
// releases a pause it does not hold, and never unmaps the memory file
// while PrepareHandover or AbortHandover may use it.
func (k *Kernel) Shutdown() {
	k.mu.Lock()
	for k.pause != pauseNone && !k.handedOver {
		k.cond.Wait()
	}
	if k.shutdown {
		k.mu.Unlock()
		return
	}
	k.shutdown = true
	procs := make([]*Process, 0, len(k.procs))
	for p := range k.procs {
		procs = append(procs, p)
	}
	handedOver := k.handedOver
	forks := k.forks
	k.forks = nil
	k.cond.Broadcast()
	k.mu.Unlock()
	for _, ch := range forks {
		ch.timer.Stop()
		ch.release()
	}
	k.background.Wait()
	if handedOver {
		// Calls held by the pause never run; the memory file is the next
		// sentry's, so it is only unmapped.
		k.mf.Close()
		return
	}
	for _, p := range procs {
		p.conn.Close()
	}
	for _, p := range procs {
		<-p.done
	}
	k.mf.Close()
}

// Guests returns the number of connected guest processes.
func (k *Kernel) Guests() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.procs)
}

// UnretrievedSessions returns the names of the incoming LUO sessions that
// no guest has retrieved: a restart now would drop them (with their
// memory), since only what is preserved in outgoing sessions crosses.
func (k *Kernel) UnretrievedSessions() []string {
	var names []string
	for _, s := range k.luo.Status().Sessions {
		if s.Direction == "incoming" && !s.Retrieved {
			names = append(names, s.Name)
		}
	}
	return names
}
