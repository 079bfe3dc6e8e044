// Package guestinit is the init of a livesentry container: the entrypoint
// guest a sentry launches (and relaunches after every live restart) for a
// sandbox made from an OCI bundle, which turns into the bundle's process.
//
// It runs in two stages, both this binary's "init" command:
//
//   - Stage 1 runs in the host's namespaces as the sentry's child. It
//     starts stage 2 in the new namespaces config.json asks for, waits for
//     it to have prepared the container, reports that in the sandbox's
//     init.status, and, while the container is "created", blocks on the
//     sandbox's start FIFO until "runsc-luo start" opens it. It then lets
//     stage 2 go, forwards every signal the sentry sends it, and exits
//     with stage 2's status. It is the process the sentry knows as the
//     entrypoint.
//   - Stage 2 starts as pid 1 of the new pid namespace (with one), mounts
//     the root filesystem and config.json's mounts in its new mount
//     namespace, binds in what a guest needs from the host (the guest
//     socket and the libc shim, under GuestDir), pivots into the root,
//     applies the hostname, masked and read-only paths, rlimits,
//     capabilities bounding set, no_new_privs and user, and execs
//     process.args with process.env.
//
// The guest reaches its sentry through the guest socket, bound into the
// container at GuestDir/guest.sock (LIVESENTRY_GUEST_SOCKET says so), and
// the memory file comes to it over that socket (SCM_RIGHTS), so neither
// needs a host path inside the container.
package guestinit

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
	"github.com/livesentry/livesentry/runsc-luo/shim"
	"github.com/livesentry/livesentry/runsc-luo/specutil"
	"golang.org/x/sys/unix"
)

// GuestDir is the directory, inside the container, holding the guest
// socket and the libc shim (a small tmpfs, read-only once filled).
const GuestDir = "/dev/.livesentry"

// envShim names, for stage 2, the host path of the shim library to bind
// into the container ("" without the shim).
const envShim = "LIVESENTRY_INIT_SHIM"

// Stage1Options configure stage 1.
type Stage1Options struct {
	// Globals are the global flags, for stage 2.
	Globals sandbox.Globals
	// ID is the sandbox's ID.
	ID string
	// Bundle is the bundle's absolute path.
	Bundle string
}

// reportStatus writes the sandbox's init.status.
func reportStatus(root, id, msg string) {
	p := sandbox.InitStatusPath(root, id)
	tmp := p + ".tmp"
	if os.WriteFile(tmp, []byte(msg), 0o600) == nil {
		os.Rename(tmp, p)
	}
}

// Stage1 runs stage 1 and returns the exit status of the container's
// process (128+signal if a signal ended it); errors preparing the container
// are reported in init.status (which "create" prints) and, at a relaunch
// after a restart, on stderr (entrypoint.log), with status 1.
func Stage1(o Stage1Options) int {
	root := o.Globals.Root
	// At create (the start FIFO exists) "create" prints the error; at a
	// relaunch after a restart, only the entrypoint's output can tell.
	_, ferr := os.Lstat(sandbox.StartFIFOPath(root, o.ID))
	atCreate := ferr == nil
	fail := func(err error) int {
		reportStatus(root, o.ID, "error: "+err.Error())
		if !atCreate {
			fmt.Fprintf(os.Stderr, "runsc-luo init: %v\n", err)
		}
		return 1
	}
	s, bundle, err := specutil.Load(o.Bundle)
	if err != nil {
		return fail(err)
	}
	lib := ""
	if specutil.WantsShim(s) {
		switch p, err := shim.Path(); {
		case errors.Is(err, shim.ErrNoCompiler):
			fmt.Fprintf(os.Stderr, "runsc-luo init: %q runs without the libc shim: %v\n", s.Process.Args[0], err)
		case err != nil:
			return fail(fmt.Errorf("building the libc shim: %w", err))
		default:
			lib = p
		}
	}
	// sync: stage 2 -> stage 1 ("ready" or "error: ..."); gate: stage 1
	// -> stage 2 (one byte: exec now).
	syncR, syncW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	gateR, gateW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	// Pdeathsig is tied to the thread that starts the child: keep this
	// goroutine on it for the process's life.
	runtime.LockOSThread()
	cmd := exec.Command("/proc/self/exe", append(o.Globals.Args(), "init", "--stage2", "--bundle="+bundle)...)
	cmd.Env = []string{
		abiguest.EnvSocket + "=" + os.Getenv(abiguest.EnvSocket),
		abiguest.EnvLiveupdateNumber + "=" + os.Getenv(abiguest.EnvLiveupdateNumber),
		envShim + "=" + lib,
	}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{syncW, gateR}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: specutil.CloneFlags(s), Pdeathsig: unix.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fail(fmt.Errorf("starting the container's namespaces: %w", err))
	}
	syncW.Close()
	gateR.Close()
	msg, _ := io.ReadAll(syncR)
	syncR.Close()
	if string(msg) != "ready" {
		cmd.Process.Kill()
		cmd.Wait()
		if len(msg) == 0 {
			msg = []byte("error: the container's init died while preparing it")
		}
		return fail(errors.New(strings.TrimPrefix(string(msg), "error: ")))
	}
	reportStatus(root, o.ID, "ready")
	if err := awaitStart(sandbox.StartFIFOPath(root, o.ID)); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return fail(err)
	}
	gateW.Write([]byte{0})
	gateW.Close()
	return forwardAndWait(cmd)
}

