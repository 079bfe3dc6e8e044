package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/google/subcommands"
	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/sentry/handover"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/log"
)

// bootCmd is the sentry process (internal): a cold boot for "run", or the
// incoming side of a live restart.
type bootCmd struct {
	id         string
	memory     uint64
	readyFD    int
	handoverFD int
}

func (*bootCmd) Name() string     { return "boot" }
func (*bootCmd) Synopsis() string { return "run a sentry (internal)" }
func (*bootCmd) Usage() string {
	return "boot --id ID [--memory BYTES] [--ready-fd FD] [-- ENTRYPOINT ARGS] | boot --handover-fd FD\n"
}
func (b *bootCmd) SetFlags(f *flag.FlagSet) {
	f.StringVar(&b.id, "id", "", "sandbox ID (cold boot)")
	f.Uint64Var(&b.memory, "memory", 0, "memory file size in bytes (cold boot)")
	f.IntVar(&b.readyFD, "ready-fd", -1, "fd to report readiness on (cold boot)")
	f.IntVar(&b.handoverFD, "handover-fd", -1, "fd of the transfer-mode handover socket")
}

// knownCompatibles are the ABI strings this build reads.
func knownCompatibles() []string {
	return []string{abikho.Compatible, abiluo.FDTCompatible, abiluo.FDTSessionCompatible, memfd.NewLUOHandler(nil, nil).Compatible}
}

func knows(c string) bool {
	for _, k := range knownCompatibles() {
		if k == c {
			return true
		}
	}
	return false
}

func (b *bootCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	// An exec-mode restart re-enters here with the descriptor in the
	// environment.
	d, files, ok, err := handover.DecodeEnv(knows)
	switch {
	case ok && err != nil:
		// exec mode: there is no one to roll back to. Stop the old
		// image's guests (our children now) and record the failure.
		err = fmt.Errorf("exec-mode handover refused: %w", err)
		var cfg config
		if d != nil && json.Unmarshal(d.Sandbox, &cfg) == nil && checkID(cfg.ID) == nil {
			failExec(&cfg, err, d.OldGuests)
		} else if d != nil {
			stopOldGuests(d.OldGuests)
		}
		return fatalf("%v", err)
	case ok:
		return runIncoming(d, files, nil, handover.Monotonic())
	}
	if b.handoverFD >= 0 {
		return bootTransfer(b.handoverFD)
	}
	return b.coldBoot(f.Args())
}

// coldBoot starts a new sandbox.
func (b *bootCmd) coldBoot(entrypoint []string) subcommands.ExitStatus {
	var ready *os.File
	if b.readyFD >= 0 {
		// Guests must not inherit it: "run" waits for its last writer.
		unix.CloseOnExec(b.readyFD)
		ready = os.NewFile(uintptr(b.readyFD), "ready")
		defer ready.Close()
	}
	report := func(err error) subcommands.ExitStatus {
		if ready != nil {
			if err != nil {
				fmt.Fprintf(ready, "error: %v", err)
			} else {
				fmt.Fprint(ready, "ok")
			}
			ready.Close()
			ready = nil
		}
		if err != nil {
			return fatalf("%v", err)
		}
		return subcommands.ExitSuccess
	}
	cfg := config{ID: b.id, Root: *rootDir, MemorySize: b.memory, Entrypoint: entrypoint}
	if err := checkID(cfg.ID); err != nil {
		return report(err)
	}
	s, err := newSentry(cfg)
	if err != nil {
		return report(err)
	}
	k, err := kernel.New(kernel.Options{MemorySize: cfg.MemorySize, Logf: log.Infof})
	if err != nil {
		s.cleanupSockets()
		return report(fmt.Errorf("cold boot: %w", err))
	}
	s.k = k
	s.cfg.Created = nowUTC()
	s.cfg.MemorySize = k.MemoryFile().Size()
	s.start()
	if err := s.writeState(""); err != nil {
		s.shutdown(err.Error())
		return report(err)
	}
	if err := s.launchEntrypoint(); err != nil {
		s.shutdown(err.Error())
		return report(err)
	}
	log.Infof("sandbox %s: cold boot, pid %d, %d-byte memory file", cfg.ID, os.Getpid(), cfg.MemorySize)
	report(nil)
	return s.wait()
}

// bootTransfer is the incoming side of a transfer-mode restart.
func bootTransfer(fd int) subcommands.ExitStatus {
	ch, err := handover.NewChannel(os.NewFile(uintptr(fd), "handover"))
	if err != nil {
		return fatalf("%v", err)
	}
	if err := ch.Send(&handover.Ready{Protocol: handover.ProtocolVersion, Version: version, PID: os.Getpid()}); err != nil {
		return fatalf("saying ready: %v", err)
	}
	var d handover.Descriptor
	files, err := ch.Recv(&d)
	received := handover.Monotonic()
	if err != nil {
		// The old sentry went away or broke the protocol: nothing was
		// handed over.
		return fatalf("receiving the handover: %v", err)
	}
	if err := d.Validate(len(files), knows); err != nil {
		refuse(ch, err)
		return fatalf("handover refused: %v", err)
	}
	ordered := []*os.File{files[d.Files.MemoryFile], files[d.Files.GuestListener], files[d.Files.ControlListener]}
	for i, f := range files {
		if i != d.Files.MemoryFile && i != d.Files.GuestListener && i != d.Files.ControlListener {
			f.Close()
		}
	}
	return runIncoming(&d, ordered, ch, received)
}

// refuse tells the old sentry that the handover is refused.
func refuse(ch *handover.Channel, err error) {
	if ch != nil {
		ch.Send(&handover.Ack{Accepted: false, Error: err.Error(), Version: version, PID: os.Getpid()})
	}
}

