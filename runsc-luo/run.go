package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/subcommands"
)

// runCmd starts a sandbox.
type runCmd struct {
	memory string
	detach bool
}

func (*runCmd) Name() string     { return "run" }
func (*runCmd) Synopsis() string { return "start a sandbox and its entrypoint guest" }
func (*runCmd) Usage() string {
	return `run [--memory SIZE] [--detach] ID [-- ENTRYPOINT ARGS]

Starts the sentry of sandbox ID as a daemon (state and sockets in --root) and
launches ENTRYPOINT as its first guest, with LIVESENTRY_GUEST_SOCKET set; the
sentry relaunches it after every live restart, and the sandbox stops when it
exits. Without --detach, run waits for that and exits with its status.
`
}
func (r *runCmd) SetFlags(f *flag.FlagSet) {
	f.StringVar(&r.memory, "memory", "1G", "size of the memory file (sparse), e.g. 64M, 4G")
	f.BoolVar(&r.detach, "detach", false, "return once the sandbox is running")
}

// parseSize parses a size such as 4096, 64M, 64MiB, 1G or 4GiB.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "IB"), "B")
	mult := uint64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	v, err := strconv.ParseUint(t, 10, 64)
	if err != nil || v == 0 || v > (1<<50)/mult {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T suffix", s)
	}
	return v * mult, nil
}

func (r *runCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	if f.NArg() < 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	id, entry := f.Arg(0), f.Args()[1:]
	if len(entry) > 0 && entry[0] == "--" {
		entry = entry[1:]
	}
	size, err := parseSize(r.memory)
	if err != nil {
		return fatalf("--memory: %v", err)
	}
	if err := startSandbox(id, size, entry); err != nil {
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
		follow(entrypointLogPath(*rootDir, id), os.Stdout, done)
	}()
	st, err := waitStopped(id, 0)
	close(done)
	<-copied
	if err != nil {
		return fatalf("%v", err)
	}
	os.RemoveAll(sandboxDir(*rootDir, id))
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

// startSandbox starts sandbox id's sentry and waits until it serves.
func startSandbox(id string, size uint64, entry []string) error {
	if err := checkID(id); err != nil {
		return err
	}
	dir := sandboxDir(*rootDir, id)
	if err := os.MkdirAll(*rootDir, 0o711); err != nil {
		return fmt.Errorf("creating root %s: %w", *rootDir, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		if os.IsExist(err) {
			return fmt.Errorf("sandbox %q already exists in %s", id, *rootDir)
		}
		return err
	}
	fail := func(err error) error {
		os.RemoveAll(dir)
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fail(err)
	}
	logf, err := os.OpenFile(sentryLogPath(*rootDir, id), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fail(err)
	}
	defer logf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	defer pr.Close()
	args := append(globalArgs(), "boot", "--id="+id, fmt.Sprintf("--memory=%d", size), "--ready-fd=3", "--")
	cmd := exec.Command(exe, append(args, entry...)...)
	cmd.ExtraFiles = []*os.File{pw}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return fail(fmt.Errorf("starting the sentry: %w", err))
	}
	pw.Close()
	msg, _ := io.ReadAll(pr)
	if string(msg) != "ok" {
		cmd.Wait()
		log, _ := os.ReadFile(sentryLogPath(*rootDir, id))
		return fail(fmt.Errorf("the sentry of %q failed to start: %s\n%s", id, strings.TrimPrefix(string(msg), "error: "), log))
	}
	// The sentry is a daemon now; do not wait for it.
	cmd.Process.Release()
	return nil
}

// waitStopped polls the state of sandbox id until it is stopped, for at
// most timeout (0: forever).
func waitStopped(id string, timeout time.Duration) (*state, error) {
	start := time.Now()
	for {
		st, err := readState(*rootDir, id)
		if err != nil {
			return nil, err
		}
		if st.Status == statusStopped && !alive(st.PID) {
			return st, nil
		}
		if timeout > 0 && time.Since(start) > timeout {
			return st, fmt.Errorf("sandbox %q did not stop within %v", id, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
