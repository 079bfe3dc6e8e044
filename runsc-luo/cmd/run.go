package cmd

import (
	"context"
	"flag"
	"io"
	"os"
	"os/signal"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/specutil"
	"golang.org/x/sys/unix"
)

// Run starts a sandbox.
type Run struct {
	memory        string
	detach        bool
	shim          bool
	bundle        string
	pidFile       string
	consoleSocket string
}

func (*Run) Name() string { return "run" }
func (*Run) Synopsis() string {
	return "run a container from an OCI bundle, or a sandbox with an entrypoint"
}
func (*Run) Usage() string {
	return `run [--memory SIZE] [--detach] [--shim=false] ID [-- ENTRYPOINT ARGS]
run [--bundle DIR] [--memory SIZE] [--detach] [--pid-file FILE] ID

The second form runs an OCI bundle (DIR, default the current directory when
it holds a config.json): "create" then "start", see their help. Without
--detach, run shows the process's output, waits for the container to stop,
deletes it and exits with its exit status; Ctrl-C or SIGTERM stops the
container as "kill" does (its status is then 128+signal unless the process
handles the signal and exits by itself).

The first form starts the sentry of sandbox ID as a daemon (state and sockets in --root) and
launches ENTRYPOINT as its first guest, with LIVESENTRY_GUEST_SOCKET set; the
sentry relaunches it after every live restart, and the sandbox stops when it
exits. Without --detach, run waits for that and exits with its status.
Without ENTRYPOINT (and no config.json in the current directory), the
sandbox starts with no guest; "exec" starts some.

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
	f.StringVar(&r.bundle, "bundle", "", "OCI bundle directory (holding config.json)")
	f.StringVar(&r.pidFile, "pid-file", "", "with a bundle: file to write the container's pid to")
	f.StringVar(&r.consoleSocket, "console-socket", "", "not supported: livesentry guests have no terminal")
}

func (r *Run) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	cfg := configOf(args)
	if f.NArg() < 1 {
		return usage(f, "run: want a container ID")
	}
	id, entry := f.Arg(0), f.Args()[1:]
	if len(entry) > 0 && entry[0] == "--" {
		entry = entry[1:]
	}
	if err := sandbox.CheckID(id); err != nil {
		return usagef("%v", err)
	}
	memorySet := false
	f.Visit(func(fl *flag.Flag) { memorySet = memorySet || fl.Name == "memory" })
	bundle := r.bundle
	if bundle == "" && len(entry) == 0 {
		if _, err := os.Stat(specutil.ConfigName); err == nil {
			bundle = "."
		}
	}
	if bundle != "" {
		if len(entry) > 0 {
			return usagef("run: give either --bundle or -- ENTRYPOINT, not both")
		}
		memory := ""
		if memorySet {
			memory = r.memory
		}
		o, status := createOptions(f, bundle, r.pidFile, r.consoleSocket, memory)
		if status != subcommands.ExitSuccess {
			return status
		}
		if _, err := container.Create(cfg.Globals, id, o); err != nil {
			return fatalf("creating %q: %v", id, err)
		}
		if err := container.StartContainer(cfg.Root, id); err != nil {
			container.Delete(cfg.Root, id, true)
			return fatalf("%v", err)
		}
	} else {
		if r.pidFile != "" || r.consoleSocket != "" {
			return usagef("run: --pid-file and --console-socket go with --bundle")
		}
		size, err := sandbox.ParseSize(r.memory)
		if err != nil {
			return usagef("--memory: %v", err)
		}
		if err := container.StartWith(cfg.Globals, id, size, entry, container.StartOptions{NoShim: !r.shim}); err != nil {
			return fatalf("%v", err)
		}
	}
	if r.detach {
		return subcommands.ExitSuccess
	}
	// Ctrl-C or SIGTERM stops the sandbox as kill does.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		for sig := range sigs {
			if err := container.Kill(cfg.Root, id, sig.(unix.Signal)); err != nil {
				printError(err.Error())
			}
		}
	}()
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
	if err := container.Remove(cfg.Root, id); err != nil {
		printError(err.Error())
	}
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
