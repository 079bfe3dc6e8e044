package guestinit

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
	"github.com/livesentry/livesentry/runsc-luo/specutil"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// mountFlags maps mount options to flags; the bool clears the flag.
var mountFlags = map[string]struct {
	clear bool
	flag  uintptr
}{
	"ro": {false, unix.MS_RDONLY}, "rw": {true, unix.MS_RDONLY},
	"nosuid": {false, unix.MS_NOSUID}, "suid": {true, unix.MS_NOSUID},
	"nodev": {false, unix.MS_NODEV}, "dev": {true, unix.MS_NODEV},
	"noexec": {false, unix.MS_NOEXEC}, "exec": {true, unix.MS_NOEXEC},
	"sync": {false, unix.MS_SYNCHRONOUS}, "async": {true, unix.MS_SYNCHRONOUS},
	"noatime": {false, unix.MS_NOATIME}, "atime": {true, unix.MS_NOATIME},
	"nodiratime": {false, unix.MS_NODIRATIME}, "diratime": {true, unix.MS_NODIRATIME},
	"relatime": {false, unix.MS_RELATIME}, "norelatime": {true, unix.MS_RELATIME},
	"strictatime": {false, unix.MS_STRICTATIME}, "nostrictatime": {true, unix.MS_STRICTATIME},
	"bind": {false, unix.MS_BIND}, "rbind": {false, unix.MS_BIND | unix.MS_REC},
	"private": {false, unix.MS_PRIVATE}, "rprivate": {false, unix.MS_PRIVATE | unix.MS_REC},
	"slave": {false, unix.MS_SLAVE}, "rslave": {false, unix.MS_SLAVE | unix.MS_REC},
	"shared": {false, unix.MS_SHARED}, "rshared": {false, unix.MS_SHARED | unix.MS_REC},
}

// parseOptions splits mount options into flags, propagation flags and
// filesystem data.
func parseOptions(opts []string) (flags, prop uintptr, data string) {
	var d []string
	for _, o := range opts {
		f, ok := mountFlags[o]
		switch {
		case !ok:
			d = append(d, o)
		case f.flag&(unix.MS_PRIVATE|unix.MS_SLAVE|unix.MS_SHARED) != 0:
			prop |= f.flag
		case f.clear:
			flags &^= f.flag
		default:
			flags |= f.flag
		}
	}
	return flags, prop, strings.Join(d, ",")
}

// maxSymlinks bounds the symbolic links inRoot follows, as Linux's
// MAXSYMLINKS.
const maxSymlinks = 40

// inRoot returns the host path of dest inside rootfs, resolving symbolic
// links as the container would see them (an absolute link is taken from
// rootfs, ".." stops at rootfs), so that no mount of the configuration can
// land outside the root filesystem through a link in it. Components that do
// not exist yet are kept as they are (the mount point is created).
func inRoot(rootfs, dest string) (string, error) {
	rest := strings.Split(filepath.Clean("/"+dest), "/")
	cur := "/"
	links := 0
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			cur = filepath.Dir(cur)
			continue
		}
		next := filepath.Join(cur, c)
		fi, err := os.Lstat(filepath.Join(rootfs, next))
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		if links++; links > maxSymlinks {
			return "", fmt.Errorf("mount destination %q: too many symbolic links", dest)
		}
		target, err := os.Readlink(filepath.Join(rootfs, next))
		if err != nil {
			return "", fmt.Errorf("mount destination %q: %w", dest, err)
		}
		if filepath.IsAbs(target) {
			cur = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return filepath.Join(rootfs, cur), nil
}

