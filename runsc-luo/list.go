package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/google/subcommands"
)

// listCmd lists the sandboxes in --root.
type listCmd struct {
	format string
	quiet  bool
}

func (*listCmd) Name() string     { return "list" }
func (*listCmd) Synopsis() string { return "list the sandboxes in --root" }
func (*listCmd) Usage() string    { return "list [--format table|json] [-q]\n" }
func (l *listCmd) SetFlags(f *flag.FlagSet) {
	f.StringVar(&l.format, "format", "table", "table or json")
	f.BoolVar(&l.quiet, "quiet", false, "print only IDs")
	f.BoolVar(&l.quiet, "q", false, "print only IDs")
}

// listStates returns the state of every sandbox in root.
func listStates(root string) ([]*state, error) {
	ents, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*state
	for _, e := range ents {
		if !e.IsDir() || checkID(e.Name()) != nil {
			continue
		}
		if st, err := readState(root, e.Name()); err == nil {
			out = append(out, st)
		}
	}
	return out, nil
}

func (l *listCmd) Execute(_ context.Context, f *flag.FlagSet, _ ...any) subcommands.ExitStatus {
	sts, err := listStates(*rootDir)
	if err != nil {
		return fatalf("%v", err)
	}
	switch {
	case l.quiet:
		for _, st := range sts {
			fmt.Println(st.ID)
		}
	case l.format == "json":
		if sts == nil {
			sts = []*state{}
		}
		b, _ := json.MarshalIndent(sts, "", "  ")
		fmt.Println(string(b))
	case l.format == "table":
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 3, ' ', 0)
		fmt.Fprintln(tw, "ID\tPID\tSTATUS\tLIVEUPDATE\tCREATED")
		for _, st := range sts {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", st.ID, st.PID, st.Status, st.LiveupdateNumber, st.Created.Format(time.RFC3339))
		}
		tw.Flush()
	default:
		return fatalf("--format %q: must be table or json", l.format)
	}
	return subcommands.ExitSuccess
}
