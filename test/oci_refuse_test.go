package test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// runFiles runs runsc-luo with stdout and stderr in files (a supervisor
// that keeps them never blocks the test) and returns both and the exit
// code.
func (c *cli) runFiles(args ...string) (string, string, int) {
	c.t.Helper()
	dir := c.t.TempDir()
	out, _ := os.Create(filepath.Join(dir, "out"))
	errf, _ := os.Create(filepath.Join(dir, "err"))
	cmd := exec.Command(runsc, append([]string{"--root=" + c.root}, args...)...)
	cmd.Stdout, cmd.Stderr = out, errf
	err := cmd.Run()
	out.Close()
	errf.Close()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatal(err)
	}
	o, _ := os.ReadFile(out.Name())
	e, _ := os.ReadFile(errf.Name())
	return string(o), string(e), code
}

// Bad input is refused with one error that says what to do, exit status 1
// (2 for a usage error, as runc), and nothing left behind.
func TestOCIRefusesBadInput(t *testing.T) {
	counter, _, _ := ociBinaries(t)
	c := newCLI(t)
	spec := func(change func(*specs.Spec)) func(string) {
		return func(bundle string) { editSpec(t, bundle, change) }
	}
	create := func(extra ...string) func(string) []string {
		return func(bundle string) []string {
			return append(append([]string{"create", "--bundle", bundle}, extra...), "bad")
		}
	}
	for _, tc := range []struct {
		name   string
		setup  func(bundle string)
		args   func(bundle string) []string
		code   int
		errSub string
	}{
		{name: "a bundle without config.json is refused", setup: func(b string) { os.Remove(filepath.Join(b, "config.json")) },
			args: create(), code: 1, errSub: "has no config.json"},
		{name: "a config.json that is not JSON is refused", setup: func(b string) { os.WriteFile(filepath.Join(b, "config.json"), []byte("{"), 0o644) },
			args: create(), code: 1, errSub: "not valid JSON"},
		{name: "a bundle that is a file is refused", args: func(b string) []string {
			return []string{"create", "--bundle", filepath.Join(b, "config.json"), "bad"}
		}, code: 1, errSub: "is not a directory"},
		{name: "a terminal is refused", setup: spec(func(s *specs.Spec) { s.Process.Terminal = true }),
			args: create(), code: 1, errSub: "process.terminal is true"},
		{name: "a console socket is a usage error", args: create("--console-socket", "/tmp/x.sock"), code: 2, errSub: "terminals are not supported"},
		{name: "empty process args are refused", setup: spec(func(s *specs.Spec) { s.Process.Args = nil }),
			args: create(), code: 1, errSub: "process.args is empty"},
		{name: "a relative cwd is refused", setup: spec(func(s *specs.Spec) { s.Process.Cwd = "tmp" }),
			args: create(), code: 1, errSub: "process.cwd"},
		{name: "an unknown rlimit is refused", setup: spec(func(s *specs.Spec) { s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_BOGUS"}} }),
			args: create(), code: 1, errSub: "unknown rlimit"},
		{name: "a user namespace is refused", setup: spec(func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
		}), args: create(), code: 1, errSub: `"user" namespace is not supported`},
		{name: "joining a namespace by path is refused", setup: spec(func(s *specs.Spec) {
			s.Linux.Namespaces[0].Path = "/proc/1/ns/pid"
		}), args: create(), code: 1, errSub: "creates new namespaces only"},
		{name: "a configuration without a mount namespace is refused", setup: spec(func(s *specs.Spec) {
			s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.PIDNamespace}}
			s.Hostname = ""
		}), args: create(), code: 1, errSub: "no mount namespace"},
		{name: "an nfs mount is refused", setup: spec(func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "/mnt", Type: "nfs", Source: "server:/x"})
		}), args: create(), code: 1, errSub: `type "nfs" is not supported`},
		{name: "seccomp is refused", setup: spec(func(s *specs.Spec) { s.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActAllow} }),
			args: create(), code: 1, errSub: "linux.seccomp is not supported"},
		{name: "hooks are refused", setup: spec(func(s *specs.Spec) { s.Hooks = &specs.Hooks{Poststart: []specs.Hook{{Path: "/bin/true"}}} }),
			args: create(), code: 1, errSub: "hooks are not supported"},
		{name: "a cpu quota is refused", setup: spec(func(s *specs.Spec) {
			q := int64(50000)
			s.Linux.Resources = &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &q}}
		}), args: create(), code: 1, errSub: "linux.resources.cpu: not supported"},
		{name: "a missing root filesystem is refused", setup: func(b string) { os.RemoveAll(filepath.Join(b, "rootfs")) },
			args: create(), code: 1, errSub: "root.path"},
		{name: "a bad memory annotation is refused", setup: spec(func(s *specs.Spec) { s.Annotations["dev.livesentry.memory"] = "lots" }),
			args: create(), code: 1, errSub: "annotation dev.livesentry.memory"},
		{name: "a program missing from the root filesystem is refused at create", setup: spec(func(s *specs.Spec) { s.Process.Args = []string{"nosuchprog"} }),
			args: create(), code: 1, errSub: `"nosuchprog": not found in the container's PATH`},
		{name: "a zero memory size is a usage error", args: create("--memory", "0"), code: 2, errSub: "--memory"},
		{name: "a container ID with a slash is a usage error", args: func(b string) []string { return []string{"create", "--bundle", b, "../x"} },
			code: 2, errSub: "sandbox ID"},
		{name: "create without an ID is a usage error", args: func(b string) []string { return []string{"create", "--bundle", b} },
			code: 2, errSub: "want exactly one container ID"},
		{name: "create with two IDs is a usage error", args: func(b string) []string { return []string{"create", "--bundle", b, "a", "b"} },
			code: 2, errSub: "want exactly one container ID"},
		{name: "run with a bundle and an entrypoint is a usage error", args: func(b string) []string { return []string{"run", "--bundle", b, "bad", "--", "/bin/true"} },
			code: 2, errSub: "not both"},
		{name: "restart with a zero timeout is a usage error", args: func(string) []string { return []string{"restart", "--timeout=0s", "bad"} },
			code: 2, errSub: "must be positive"},
		{name: "restart with a negative timeout is a usage error", args: func(string) []string { return []string{"restart", "--timeout=-1s", "bad"} },
			code: 2, errSub: "must be positive"},
		{name: "kill with an unknown signal is a usage error", args: func(string) []string { return []string{"kill", "bad", "SIGBOGUS"} },
			code: 2, errSub: "unknown signal"},
		{name: "kill with signal 0 is a usage error", args: func(string) []string { return []string{"kill", "bad", "0"} },
			code: 2, errSub: "out of range"},
		{name: "ps with an unknown format is a usage error", args: func(string) []string { return []string{"ps", "--format=xml", "bad"} },
			code: 2, errSub: "must be table or json"},
		{name: "events with a zero interval is a usage error", args: func(string) []string { return []string{"events", "--interval=0s", "bad"} },
			code: 2, errSub: "must be positive"},
		{name: "spec into a missing directory is a usage error", args: func(b string) []string { return []string{"spec", "--bundle", filepath.Join(b, "nope")} },
			code: 2, errSub: "not a directory"},
		{name: "spec over an existing config.json is refused", args: func(b string) []string { return []string{"spec", "--bundle", b} },
			code: 1, errSub: "already exists"},
		{name: "start of a missing container is refused", args: func(string) []string { return []string{"start", "bad"} }, code: 1, errSub: "does not exist"},
		{name: "state of a missing container is refused", args: func(string) []string { return []string{"state", "bad"} }, code: 1, errSub: "does not exist"},
		{name: "wait of a missing container is refused", args: func(string) []string { return []string{"wait", "bad"} }, code: 1, errSub: "does not exist"},
		{name: "kill of a missing container is refused", args: func(string) []string { return []string{"kill", "bad"} }, code: 1, errSub: "does not exist"},
		{name: "delete of a missing container is refused", args: func(string) []string { return []string{"delete", "bad"} }, code: 1, errSub: "does not exist"},
		{name: "ps of a missing container is refused", args: func(string) []string { return []string{"ps", "bad"} }, code: 1, errSub: "does not exist"},
		{name: "a missing entrypoint program is refused", args: func(string) []string { return []string{"run", "--detach", "bad", "--", "/nonexistent/prog"} },
			code: 1, errSub: "no such file or directory"},
		{name: "a memory size above 1 PiB is a usage error", args: func(string) []string { return []string{"run", "--memory=2000T", "bad", "--", "/bin/true"} },
			code: 2, errSub: "--memory"},
		{name: "an unknown log format is a usage error", args: func(string) []string { return []string{"--log-format=xml", "list"} }, code: 2, errSub: "must be text or json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			bundle := c.ociBundle(counter)
			if tc.setup != nil {
				tc.setup(bundle)
			}
			out, errOut, code := c.runFiles(tc.args(bundle)...)
			if code != tc.code || !strings.Contains(errOut, tc.errSub) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, errOut, tc.code, tc.errSub)
			}
			if n := strings.Count("\n"+errOut+out, "\nrunsc-luo"); n != 1 {
				t.Errorf("the error is printed %d times, want once:\n%s%s", n, errOut, out)
			}
			if ents, _ := os.ReadDir(c.root); len(ents) != 0 {
				t.Errorf("left behind in --root: %v", ents)
			}
		})
	}
}