// mkTarget creates a mount point: a directory, or an empty file when the
// source is not a directory.
func mkTarget(target string, dir bool) error {
	if dir {
		return os.MkdirAll(target, 0o755)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// setupRootfs mounts the container's root filesystem in this process's new
// mount namespace and pivots into it. guestSock and lib are the host paths
// of the guest socket and the shim library ("" for none).
func setupRootfs(s *specs.Spec, bundle, guestSock, lib string) error {
	prop := uintptr(unix.MS_SLAVE | unix.MS_REC)
	if strings.HasSuffix(s.Linux.RootfsPropagation, "private") {
		prop = unix.MS_PRIVATE | unix.MS_REC
	}
	// Nothing mounted here may propagate to the host.
	if err := unix.Mount("", "/", "", prop, ""); err != nil {
		return fmt.Errorf("making / %s: %w", s.Linux.RootfsPropagation, err)
	}
	rootfs, err := filepath.EvalSymlinks(specutil.RootfsPath(s, bundle))
	if err != nil {
		return fmt.Errorf("root.path: %w", err)
	}
	if err := unix.Mount(rootfs, rootfs, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("binding the root filesystem %s: %w", rootfs, err)
	}
	devTmpfs := false
	for _, m := range s.Mounts {
		if err := mountOne(rootfs, bundle, m); err != nil {
			return err
		}
		if m.Destination == "/dev" && m.Type == "tmpfs" {
			devTmpfs = true
		}
	}
	if devTmpfs {
		if err := defaultDevices(rootfs); err != nil {
			return err
		}
	}
	if err := bindGuestFiles(rootfs, guestSock, lib); err != nil {
		return err
	}
	if err := pivot(rootfs); err != nil {
		return err
	}
	for _, p := range s.Linux.MaskedPaths {
		if err := maskPath(p); err != nil {
			return err
		}
	}
	for _, p := range s.Linux.ReadonlyPaths {
		if err := readonlyPath(p); err != nil {
			return err
		}
	}
	if s.Root.Readonly {
		if err := unix.Mount("", "/", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("making the root filesystem read-only: %w", err)
		}
	}
	return nil
}

// mountOne mounts one entry of config.json's mounts.
func mountOne(rootfs, bundle string, m specs.Mount) error {
	target, err := inRoot(rootfs, m.Destination)
	if err != nil {
		return err
	}
	flags, prop, data := parseOptions(m.Options)
	typ, src := m.Type, m.Source
	isDir := true
	switch {
	case specutil.IsBind(m):
		if !filepath.IsAbs(src) {
			src = filepath.Join(bundle, src)
		}
		fi, err := os.Stat(src)
		if err != nil {
			return fmt.Errorf("bind mount of %s: %w", m.Destination, err)
		}
		isDir = fi.IsDir()
		typ, flags = "", flags|unix.MS_BIND
	case typ == "cgroup" || typ == "cgroup2":
		// The host's cgroup hierarchy, read-only: livesentry creates no
		// cgroup of its own.
		typ, src, flags, data = "", "/sys/fs/cgroup", unix.MS_BIND|unix.MS_REC|unix.MS_RDONLY|flags, ""
	}
	if err := mkTarget(target, isDir); err != nil {
		return fmt.Errorf("mount point %s: %w", m.Destination, err)
	}
	if err := unix.Mount(src, target, typ, flags&^unix.MS_RDONLY, data); err != nil {
		return fmt.Errorf("mounting %s (%s) on %s: %w", src, m.Type, m.Destination, err)
	}
	// A bind mount takes its flags only on a remount.
	if flags&unix.MS_BIND != 0 && flags&^(unix.MS_BIND|unix.MS_REC) != 0 || flags&unix.MS_RDONLY != 0 {
		rf := flags&^unix.MS_REC | unix.MS_REMOUNT
		if flags&unix.MS_BIND != 0 {
			rf |= unix.MS_BIND
		}
		if err := unix.Mount("", target, "", rf, data); err != nil {
			return fmt.Errorf("remounting %s with %v: %w", m.Destination, m.Options, err)
		}
	}
	if prop != 0 {
		if err := unix.Mount("", target, "", prop, ""); err != nil {
			return fmt.Errorf("propagation of %s: %w", m.Destination, err)
		}
	}
	return nil
}

// defaultDevices binds the host's default devices into the container's
// /dev tmpfs, with runc's /dev symlinks.
func defaultDevices(rootfs string) error {
	for _, d := range specutil.DefaultDevices {
		target, err := inRoot(rootfs, d)
		if err != nil {
			return err
		}
		if err := mkTarget(target, false); err != nil {
			return fmt.Errorf("device %s: %w", d, err)
		}
		if err := unix.Mount(d, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding device %s: %w", d, err)
		}
	}
	dev, err := inRoot(rootfs, "/dev")
	if err != nil {
		return err
	}
	for name, to := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		p := filepath.Join(dev, name)
		if _, err := os.Lstat(p); err == nil {
			continue
		}
		if err := os.Symlink(to, p); err != nil {
			return fmt.Errorf("/dev/%s: %w", name, err)
		}
	}
	return nil
}

// bindGuestFiles mounts a small tmpfs at GuestDir and binds the guest
// socket and the shim library into it, then makes it read-only.
func bindGuestFiles(rootfs, guestSock, lib string) error {
	dir, err := inRoot(rootfs, GuestDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s in the root filesystem: %w", GuestDir, err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=755,size=64k"); err != nil {
		return fmt.Errorf("mounting %s: %w", GuestDir, err)
	}
	for _, b := range []struct{ src, name string }{{guestSock, "guest.sock"}, {lib, "libshim.so"}} {
		if b.src == "" {
			continue
		}
		target := filepath.Join(dir, b.name)
		if err := mkTarget(target, false); err != nil {
			return err
		}
		if err := unix.Mount(b.src, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding %s into the container: %w", b.src, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("making %s read-only: %w", GuestDir, err)
	}
	return nil
}

// pivot makes rootfs the root and detaches the old one (runc's
// pivot_root(".", ".") without a temporary directory).
func pivot(rootfs string) error {
	if err := unix.Chdir(rootfs); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root into %s: %w", rootfs, err)
	}
	if err := unix.Mount("", ".", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return err
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the old root: %w", err)
	}
	return unix.Chdir("/")
}

// maskPath hides a path: /dev/null over a file, an empty read-only tmpfs
// over a directory; a missing path is skipped.
func maskPath(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return nil
	}
	if fi.IsDir() {
		err = unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY, "size=0")
	} else {
		err = unix.Mount("/dev/null", p, "", unix.MS_BIND, "")
	}
	if err != nil {
		return fmt.Errorf("masking %s: %w", p, err)
	}
	return nil
}

