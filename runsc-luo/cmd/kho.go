package cmd

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/pkg/abi/fdt"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// KHO is "kho dump": the KHO root FDT of a sandbox.
type KHO struct {
	in, out bool
	output  string
	format  string
}

func (*KHO) Name() string     { return "kho" }
func (*KHO) Synopsis() string { return "dump a sandbox's KHO root FDT (kho dump)" }
func (*KHO) Usage() string {
	return `kho dump [--in|--out] [--format dtb|dts|json] [-o FILE] ID

Writes the outgoing (default) or incoming KHO root to FILE or stdout: as the
flattened device tree blob itself (dtb, the default), decoded by dtc (dts;
needs the device-tree-compiler package), or as JSON (addresses and counts as
numbers, strings as strings). The root's compatible names its format (kho-v1
or kho-v2). In kho-v1 the outgoing root's preserved-memory-map is 0 except
during a restart; in kho-v2 it is the radix tree, always current.
`
}
func (k *KHO) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&k.in, "in", false, "the root this sentry received at its live-update boot")
	f.BoolVar(&k.out, "out", false, "the root this sentry will hand over (default)")
	f.StringVar(&k.output, "o", "", "write to FILE instead of stdout")
	f.StringVar(&k.format, "format", "dtb", "dtb, dts (through dtc) or json")
}

func (k *KHO) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	root := configOf(args).Root
	a := f.Args()
	if len(a) < 1 || a[0] != "dump" {
		f.Usage()
		return subcommands.ExitUsageError
	}
	// Flags may also follow "dump" and the ID.
	sub := flag.NewFlagSet("kho dump", flag.ContinueOnError)
	k.SetFlags(sub)
	var ids []string
	rest := a[1:]
	for len(rest) > 0 {
		if err := sub.Parse(rest); err != nil {
			f.Usage()
			return subcommands.ExitUsageError
		}
		rest = sub.Args()
		if len(rest) > 0 {
			ids, rest = append(ids, rest[0]), rest[1:]
		}
	}
	if len(ids) != 1 {
		f.Usage()
		return subcommands.ExitUsageError
	}
	if k.in && k.out {
		return fatalf("--in and --out are exclusive")
	}
	if k.format != "dtb" && k.format != "dts" && k.format != "json" {
		return fatalf("--format %q: must be dtb, dts or json", k.format)
	}
	id := ids[0]
	if _, err := sandbox.ReadState(root, id); err != nil {
		return fatalf("%v", err)
	}
	var res boot.KHODumpResult
	if err := sandbox.Call(root, id, boot.MethodKHODump, &boot.KHODumpArgs{In: k.in}, &res); err != nil {
		return fatalf("kho dump of %q: %v", id, err)
	}
	out, err := formatFDT(res.Blob, k.format)
	if err != nil {
		return fatalf("kho dump of %q: %v", id, err)
	}
	if k.output == "" {
		os.Stdout.Write(out)
		return subcommands.ExitSuccess
	}
	if err := os.WriteFile(k.output, out, 0o644); err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}

// formatFDT renders an FDT blob as dtb (itself), dts (dtc's decoding) or
// JSON.
func formatFDT(blob []byte, format string) ([]byte, error) {
	switch format {
	case "dts":
		dtc, err := exec.LookPath("dtc")
		if err != nil {
			return nil, fmt.Errorf("--format dts needs dtc (Debian package device-tree-compiler), or use --format json: %w", err)
		}
		cmd := exec.Command(dtc, "-q", "-I", "dtb", "-O", "dts")
		cmd.Stdin = bytes.NewReader(blob)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("dtc: %v: %s", err, stderr.Bytes())
		}
		return out, nil
	case "json":
		root, err := fdt.Parse(blob, len(blob))
		if err != nil {
			return nil, err
		}
		b, err := json.MarshalIndent(root, "", "  ")
		return append(b, '\n'), err
	}
	return blob, nil
}
