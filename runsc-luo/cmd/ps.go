package cmd

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/google/subcommands"
	"github.com/livesentry/livesentry/runsc-luo/container"
	"github.com/livesentry/livesentry/runsc-luo/sandbox"
)

// PS lists a container's processes.
type PS struct {
	format string
}

func (*PS) Name() string     { return "ps" }
func (*PS) Synopsis() string { return "list the processes of a container" }
func (*PS) Usage() string {
	return "ps [--format table|json] ID\n\nLists the host processes of container ID: its guests and everything they\nstarted. --format json prints a JSON array of pids, as runc does.\n"
}
func (p *PS) SetFlags(f *flag.FlagSet) {
	f.StringVar(&p.format, "format", "table", "table or json")
	f.StringVar(&p.format, "f", "table", "table or json")
}

func (p *PS) Execute(_ context.Context, f *flag.FlagSet, args ...any) subcommands.ExitStatus {
	if f.NArg() != 1 {
		return usage(f, "ps: want exactly one container ID, got %d arguments", f.NArg())
	}
	if p.format != "table" && p.format != "json" {
		return usagef("--format %q: must be table or json", p.format)
	}
	pids, err := container.Processes(configOf(args).Root, f.Arg(0))
	if err != nil {
		return fatalf("%v", err)
	}
	if p.format == "json" {
		if pids == nil {
			pids = []int{}
		}
		b, _ := json.Marshal(pids)
		fmt.Println(string(b))
		return subcommands.ExitSuccess
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PID\tPPID\tSTAT\tCMD")
	for _, pid := range pids {
		pr, ok := sandbox.ReadProc(pid)
		if !ok {
			continue
		}
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		cmd := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
		fmt.Fprintf(tw, "%d\t%d\t%c\t%s\n", pid, pr.PPID, pr.State, cmd)
	}
	tw.Flush()
	return subcommands.ExitSuccess
}