// readonlyPath makes a path read-only; a missing path is skipped.
func readonlyPath(p string) error {
	if _, err := os.Stat(p); err != nil {
		return nil
	}
	if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("read-only %s: %w", p, err)
	}
	if err := unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("read-only %s: %w", p, err)
	}
	return nil
}

// prepareProcess checks the process section inside the container (cwd,
// the program) and applies the rlimits; what needs the root of the
// credentials is applied by exec.
func prepareProcess(s *specs.Spec, withShim bool, lun string) (*prepared, error) {
	p := s.Process
	if err := unix.Chdir(p.Cwd); err != nil {
		return nil, fmt.Errorf("process.cwd %s: %w", p.Cwd, err)
	}
	for _, r := range p.Rlimits {
		lim := unix.Rlimit{Cur: r.Soft, Max: r.Hard}
		if err := unix.Setrlimit(specutil.Rlimits[r.Type], &lim); err != nil {
			return nil, fmt.Errorf("process.rlimits %s: %w", r.Type, err)
		}
	}
	env := envWithout(p.Env, abiguest.EnvSocket, abiguest.EnvLiveupdateNumber)
	env = append(env, abiguest.EnvSocket+"="+GuestDir+"/guest.sock", abiguest.EnvLiveupdateNumber+"="+lun)
	if withShim {
		preload := GuestDir + "/libshim.so"
		var rest []string
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "LD_PRELOAD="); ok {
				if v != "" {
					preload += ":" + v
				}
				continue
			}
			rest = append(rest, kv)
		}
		env = append(rest, "LD_PRELOAD="+preload)
	}
	path, err := lookPath(p.Args[0], env)
	if err != nil {
		return nil, err
	}
	c := creds{uid: p.User.UID, gid: p.User.GID, noNewPrivs: p.NoNewPrivileges, umask: p.User.Umask}
	for _, g := range p.User.AdditionalGids {
		c.groups = append(c.groups, int(g))
	}
	if c.groups == nil {
		c.groups = []int{}
	}
	if p.Capabilities != nil {
		c.bounding = append([]string{}, p.Capabilities.Bounding...)
	}
	return &prepared{path: path, args: p.Args, env: env, c: c}, nil
}