// A second container with the same ID is refused, and the first one is
// untouched.
func TestOCICreateTwiceIsRefused(t *testing.T) {
	counter, _, _ := ociBinaries(t)
	c := newCLI(t)
	bundle := c.ociBundle(counter)
	if _, errOut, code := c.create("twice", bundle); code != 0 {
		t.Fatalf("create: exit %d: %s", code, errOut)
	}
	_, errOut, code := c.create("twice", bundle)
	if code != 1 || !strings.Contains(errOut, "already exists") || strings.Count("\n"+errOut, "\nrunsc-luo: ") != 1 {
		t.Errorf("second create: exit %d: %s", code, errOut)
	}
	if st := c.ociState("twice"); st.Status != specs.StateCreated {
		t.Errorf("the first container after the refused second: %+v", st.State)
	}
	c.must("delete", "twice")
}

// With --log and --log-format json, as containerd's shim runs the runtime,
// an error also goes to the log as one JSON line at level "error" (the
// shim reports the last one).
func TestOCIErrorsGoToTheJSONLog(t *testing.T) {
	c := newCLI(t)
	logPath := filepath.Join(t.TempDir(), "log.json")
	bundle := t.TempDir()
	_, errOut, code := c.runFiles("--log", logPath, "--log-format", "json", "create", "--bundle", bundle, "x")
	if code != 1 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	var line struct{ Level, Msg string }
	if err := json.Unmarshal(b, &line); err != nil || line.Level != "error" || !strings.Contains(line.Msg, "has no config.json") {
		t.Errorf("log: %s (%v)", b, err)
	}
}

// Every command's help is non-empty and exits 0, as "help CMD" and as
// "CMD -h".
func TestOCIHelpOfEveryCommand(t *testing.T) {
	c := newCLI(t)
	for _, cmd := range []string{"spec", "create", "start", "run", "state", "kill", "delete", "ps", "events", "wait", "exec", "restart", "list", "kho", "luo", "abi", "demo", "version"} {
		for _, args := range [][]string{{"help", cmd}, {cmd, "-h"}, {cmd, "--help"}} {
			out, errOut, code := c.run(args...)
			if code != 0 || len(out)+len(errOut) < 10 {
				t.Errorf("%v: exit %d, output %q %q", args, code, out, errOut)
			}
		}
	}
}