// runIncoming boots from a handover: files are the memory file, the guest
// listener and the control listener; ch is nil in exec mode.
func runIncoming(d *handover.Descriptor, files []*os.File, ch *handover.Channel, received int64) subcommands.ExitStatus {
	var cfg config
	if err := json.Unmarshal(d.Sandbox, &cfg); err != nil || checkID(cfg.ID) != nil {
		err = fmt.Errorf("handover descriptor: sandbox configuration %q: %v", d.Sandbox, err)
		refuse(ch, err)
		return fatalf("%v", err)
	}
	if cfg.Root != *rootDir {
		*rootDir = cfg.Root
	}
	k, bt, err := kernel.NewFromHandover(files[0], d.Root, kernel.Options{Logf: log.Infof})
	if err != nil {
		err = fmt.Errorf("live-update boot from %s sentry %q: %w", d.Mode, d.Version, err)
		refuse(ch, err)
		files[1].Close()
		files[2].Close()
		if ch == nil {
			// exec mode: there is no one to roll back to.
			failExec(&cfg, err, d.OldGuests)
		}
		return fatalf("%v", err)
	}
	s := &sentry{cfg: cfg, k: k, guestFile: files[1], controlFile: files[2], exited: make(chan struct{}), procs: make(map[int]*guestProc)}
	ack := handover.Ack{
		Accepted: true, Version: version, PID: os.Getpid(), ReceivedAt: received,
		Map: bt.Map, Ingest: bt.Ingest, LUO: bt.LUO,
	}
	if ch != nil {
		// Until the old sentry has read this, it may still time out and
		// roll back: nothing may be scrubbed (releases stay held,
		// allocations fail) and no guest may run. A successful send says
		// only that the ack is in the socket buffer, so wait for the old
		// sentry's Commit, sent once it has read the ack and will never
		// roll back. If the channel ends instead, the old sentry killed
		// this process too late, died, or rolled back: exit untouched.
		ack.AcceptingAt = handover.Monotonic()
		if err := ch.Send(&ack); err != nil {
			return fatalf("acknowledging the handover: %v (exiting untouched: the old sentry may have rolled back)", err)
		}
		if err := ch.AwaitCommit(d.PID); err != nil {
			return fatalf("%v (exiting untouched: the old sentry may have rolled back)", err)
		}
	}
	k.Commit()
	s.start()
	// The blackout ends here: guests are served again.
	ack.AcceptingAt = handover.Monotonic()
	t := handover.MakeTiming(d, &ack, d.PID)
	s.mu.Lock()
	s.last = RestartRecord{Generation: d.LiveupdateNumber + 1, Timing: t}
	s.mu.Unlock()
	// The state file names this sentry before the old one answers the
	// CLI (after Serving) and exits: until then it names the old one,
	// which would look gone to kill and delete.
	if err := s.writeState(""); err != nil {
		log.Warningf("%v", err)
	}
	if ch != nil {
		ch.Send(&handover.Serving{At: ack.AcceptingAt})
		ch.Close()
	}
	if d.Mode == handover.ModeExec {
		// The old image's guests are our children now: stop them.
		stopOldGuests(d.OldGuests)
	}
	log.Infof("sandbox %s: live-update boot (%s mode) from %q, liveupdate number %d, blackout %v", cfg.ID, d.Mode, d.Version, k.LUO().LiveupdateNumber(), t.Blackout)
	if err := s.launchEntrypoint(); err != nil {
		log.Warningf("relaunching the entrypoint: %v", err)
	}
	return s.wait()
}

// stopOldGuests kills and reaps the guests an exec-mode restart's old
// image launched (they are this process's children).
func stopOldGuests(pids []int) {
	for _, pid := range pids {
		if pid > 1 {
			stopOldGuest(pid)
		}
	}
}

// failExec records an exec-mode restart that failed after execve: the old
// image's guests are stopped, the sockets removed, the state stopped.
func failExec(cfg *config, err error, oldGuests []int) {
	stopOldGuests(oldGuests)
	st := &state{ID: cfg.ID, Status: statusStopped, Root: cfg.Root, Created: cfg.Created, Version: version,
		Error: "exec-mode restart failed after execve (no rollback possible): " + err.Error()}
	writeState(st)
	os.Remove(guestPath(cfg.Root, cfg.ID))
	os.Remove(controlPath(cfg.Root, cfg.ID))
}

// abiCmd prints the ABI strings and version of this build (internal: an
// exec-mode restart checks the new binary with it before freezing).
type abiCmd struct{}

func (*abiCmd) Name() string           { return "abi" }
func (*abiCmd) Synopsis() string       { return "print the ABI strings this build reads (internal)" }
func (*abiCmd) Usage() string          { return "abi\n" }
func (*abiCmd) SetFlags(*flag.FlagSet) {}
func (*abiCmd) Execute(context.Context, *flag.FlagSet, ...any) subcommands.ExitStatus {
	b, _ := json.Marshal(abiInfo{Version: version, Protocol: handover.ProtocolVersion, GuestProtocol: abiguest.Version, Compatibles: knownCompatibles()})
	fmt.Println(string(b))
	return subcommands.ExitSuccess
}

type abiInfo struct {
	Version       string   `json:"version"`
	Protocol      int      `json:"protocol"`
	GuestProtocol int      `json:"guest_protocol"`
	Compatibles   []string `json:"compatibles"`
}

// unknownCompatibles returns the strings of want the info does not know.
func (a *abiInfo) unknownCompatibles(want []string) []string {
	var out []string
	for _, w := range want {
		found := false
		for _, c := range a.Compatibles {
			found = found || c == w
		}
		if !found {
			out = append(out, w)
		}
	}
	return out
}
