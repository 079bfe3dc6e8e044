package cmd

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/specutil"
)

// Spec writes a minimal config.json for a livesentry guest.
type Spec struct {
	bundle string
}

func (*Spec) Name() string     { return "spec" }
func (*Spec) Synopsis() string { return "write a minimal OCI config.json for a livesentry container" }
func (*Spec) Usage() string {
	return `spec [--bundle DIR] [-- COMMAND ARGS]

Writes DIR/config.json (default: the current directory), an OCI runtime-spec
configuration that runs COMMAND (default: sh) in DIR/rootfs in new mount,
pid, ipc, uts and network namespaces, with /proc, /dev and /dev/shm mounted,
a read-only root, and a 1 GiB memory file (annotation dev.livesentry.memory).
An existing config.json is not overwritten. Then:

  runsc-luo run --bundle DIR ID
`
}
func (s *Spec) SetFlags(f *flag.FlagSet) {
	f.StringVar(&s.bundle, "bundle", ".", "bundle directory to write config.json into")
}

func (s *Spec) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	args := f.Args()
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if fi, err := os.Stat(s.bundle); err != nil || !fi.IsDir() {
		return usagef("--bundle %q: not a directory", s.bundle)
	}
	path := filepath.Join(s.bundle, specutil.ConfigName)
	if _, err := os.Stat(path); err == nil {
		return fatalf("%s already exists: remove it first", path)
	} else if !errors.Is(err, os.ErrNotExist) {
		return fatalf("%v", err)
	}
	b, err := json.MarshalIndent(specutil.Default(args), "", "  ")
	if err != nil {
		return fatalf("%v", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fatalf("%v", err)
	}
	fmt.Fprintf(os.Stderr, "wrote %s; put the root filesystem in %s\n", path, filepath.Join(s.bundle, "rootfs"))
	return subcommands.ExitSuccess
}
