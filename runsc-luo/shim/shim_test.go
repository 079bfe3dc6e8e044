package shim

import (
	"bytes"
	"debug/elf"
	"errors"
	"os"
	"regexp"
	"strconv"
	"testing"

	abiguest "github.com/livesentry/livesentry/pkg/abi/guest"
)

// The C source restates the guest protocol; it must say what the Go
// package says.
func TestTheCSourceSpeaksTheGuestProtocol(t *testing.T) {
	want := map[string]int64{
		"GUEST_VERSION":      abiguest.Version,
		"HELLO_SIZE":         abiguest.HelloSize,
		"REQ_SIZE":           abiguest.RequestHeaderSize,
		"RESP_SIZE":          abiguest.ResponseHeaderSize,
		"STAT_SIZE":          abiguest.StatSize,
		"RUN_SIZE":           abiguest.MmapRunSize,
		"MAX_SMALL_PAYLOAD":  abiguest.MaxSmallPayload,
		"MAX_WRITE_PAYLOAD":  abiguest.MaxWritePayload,
		"MAX_REPLY_PAYLOAD":  abiguest.MaxReplyPayload,
		"MMAP_MAY_WRITE":     abiguest.MmapMayWrite,
		"HELLO_START_GATE":   abiguest.HelloStartGate,
		"START_GATE_WAITING": abiguest.StartGateWaiting,
		"START_GATE_OPEN":    abiguest.StartGateOpen,
		"KIND_DATA":          int64(abiguest.KindData),
		"KIND_RESULT":        int64(abiguest.KindResult),
		"KIND_FATAL":         int64(abiguest.KindFatal),
		"KIND_FILE":          int64(abiguest.KindFile),
	}
	for op := abiguest.OpMemfdCreate; op.Valid(); op++ {
		name := "OP_" + map[string]string{"pread64": "PREAD64", "pwrite64": "PWRITE64"}[op.String()]
		if name == "OP_" {
			name = "OP_" + string(bytes.ToUpper([]byte(op.String())))
		}
		want[name] = int64(op)
	}
	re := regexp.MustCompile(`(?m)^\s*([A-Z0-9_]+) = (0x[0-9a-f]+|\d+),`)
	got := map[string]int64{}
	for _, m := range re.FindAllSubmatch(Source, -1) {
		v, err := strconv.ParseInt(string(m[2]), 0, 64)
		if err != nil {
			t.Fatal(err)
		}
		got[string(m[1])] = v
	}
	for name, v := range want {
		if g, ok := got[name]; !ok || g != v {
			t.Errorf("%s in shim.c is %d (present %v), the guest protocol says %d", name, g, ok, v)
		}
	}
	if !bytes.Contains(Source, []byte(`#define ERESTART_SENTRY `+strconv.Itoa(abiguest.ErrnoRestart)+"\n")) {
		t.Errorf("shim.c's ERESTART_SENTRY is not %d", abiguest.ErrnoRestart)
	}
	if !bytes.Contains(Source, []byte(`#define ENV_START_FD "`+abiguest.EnvStartFD+`"`)) {
		t.Errorf("shim.c's ENV_START_FD is not %q", abiguest.EnvStartFD)
	}
	if !bytes.Contains(Source, []byte(`#define GUEST_MAGIC "`+abiguest.Magic[:7]+`"`)) {
		t.Errorf("shim.c's GUEST_MAGIC is not %q", abiguest.Magic)
	}
}

// reset forgets this process's build, so that Path looks again.
func reset() {
	mu.Lock()
	built = ""
	mu.Unlock()
}

// emptyCache skips t without a C compiler; otherwise it points the cache
// at a new empty directory, which it returns, with nothing built yet in
// this process.
func emptyCache(t *testing.T) string {
	t.Helper()
	if _, err := compiler(); err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	t.Setenv(EnvCacheDir, dir)
	reset()
	t.Cleanup(reset)
	return dir
}

func TestPathBuildsASharedLibraryOnceIntoTheCache(t *testing.T) {
	dir := emptyCache(t)
	p, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Type != elf.ET_DYN {
		t.Errorf("%s is ELF type %v, want a shared object", p, f.Type)
	}
	syms, err := f.DynamicSymbols()
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for _, s := range syms {
		if s.Section != elf.SHN_UNDEF {
			exported[s.Name] = true
		}
	}
	for _, name := range []string{"open", "open64", "openat", "__open_2", "ioctl", "memfd_create", "read", "write", "pread64", "pwrite64", "__read_chk", "__pread_chk", "readv", "writev", "lseek64", "ftruncate64", "fallocate64", "fstat", "fstat64", "fstatat64", "__fxstat64", "statx", "fcntl", "fcntl64", "close", "close_range", "dup", "dup2", "dup3", "mmap", "mmap64", "munmap", "mprotect", "fork", "vfork", "execve", "execv", "execvp", "execvpe"} {
		if !exported[name] {
			t.Errorf("the shim does not define %s", name)
		}
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	// A second Path in a fresh process (reset) finds the cached build.
	reset()
	p2, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	st2, err := os.Stat(p2)
	if err != nil {
		t.Fatal(err)
	}
	if p2 != p || !st2.ModTime().Equal(st.ModTime()) {
		t.Errorf("second Path: %s (modified %v), want the cached %s (modified %v)", p2, st2.ModTime(), p, st.ModTime())
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("the cache holds %d files, want the library alone", len(ents))
	}
}

func TestPathWithoutACompilerSaysSo(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	t.Setenv(EnvCacheDir, t.TempDir())
	reset()
	t.Cleanup(reset)
	if _, err := Path(); !errors.Is(err, ErrNoCompiler) {
		t.Errorf("Path with no compiler: %v, want ErrNoCompiler", err)
	}
}

func TestLookupFindsTheCachedBuildAndNeverCompiles(t *testing.T) {
	dir := emptyCache(t)
	if Lookup() {
		t.Fatal("Lookup on an empty cache reported a build")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("Lookup on an empty cache left %d files in it: it must not compile", len(ents))
	}
	p, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	// A fresh process (reset) finds the build, and Path then returns it.
	reset()
	if !Lookup() {
		t.Fatalf("Lookup did not find the cached %s", p)
	}
	if p2, err := Path(); err != nil || p2 != p {
		t.Errorf("Path after Lookup = %q, %v; want %q", p2, err, p)
	}
	// A build removed since is not reported.
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if Lookup() {
		t.Error("Lookup reported a build that was removed")
	}
}
