// Package shim builds the libc shim: a shared library that, loaded with
// LD_PRELOAD, lets an unmodified dynamically linked program use its
// sandbox's sentry through the libc calls it already makes (open of
// /dev/liveupdate, ioctl, memfd_create, read, write, mmap, fork, execve
// and the rest; shim.c says how).
//
// The C source is embedded; Path compiles it with the system C compiler
// the first time it is needed and keeps the library in a cache directory,
// under a name derived from a hash of the source and the compiler command,
// so a changed source is rebuilt and an unchanged one is built once per
// machine.
package shim

import (
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// Source is the shim's C source.
//
//go:embed csrc/shim.c
var Source []byte

// EnvCacheDir overrides where the built library is kept.
const EnvCacheDir = "LIVESENTRY_SHIM_CACHE"

// ErrNoCompiler is returned (wrapped) when neither cc nor gcc is on PATH.
var ErrNoCompiler = errors.New("no C compiler (cc or gcc) on PATH: install gcc, or start guests without the shim (--shim=false)")

// cflags are the compiler flags; they are part of the cache key.
var cflags = []string{"-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"}

var (
	mu sync.Mutex
	// built is the library's path once built by this process.
	// +checklocks:mu
	built string
)

// Path returns the path of the built shim library, compiling it first if
// the cache does not hold a build of this source.
func Path() (string, error) {
	mu.Lock()
	defer mu.Unlock()
	cc, dir, out, err := cachedLocked()
	if err != nil || out == built {
		return out, err
	}
	if err := compile(cc, dir, out); err != nil {
		return "", err
	}
	built = out
	return out, nil
}

// Lookup finds the cached build of the shim, as Path does, but never
// compiles it: a restart's new sentry calls it before the blackout, so
// that the entrypoint's relaunch after it finds the path at once (the
// compiler's look-up on PATH and the source's hash take a millisecond or
// more). It reports whether a build is cached.
func Lookup() bool {
	mu.Lock()
	defer mu.Unlock()
	_, _, out, err := cachedLocked()
	return err == nil && out == built
}

// cachedLocked returns the compiler, the cache directory and the path of
// this source's build in it; built is set to that path if the build is
// there.
//
// +checklocks:mu
func cachedLocked() (cc, dir, out string, err error) {
	if built != "" {
		if _, err := os.Stat(built); err == nil {
			return "", "", built, nil
		}
		built = ""
	}
	if cc, err = compiler(); err != nil {
		return "", "", "", err
	}
	if dir, err = cacheDir(); err != nil {
		return "", "", "", err
	}
	h := sha256.New()
	h.Write(Source)
	fmt.Fprintf(h, "\x00%s\x00%s", cc, strings.Join(cflags, " "))
	out = filepath.Join(dir, "libshim-"+hex.EncodeToString(h.Sum(nil))[:16]+".so")
	if _, err := os.Stat(out); err == nil {
		built = out
	}
	return cc, dir, out, nil
}

// compiler finds cc, else gcc.
func compiler() (string, error) {
	for _, name := range []string{"cc", "gcc"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("building the livesentry libc shim: %w", ErrNoCompiler)
}

// cacheDir returns (and creates) the directory for built libraries:
// $LIVESENTRY_SHIM_CACHE, else the user cache directory's livesentry/, else
// one under the temporary directory.
func cacheDir() (string, error) {
	dir := os.Getenv(EnvCacheDir)
	if dir == "" {
		if c, err := os.UserCacheDir(); err == nil {
			dir = filepath.Join(c, "livesentry")
		} else {
			dir = filepath.Join(os.TempDir(), fmt.Sprintf("livesentry-cache-%d", os.Getuid()))
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("the shim's cache directory: %w", err)
	}
	return dir, nil
}

// compile builds the library at out: the source and the library are
// written under temporary names and renamed, so concurrent builders (two
// sentries starting at once) never see a partial file.
func compile(cc, dir, out string) error {
	src, err := os.CreateTemp(dir, "shim-*.c")
	if err != nil {
		return fmt.Errorf("building the shim: %w", err)
	}
	defer os.Remove(src.Name())
	if _, err := src.Write(Source); err != nil {
		src.Close()
		return fmt.Errorf("building the shim: %w", err)
	}
	if err := src.Close(); err != nil {
		return fmt.Errorf("building the shim: %w", err)
	}
	tmp := strings.TrimSuffix(src.Name(), ".c") + ".so"
	defer os.Remove(tmp)
	args := append(append([]string{}, cflags...), tmp, src.Name(), "-ldl", "-lpthread")
	if b, err := exec.Command(cc, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("building the shim with %s: %w\n%s", cc, err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("building the shim: %w", err)
	}
	return nil
}
