package cmd

import (
	"context"
	"flag"
	"io"
	"os"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// Run starts a sandbox.
type Run struct {
	memory string
	detach bool
	shim   bool
}

func (*Run) Name() string     { return "run" }
func (*Run) Synopsis() string { return "start a sandbox and its entrypoint guest" }
func (*Run) Usage() string {
	return `run [--memory SIZE] [--detach] [--shim=false] ID [-- ENTRYPOINT ARGS]

Starts the sentry of sandbox ID as a daemon (state and sockets in --root) and
launches ENTRYPOINT as its first guest, with LIVESENTRY_GUEST_SOCKET set; the
sentry relaunches it after every live restart, and the sandbox stops when it
exits. Without --detach, run waits for that and exits with its status.

The entrypoint runs under the libc shim (LD_PRELOAD), so that an unmodified
dynamically linked program reaches the sentry through open("/dev/liveupdate"),
ioctl, memfd_create, read, write, mmap, fork and exec; --shim=false launches
it as it is (every launch, after restarts too).
`
}
func (r *Run) SetFlags(f *flag.FlagSet) {
	f.StringVar(&r.memory, "memory", "1G", "size of the memory file (sparse), e.g. 64M, 4G")
	f.BoolVar(&r.detach, "detach", false, "return once the sandbox is running")
	f.BoolVar(&r.shim, "shim", true, "launch the entrypoint under the libc shim")
}

func (r *Run) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if f.NArg() < 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id, entry := f.Arg(0), f.Args()[1:]
	if len(entry) > 0 && entry[0] == "--" {
		entry = entry[1:]
	}
	size, err := sandbox.ParseSize(r.memory)
	if err != nil {
		return fatalf("--memory: %v", err)
	}
	if err := container.StartWith(cfg.Globals, id, size, entry, container.StartOptions{NoShim: !r.shim}); err != nil {
		return fatalf("%v", err)
	}
	if r.detach {
		return subcommands.ExitSuccess
	}
	// Show the entrypoint's output (every launch of it) while waiting.
	done := make(chan struct{})
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		follow(sandbox.EntrypointLogPath(cfg.Root, id), os.Stdout, done)
	}()
	st, err := container.WaitStopped(cfg.Root, id, 0)
	close(done)
	<-copied
	if err != nil {
		return fatalf("%v", err)
	}
	os.RemoveAll(sandbox.Dir(cfg.Root, id))
	if st.ExitStatus != nil {
		return subcommands.ExitStatus(*st.ExitStatus)
	}
	return subcommands.ExitFailure
}

// follow copies what is appended to path to w until done is closed, and
// then what is left.
func follow(path string, w io.Writer, done <-chan struct{}) {
	var off int64
	for {
		stop := false
		select {
		case <-done:
			stop = true
		case <-time.After(20 * time.Millisecond):
		}
		if f, err := os.Open(path); err == nil {
			n, _ := io.Copy(w, io.NewSectionReader(f, off, 1<<62))
			off += n
			f.Close()
		}
		if stop {
			return
		}
	}
}
