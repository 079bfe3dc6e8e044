package cmd

import (
	"context"
	"flag"
	"os"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// KHO is "kho dump": the KHO root FDT of a sandbox.
type KHO struct {
	in, out bool
	output  string
}

func (*KHO) Name() string     { return "kho" }
func (*KHO) Synopsis() string { return "dump a sandbox's KHO root FDT (kho dump)" }
func (*KHO) Usage() string {
	return `kho dump [--in|--out] [-o FILE] ID

Writes the outgoing (default) or incoming KHO root as a flattened device tree
blob, decodable with "dtc -I dtb -O dts", to FILE or stdout. The outgoing
root's preserved-memory-map is 0 except during a restart.
`
}
func (k *KHO) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&k.in, "in", false, "the root this sentry received at its live-update boot")
	f.BoolVar(&k.out, "out", false, "the root this sentry will hand over (default)")
	f.StringVar(&k.output, "o", "", "write to FILE instead of stdout")
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
	id := ids[0]
	if _, err := sandbox.ReadState(root, id); err != nil {
		return fatalf("%v", err)
	}
	var res boot.KHODumpResult
	if err := sandbox.Call(root, id, boot.MethodKHODump, &boot.KHODumpArgs{In: k.in}, &res); err != nil {
		return fatalf("kho dump of %q: %v", id, err)
	}
	if k.output == "" {
		os.Stdout.Write(res.Blob)
		return subcommands.ExitSuccess
	}
	if err := os.WriteFile(k.output, res.Blob, 0o644); err != nil {
		return fatalf("%v", err)
	}
	return subcommands.ExitSuccess
}
