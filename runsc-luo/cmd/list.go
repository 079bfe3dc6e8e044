package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// List lists the sandboxes in --root.
type List struct {
	format string
	quiet  bool
}

func (*List) Name() string     { return "list" }
func (*List) Synopsis() string { return "list the sandboxes in --root" }
func (*List) Usage() string    { return "list [--format table|json] [-q]\n" }
func (l *List) SetFlags(f *flag.FlagSet) {
	f.StringVar(&l.format, "format", "table", "table or json")
	f.BoolVar(&l.quiet, "quiet", false, "print only IDs")
	f.BoolVar(&l.quiet, "q", false, "print only IDs")
}

func (l *List) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if l.format != "table" && l.format != "json" {
		return fatalf("--format %q: must be table or json", l.format)
	}
	sts, err := sandbox.List(configOf(args).Root)
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
			sts = []*sandbox.State{}
		}
		b, _ := json.MarshalIndent(sts, "", "  ")
		fmt.Println(string(b))
	default:
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 3, ' ', 0)
		fmt.Fprintln(tw, "ID\tPID\tSTATUS\tLIVEUPDATE\tCREATED")
		for _, st := range sts {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", st.ID, st.PID, st.Status, st.LiveupdateNumber, st.Created.Format(time.RFC3339))
		}
		tw.Flush()
	}
	return subcommands.ExitSuccess
}
