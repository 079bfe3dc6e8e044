// Package specutil reads, checks and writes the OCI runtime-spec bundle
// configuration (config.json) of a livesentry container.
//
// A livesentry container is a sandbox whose entrypoint guest is the
// bundle's process, run in new Linux namespaces inside the bundle's root
// filesystem. Check refuses, each with one error saying what to change,
// every part of a configuration livesentry does not carry out, rather than
// ignoring it: a user namespace, joining a namespace by path, hooks,
// seccomp, AppArmor and SELinux, cgroup resource limits other than the
// memory limit (which sizes the memory file), and a terminal.
package specutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Annotations livesentry reads from config.json.
const (
	// AnnotationMemory sizes the memory file (e.g. "4G"); it wins over
	// linux.resources.memory.limit.
	AnnotationMemory = "dev.livesentry.memory"
	// AnnotationShim is "false" to run the process without the libc shim
	// (a program linked with pkg/guest needs none).
	AnnotationShim = "dev.livesentry.shim"
)

// ConfigName is the name of the configuration file in a bundle.
const ConfigName = "config.json"

// ErrInvalid marks a configuration that cannot be run; the message says
// which field and what to do.
var ErrInvalid = errors.New("invalid bundle")

// invalid returns an ErrInvalid error about one field.
func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Load reads and checks bundle/config.json. The bundle must be a
// directory; its path is made absolute.
func Load(bundle string) (*specs.Spec, string, error) {
	abs, err := filepath.Abs(bundle)
	if err != nil {
		return nil, "", fmt.Errorf("bundle %q: %w", bundle, err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, "", invalid("bundle %s: %v", abs, err)
	}
	if !fi.IsDir() {
		return nil, "", invalid("bundle %s is not a directory", abs)
	}
	b, err := os.ReadFile(filepath.Join(abs, ConfigName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", invalid("bundle %s has no %s (write one with \"runsc-luo spec --bundle %s\")", abs, ConfigName, abs)
	}
	if err != nil {
		return nil, "", invalid("reading %s: %v", ConfigName, err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, "", invalid("%s of bundle %s is not valid JSON for the runtime spec: %v", ConfigName, abs, err)
	}
	if err := Check(&s, abs); err != nil {
		return nil, "", err
	}
	return &s, abs, nil
}

// RootfsPath returns the absolute path of the root filesystem.
func RootfsPath(s *specs.Spec, bundle string) string {
	if filepath.IsAbs(s.Root.Path) {
		return s.Root.Path
	}
	return filepath.Join(bundle, s.Root.Path)
}

// supportedNamespaces are the namespaces livesentry creates.
var supportedNamespaces = map[specs.LinuxNamespaceType]uintptr{
	specs.MountNamespace:   unix.CLONE_NEWNS,
	specs.PIDNamespace:     unix.CLONE_NEWPID,
	specs.UTSNamespace:     unix.CLONE_NEWUTS,
	specs.IPCNamespace:     unix.CLONE_NEWIPC,
	specs.NetworkNamespace: unix.CLONE_NEWNET,
	specs.CgroupNamespace:  unix.CLONE_NEWCGROUP,
}

// CloneFlags returns the clone flags of the namespaces s asks for.
func CloneFlags(s *specs.Spec) uintptr {
	var flags uintptr
	if s.Linux != nil {
		for _, ns := range s.Linux.Namespaces {
			flags |= supportedNamespaces[ns.Type]
		}
	}
	return flags
}

// supportedMounts are the mount types livesentry mounts.
var supportedMounts = map[string]bool{
	"bind": true, "proc": true, "tmpfs": true, "devpts": true, "mqueue": true,
	"sysfs": true, "cgroup": true, "cgroup2": true,
}

// IsBind reports whether m is a bind mount (type "bind", or a "bind" or
// "rbind" option, as runc reads it).
func IsBind(m specs.Mount) bool {
	if m.Type == "bind" {
		return true
	}
	for _, o := range m.Options {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}

// Rlimits maps the rlimit names of the runtime spec to resources.
var Rlimits = map[string]int{
	"RLIMIT_AS": unix.RLIMIT_AS, "RLIMIT_CORE": unix.RLIMIT_CORE, "RLIMIT_CPU": unix.RLIMIT_CPU,
	"RLIMIT_DATA": unix.RLIMIT_DATA, "RLIMIT_FSIZE": unix.RLIMIT_FSIZE, "RLIMIT_LOCKS": unix.RLIMIT_LOCKS,
	"RLIMIT_MEMLOCK": unix.RLIMIT_MEMLOCK, "RLIMIT_MSGQUEUE": unix.RLIMIT_MSGQUEUE, "RLIMIT_NICE": unix.RLIMIT_NICE,
	"RLIMIT_NOFILE": unix.RLIMIT_NOFILE, "RLIMIT_NPROC": unix.RLIMIT_NPROC, "RLIMIT_RSS": unix.RLIMIT_RSS,
	"RLIMIT_RTPRIO": unix.RLIMIT_RTPRIO, "RLIMIT_RTTIME": unix.RLIMIT_RTTIME, "RLIMIT_SIGPENDING": unix.RLIMIT_SIGPENDING,
	"RLIMIT_STACK": unix.RLIMIT_STACK,
}

// Check checks a configuration against what livesentry carries out; bundle
// is the bundle's absolute path.
func Check(s *specs.Spec, bundle string) error {
	if !strings.HasPrefix(s.Version, "1.") {
		return invalid("ociVersion %q: want a 1.x runtime-spec version", s.Version)
	}
	p := s.Process
	if p == nil {
		return invalid("no process: config.json must say what to run (process.args)")
	}
	if len(p.Args) == 0 || p.Args[0] == "" {
		return invalid("process.args is empty: give the program to run")
	}
	if p.Terminal {
		return invalid("process.terminal is true, but livesentry guests have no terminal: set it to false (with ctr, leave out -t)")
	}
	if p.Cwd == "" || !filepath.IsAbs(p.Cwd) {
		return invalid("process.cwd %q: must be an absolute path", p.Cwd)
	}
	if p.ApparmorProfile != "" || p.SelinuxLabel != "" {
		return invalid("process.apparmorProfile and process.selinuxLabel are not supported: remove them")
	}
	for _, r := range p.Rlimits {
		if _, ok := Rlimits[r.Type]; !ok {
			return invalid("process.rlimits: unknown rlimit %q", r.Type)
		}
		if r.Soft > r.Hard {
			return invalid("process.rlimits: %s soft limit %d above its hard limit %d", r.Type, r.Soft, r.Hard)
		}
	}
	for _, e := range p.Env {
		if !strings.Contains(e, "=") {
			return invalid("process.env entry %q: want NAME=VALUE", e)
		}
	}
	if s.Root == nil || s.Root.Path == "" {
		return invalid("no root.path: give the container's root filesystem (a directory)")
	}
	if fi, err := os.Stat(RootfsPath(s, bundle)); err != nil || !fi.IsDir() {
		return invalid("root.path %s is not a directory", RootfsPath(s, bundle))
	}
	//lint:ignore SA1019 a deprecated hook is still a hook to refuse.
	if s.Hooks != nil && (len(s.Hooks.Prestart)+len(s.Hooks.CreateRuntime)+len(s.Hooks.CreateContainer)+
		len(s.Hooks.StartContainer)+len(s.Hooks.Poststart)+len(s.Hooks.Poststop) > 0) {
		return invalid("hooks are not supported: remove them")
	}
	for _, m := range s.Mounts {
		if !filepath.IsAbs(m.Destination) {
			return invalid("mount destination %q: must be an absolute path", m.Destination)
		}
		if IsBind(m) {
			src := m.Source
			if !filepath.IsAbs(src) {
				src = filepath.Join(bundle, src)
			}
			if _, err := os.Stat(src); err != nil {
				return invalid("bind mount source of %s: %v", m.Destination, err)
			}
			continue
		}
		if !supportedMounts[m.Type] {
			return invalid("mount of %s: type %q is not supported (supported: bind, proc, tmpfs, devpts, mqueue, sysfs, cgroup, cgroup2)", m.Destination, m.Type)
		}
	}
	return checkLinux(s)
}

// checkLinux checks the linux section.
func checkLinux(s *specs.Spec) error {
	l := s.Linux
	if l == nil {
		return invalid("no linux section: livesentry needs at least a mount namespace (linux.namespaces)")
	}
	seen := map[specs.LinuxNamespaceType]bool{}
	for _, ns := range l.Namespaces {
		if _, ok := supportedNamespaces[ns.Type]; !ok {
			return invalid("linux.namespaces: a %q namespace is not supported (supported: mount, pid, uts, ipc, network, cgroup)", ns.Type)
		}
		if ns.Path != "" {
			return invalid("linux.namespaces: joining the %s namespace %s is not supported: livesentry creates new namespaces only", ns.Type, ns.Path)
		}
		if seen[ns.Type] {
			return invalid("linux.namespaces: %s given twice", ns.Type)
		}
		seen[ns.Type] = true
	}
	if !seen[specs.MountNamespace] {
		return invalid("linux.namespaces has no mount namespace: livesentry runs the process in its root filesystem inside a new mount namespace only")
	}
	if s.Hostname != "" && !seen[specs.UTSNamespace] {
		return invalid("hostname %q needs a uts namespace in linux.namespaces", s.Hostname)
	}
	if len(l.UIDMappings)+len(l.GIDMappings) > 0 {
		return invalid("linux.uidMappings/gidMappings: user namespaces are not supported")
	}
	if l.Seccomp != nil {
		return invalid("linux.seccomp is not supported: remove it")
	}
	if l.MountLabel != "" || l.IntelRdt != nil || l.Personality != nil || len(l.Sysctl) > 0 {
		return invalid("linux.mountLabel, intelRdt, personality and sysctl are not supported: remove them")
	}
	switch l.RootfsPropagation {
	case "", "private", "rprivate", "slave", "rslave":
	default:
		return invalid("linux.rootfsPropagation %q: only private and slave are supported", l.RootfsPropagation)
	}
	for _, d := range l.Devices {
		if !defaultDevices[d.Path] {
			return invalid("linux.devices: %s is not supported (only the default devices %s are provided)", d.Path, strings.Join(DefaultDevices, ", "))
		}
	}
	if r := l.Resources; r != nil {
		var set []string
		for _, f := range []struct {
			name string
			set  bool
		}{
			{"cpu", cpuLimited(r.CPU)}, {"pids", r.Pids != nil && r.Pids.Limit > 0},
			{"blockIO", r.BlockIO != nil}, {"hugepageLimits", len(r.HugepageLimits) > 0},
			{"network", r.Network != nil}, {"rdma", len(r.Rdma) > 0}, {"unified", len(r.Unified) > 0},
		} {
			if f.set {
				set = append(set, f.name)
			}
		}
		if len(set) > 0 {
			return invalid("linux.resources.%s: not supported, livesentry creates no cgroups (only memory.limit is read: it sizes the memory file); remove %s", strings.Join(set, ", "), strings.Join(set, ", "))
		}
	}
	return nil
}

// defaultShares is the kernel's default CPU weight, which container
// managers write into every configuration (ctr does): asking for it asks
// for nothing.
const defaultShares = 1024

// cpuLimited reports whether c limits anything beyond the defaults:
// container managers fill in zero values and the default weight.
func cpuLimited(c *specs.LinuxCPU) bool {
	if c == nil {
		return false
	}
	nz := func(p *uint64) bool { return p != nil && *p != 0 }
	nzi := func(p *int64) bool { return p != nil && *p != 0 }
	return c.Shares != nil && *c.Shares != 0 && *c.Shares != defaultShares || nzi(c.Quota) || nz(c.Period) || nzi(c.RealtimeRuntime) || nz(c.RealtimePeriod) ||
		c.Cpus != "" || c.Mems != "" || nzi(c.Idle) || nz(c.Burst)
}

// DefaultDevices are the device nodes a container gets in /dev, bound from
// the host's, as runc's defaults.
var DefaultDevices = []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"}

var defaultDevices = func() map[string]bool {
	m := map[string]bool{}
	for _, d := range DefaultDevices {
		m[d] = true
	}
	return m
}()

// MemoryLimit returns the memory-file size a configuration asks for: the
// dev.livesentry.memory annotation, else linux.resources.memory.limit;
// 0 if neither.
func MemoryLimit(s *specs.Spec, parse func(string) (uint64, error)) (uint64, error) {
	if v, ok := s.Annotations[AnnotationMemory]; ok {
		n, err := parse(v)
		if err != nil {
			return 0, invalid("annotation %s: %v", AnnotationMemory, err)
		}
		return n, nil
	}
	if l := s.Linux; l != nil && l.Resources != nil && l.Resources.Memory != nil && l.Resources.Memory.Limit != nil {
		n := *l.Resources.Memory.Limit
		if n <= 0 {
			// -1 is "unlimited" in the spec.
			return 0, nil
		}
		return uint64(n), nil
	}
	return 0, nil
}

// WantsShim reports whether the process runs under the libc shim.
func WantsShim(s *specs.Spec) bool { return s.Annotations[AnnotationShim] != "false" }

// Default returns a minimal configuration for a livesentry guest running
// args (default: sh) in the bundle's "rootfs" directory: new mount, pid,
// ipc, uts and network namespaces, /proc, /dev and /dev/shm, a read-only
// root, and runc's masked and read-only paths.
func Default(args []string) *specs.Spec {
	if len(args) == 0 {
		args = []string{"sh"}
	}
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args: args,
			Env:  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"},
			Cwd:  "/",
			Rlimits: []specs.POSIXRlimit{
				{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024},
			},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: "rootfs", Readonly: true},
		Hostname: "livesentry",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace},
			},
			MaskedPaths: []string{"/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
				"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
		},
		Annotations: map[string]string{AnnotationMemory: "1G"},
	}
}
