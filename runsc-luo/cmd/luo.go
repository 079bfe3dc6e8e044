package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/runsc-luo/boot"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// LUO is "luo status".
type LUO struct {
	format string
}

func (*LUO) Name() string     { return "luo" }
func (*LUO) Synopsis() string { return "show a sandbox's LUO sessions and files (luo status)" }
func (*LUO) Usage() string {
	return `luo status [--format json|table] ID

Prints the liveupdate number, the registered file handlers, and every LUO
session (outgoing: preserved for the next restart; incoming: handed over by
the last one, until the guest retrieves and finishes it) with its files:
token, compatible string, state, size in bytes and the memory it holds
(allocated_bytes). Each session and the whole sandbox add them up. The size
of an incoming file is known once the guest has retrieved it; until then it
is counted in unsized_files.
`
}
func (l *LUO) SetFlags(f *flag.FlagSet) {
	f.StringVar(&l.format, "format", "json", "json or table")
}

// sessionView is a session with its totals.
type sessionView struct {
	luo.SessionStatus
	Bytes          int64 `json:"bytes"`
	AllocatedBytes int64 `json:"allocated_bytes"`
	UnsizedFiles   int   `json:"unsized_files,omitempty"`
}

// totals are the sums over every session.
type totals struct {
	Sessions       int   `json:"sessions"`
	Files          int   `json:"files"`
	Bytes          int64 `json:"bytes"`
	AllocatedBytes int64 `json:"allocated_bytes"`
	UnsizedFiles   int   `json:"unsized_files,omitempty"`
}

// statusView is what "luo status" prints.
type statusView struct {
	luo.Status
	Sessions []sessionView `json:"sessions"`
	Total    totals        `json:"total"`
}

func viewOf(st luo.Status) statusView {
	v := statusView{Status: st, Sessions: []sessionView{}}
	for _, s := range st.Sessions {
		sv := sessionView{SessionStatus: s}
		for _, f := range s.Files {
			if f.Bytes == nil {
				sv.UnsizedFiles++
				continue
			}
			sv.Bytes += *f.Bytes
			sv.AllocatedBytes += *f.AllocatedBytes
		}
		v.Sessions = append(v.Sessions, sv)
		v.Total.Sessions++
		v.Total.Files += len(s.Files)
		v.Total.Bytes += sv.Bytes
		v.Total.AllocatedBytes += sv.AllocatedBytes
		v.Total.UnsizedFiles += sv.UnsizedFiles
	}
	return v
}

func (l *LUO) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	root := configOf(args).Root
	if f.NArg() < 1 || f.Arg(0) != "status" {
		return usage(f, "luo: want \"status ID\"")
	}
	// Flags may follow "status" too.
	if err := f.Parse(f.Args()[1:]); err != nil || f.NArg() != 1 {
		return usage(f, "luo status: want exactly one sandbox ID")
	}
	if l.format != "json" && l.format != "table" {
		return usagef("--format %q: must be json or table", l.format)
	}
	id := f.Arg(0)
	if _, err := sandbox.ReadState(root, id); err != nil {
		return fatalf("%v", err)
	}
	var res boot.LUOStatusResult
	if err := sandbox.Call(root, id, boot.MethodLUOStatus, &boot.Empty{}, &res); err != nil {
		return fatalf("luo status of %q: %v (is the sandbox running?)", id, err)
	}
	v := viewOf(res.Status)
	if l.format == "json" {
		b, _ := json.MarshalIndent(v, "", "  ")
		fmt.Println(string(b))
		return subcommands.ExitSuccess
	}
	fmt.Printf("liveupdate number %d, handlers %v\n", v.LiveupdateNumber, v.Handlers)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SESSION\tDIRECTION\tTOKEN\tCOMPATIBLE\tSTATE\tBYTES\tALLOCATED")
	size := func(p *int64) string {
		if p == nil {
			return "-"
		}
		return fmt.Sprint(*p)
	}
	for _, s := range v.Sessions {
		for _, fl := range s.Files {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", s.Name, s.Direction, fl.Token, fl.Compatible, fl.State, size(fl.Bytes), size(fl.AllocatedBytes))
		}
		fmt.Fprintf(tw, "%s\t%s\t\t(%d files)\t\t%d\t%d\n", s.Name, "total", len(s.Files), s.Bytes, s.AllocatedBytes)
	}
	fmt.Fprintf(tw, "TOTAL\t%d sessions\t\t(%d files)\t\t%d\t%d\n", v.Total.Sessions, v.Total.Files, v.Total.Bytes, v.Total.AllocatedBytes)
	tw.Flush()
	if v.Total.UnsizedFiles > 0 {
		fmt.Printf("%d incoming files not retrieved yet: their size is not counted\n", v.Total.UnsizedFiles)
	}
	return subcommands.ExitSuccess
}