// awaitStart blocks while the container is created: until "start" opens
// the start FIFO (it then removes it). Without a FIFO (the container was
// started before: this is a relaunch after a restart) it returns at once.
func awaitStart(fifo string) error {
	if _, err := os.Lstat(fifo); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("waiting for start: %w", err)
	}
	defer f.Close()
	if _, err := f.Write([]byte{'0'}); err != nil {
		return fmt.Errorf("waiting for start: %w", err)
	}
	return nil
}

// forwardAndWait forwards the signals this process receives to stage 2
// (pid 1 of its pid namespace gets only those it handles, and SIGKILL, as
// in any container) and returns its exit status.
func forwardAndWait(cmd *exec.Cmd) int {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs)
	go func() {
		for sig := range sigs {
			if sig == unix.SIGCHLD || sig == unix.SIGURG || sig == unix.SIGPIPE {
				continue
			}
			cmd.Process.Signal(sig)
		}
	}()
	err := cmd.Wait()
	ps := cmd.ProcessState
	if ps == nil {
		fmt.Fprintf(os.Stderr, "runsc-luo init: %v\n", err)
		return 127
	}
	ws := ps.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// Stage2 runs stage 2 with the sync pipe at fd 3 and the gate at fd 4. An
// error preparing the container goes to stage 1, and the process exits 1;
// Stage2 returns only if exec failed (the caller prints it and exits 127).
func Stage2(bundle string) error {
	runtime.LockOSThread()
	syncW := os.NewFile(3, "sync")
	gate := os.NewFile(4, "gate")
	unix.CloseOnExec(3)
	unix.CloseOnExec(4)
	s, bundle, err := specutil.Load(bundle)
	if err == nil {
		err = setupRootfs(s, bundle, os.Getenv(abiguest.EnvSocket), os.Getenv(envShim))
	}
	if err == nil && s.Hostname != "" {
		if err = unix.Sethostname([]byte(s.Hostname)); err != nil {
			err = fmt.Errorf("sethostname %q: %w", s.Hostname, err)
		}
	}
	var p *prepared
	if err == nil {
		p, err = prepareProcess(s, os.Getenv(envShim) != "", os.Getenv(abiguest.EnvLiveupdateNumber))
	}
	if err != nil {
		// Stage 1 reports it.
		fmt.Fprintf(syncW, "error: %v", err)
		syncW.Close()
		os.Exit(1)
	}
	syncW.WriteString("ready")
	syncW.Close()
	var b [1]byte
	if n, _ := gate.Read(b[:]); n != 1 {
		// Stage 1 is gone without letting us run.
		os.Exit(1)
	}
	gate.Close()
	return p.exec()
}

// prepared is the process to exec, with what must be applied last.
type prepared struct {
	path string
	args []string
	env  []string
	c    creds
}

// creds is the part of the process config applied right before exec.
type creds struct {
	uid, gid   uint32
	groups     []int
	noNewPrivs bool
	bounding   []string
	umask      *uint32
}

// lookPath resolves the program as execve would with PATH from env.
func lookPath(prog string, env []string) (string, error) {
	if strings.Contains(prog, "/") {
		return prog, nil
	}
	path := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range strings.Split(path, ":") {
		if dir == "" {
			dir = "."
		}
		p := dir + "/" + prog
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("process.args[0] %q: not found in the container's PATH %q", prog, path)
}

// exec applies the credentials and execs the process.
func (p *prepared) exec() error {
	c := &p.c
	if c.umask != nil {
		unix.Umask(int(*c.umask))
	}
	if err := dropBounding(c.bounding); err != nil {
		return err
	}
	if c.noNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	if err := syscall.Setgroups(c.groups); err != nil {
		return fmt.Errorf("setgroups %v: %w", c.groups, err)
	}
	if err := syscall.Setgid(int(c.gid)); err != nil {
		return fmt.Errorf("setgid %d: %w", c.gid, err)
	}
	if err := syscall.Setuid(int(c.uid)); err != nil {
		return fmt.Errorf("setuid %d: %w", c.uid, err)
	}
	err := syscall.Exec(p.path, p.args, p.env)
	return fmt.Errorf("exec %s: %w", p.path, err)
}

// envWithout returns env without the variables named in names.
func envWithout(env []string, names ...string) []string {
	var out []string
	for _, kv := range env {
		drop := false
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				drop = true
			}
		}
		if !drop {
			out = append(out, kv)
		}
	}
	return out
}

// capNames maps capability names to numbers.
var capNames = map[string]int{
	"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
	"CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
	"CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
	"CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
	"CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
	"CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
	"CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
	"CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
	"CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}

// dropBounding drops from the bounding set every capability not in keep;
// nil keep (no capabilities section) keeps the set as it is.
func dropBounding(keep []string) error {
	if keep == nil {
		return nil
	}
	want := map[int]bool{}
	for _, n := range keep {
		if c, ok := capNames[n]; ok {
			want[c] = true
		}
	}
	for c := 0; c <= 63; c++ {
		if want[c] {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			if errors.Is(err, unix.EINVAL) {
				break // Past the host's last capability.
			}
			return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
		}
	}
	return nil
}
