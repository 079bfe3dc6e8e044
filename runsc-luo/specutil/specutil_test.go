package specutil

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// bundle writes a bundle with an empty rootfs and s as its config.json.
func bundle(t *testing.T, s *specs.Spec) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, ConfigName), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestLoad(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*specs.Spec)
		errSub string // "" for success
	}{
		{name: "the default configuration loads", change: func(*specs.Spec) {}},
		{name: "a version 2 configuration is refused", change: func(s *specs.Spec) { s.Version = "2.0.0" }, errSub: "ociVersion"},
		{name: "a terminal is refused", change: func(s *specs.Spec) { s.Process.Terminal = true }, errSub: "process.terminal"},
		{name: "an env entry without = is refused", change: func(s *specs.Spec) { s.Process.Env = []string{"FOO"} }, errSub: "NAME=VALUE"},
		{name: "a soft rlimit above the hard one is refused", change: func(s *specs.Spec) {
			s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 2, Hard: 1}}
		}, errSub: "above its hard limit"},
		{name: "a hostname without a uts namespace is refused", change: func(s *specs.Spec) {
			s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.MountNamespace}}
		}, errSub: "needs a uts namespace"},
		{name: "a namespace given twice is refused", change: func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.PIDNamespace})
		}, errSub: "given twice"},
		{name: "a time namespace is refused", change: func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.TimeNamespace})
		}, errSub: "not supported"},
		{name: "a bind mount of a missing source is refused", change: func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "/x", Type: "bind", Source: "/nonexistent/x"})
		}, errSub: "bind mount source"},
		{name: "a relative mount destination is refused", change: func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "x", Type: "tmpfs"})
		}, errSub: "absolute path"},
		{name: "a device other than the defaults is refused", change: func(s *specs.Spec) {
			s.Linux.Devices = []specs.LinuxDevice{{Path: "/dev/sda"}}
		}, errSub: "/dev/sda"},
		{name: "the default cpu weight container managers write is accepted", change: func(s *specs.Spec) {
			shares := uint64(1024)
			s.Linux.Resources = &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &shares}, Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}}
		}},
		{name: "another cpu weight is refused", change: func(s *specs.Spec) {
			shares := uint64(512)
			s.Linux.Resources = &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &shares}}
		}, errSub: "linux.resources.cpu"},
		{name: "a pids limit is refused", change: func(s *specs.Spec) {
			s.Linux.Resources = &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: 10}}
		}, errSub: "linux.resources.pids"},
		{name: "shared rootfs propagation is refused", change: func(s *specs.Spec) { s.Linux.RootfsPropagation = "shared" }, errSub: "rootfsPropagation"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Default([]string{"/bin/x"})
			tc.change(s)
			_, abs, err := Load(bundle(t, s))
			if tc.errSub == "" {
				if err != nil || !filepath.IsAbs(abs) {
					t.Fatalf("Load: %q, %v", abs, err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.errSub) {
				t.Fatalf("Load: %v; want ErrInvalid saying %q", err, tc.errSub)
			}
		})
	}
}

func TestMemoryLimit(t *testing.T) {
	limit := int64(64 << 20)
	parse := func(s string) (uint64, error) {
		if s == "2G" {
			return 2 << 30, nil
		}
		return 0, errors.New("bad size")
	}
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		limit       *int64
		want        uint64
		wantErr     bool
	}{
		{name: "the annotation sizes the memory file", annotations: map[string]string{AnnotationMemory: "2G"}, limit: &limit, want: 2 << 30},
		{name: "without the annotation the memory limit does", limit: &limit, want: 64 << 20},
		{name: "neither gives zero", want: 0},
		{name: "a bad annotation is an error", annotations: map[string]string{AnnotationMemory: "x"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Default(nil)
			s.Annotations = tc.annotations
			if tc.limit != nil {
				s.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: tc.limit}}
			}
			got, err := MemoryLimit(s, parse)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("MemoryLimit = %d, %v; want %d (error %v)", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestCloneFlags(t *testing.T) {
	want := uintptr(unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWNET)
	if got := CloneFlags(Default(nil)); got != want {
		t.Errorf("CloneFlags of the default = %#x, want %#x", got, want)
	}
}
