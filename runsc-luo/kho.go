package main

import (
	"context"
	"flag"
	"os"

	"github.com/google/subcommands"
)

// khoCmd is "kho dump": the KHO root FDT of a sandbox.
type khoCmd struct {
	in, out bool
	output  string
}

func (*khoCmd) Name() string     { return "kho" }
func (*khoCmd) Synopsis() string { return "dump a sandbox's KHO root FDT (kho dump)" }
func (*khoCmd) Usage() string {
	return `kho dump [--in|--out] [-o FILE] ID

Writes the outgoing (default) or incoming KHO root as a flattened device tree
blob, decodable with "dtc -I dtb -O dts", to FILE or stdout. The outgoing
root's preserved-memory-map is 0 except during a restart.
`
}
func (k *khoCmd) SetFlags(f *flag.FlagSet) {
	f.BoolVar(&k.in, "in", false, "the root this sentry received at its live-update boot")
	f.BoolVar(&k.out, "out", false, "the root this sentry will hand over (default)")
	f.StringVar(&k.output, "o", "", "write to FILE instead of stdout")
}

func (k *khoCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	args := f.Args()
	if len(args) < 1 || args[0] != "dump" {
		f.Usage()
		return subcommands.ExitUsageError
	}
	// Flags may also follow "dump" and the ID.
	sub := flag.NewFlagSet("kho dump", flag.ContinueOnError)
	k.SetFlags(sub)
	var ids []string
	rest := args[1:]
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
	if _, err := readState(*rootDir, id); err != nil {
		return fatalf("%v", err)
	}
	var res KHODumpResult
	if err := call(*rootDir, id, "KHODump", &KHODumpArgs{In: k.in}, &res); err != nil {
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
