package test

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/livesentry/livesentry/runsc-luo/boot"
)

// The format matrix: three builds — one that reads and writes only the
// first formats (kho-v1, memfd-v1), the current one (every format), and
// one that reads and writes only the newest (kho-v2, memfd-v2) — restart
// into each other in both directions. Where the two share a format per
// subsystem the restart writes the newest of them and the relaunched guest
// verifies every byte; where a subsystem has none the restart is refused
// naming it and both lists, rolled back, and the old sentry still hands
// every byte to a build it shares formats with.
func TestRestartsAcrossFormatVersions(t *testing.T) {
	builds := []struct {
		name, bin string
	}{{"first", runscFirst}, {"current", runsc}, {"newest", runscNewest}}
	// What each build writes for KHO and memfd, given what it is
	// restarting into; "" where they share nothing.
	want := map[[2]string][2]string{
		{"first", "current"}:  {"kho-v1", "memfd-v1"},
		{"current", "first"}:  {"kho-v1", "memfd-v1"},
		{"current", "newest"}: {"kho-v2", "memfd-v2"},
		{"newest", "current"}: {"kho-v2", "memfd-v2"},
		{"first", "newest"}:   {"", ""},
		{"newest", "first"}:   {"", ""},
	}
	for _, from := range builds {
		for _, to := range builds {
			if from.name == to.name {
				continue
			}
			w := want[[2]string{from.name, to.name}]
			for _, mode := range []string{"transfer", "exec"} {
				t.Run(fmt.Sprintf("%s to %s in %s mode", from.name, to.name, mode), func(t *testing.T) {
					c := newCLI(t)
					id := "fmt" + from.name[:2] + to.name[:2] + mode[:2]
					seed := rand.Uint64()
					args := []string{from.bin, "demo-guest", "--size=6M", "--files=3", "--sessions=2", fmt.Sprintf("--seed=%d", seed)}
					if out, errOut, code := c.runBinary(from.bin, append([]string{"run", "--detach", "--memory=128M", id, "--"}, args...)...); code != 0 {
						t.Fatalf("run: %d %s %s", code, out, errOut)
					}
					c.waitEvent(id, "preserved", 0, 30*time.Second)
					out, errOut, code := c.run("restart", "--format=json", "--mode="+mode, "--binary="+to.bin, id)
					if w[0] == "" {
						if code == 0 {
							t.Fatalf("a restart from %s to %s succeeded: %s", from.name, to.name, out)
						}
						if !strings.Contains(errOut, "no format both sentries know: kho:") || !strings.Contains(errOut, "rolled back") {
							t.Fatalf("the refusal does not name the subsystem, both lists and the rollback: %s", errOut)
						}
						// The old sentry still has every byte: a restart
						// into a build of its own formats verifies them.
						c.restart(id, "--binary="+from.bin)
						c.waitEvent(id, "verified", 1, 30*time.Second)
						c.waitStopped(id, 30*time.Second)
						return
					}
					if code != 0 {
						t.Fatalf("restart from %s to %s: %d\n%s", from.name, to.name, code, errOut)
					}
					var tm timing
					if err := json.Unmarshal([]byte(out), &tm); err != nil {
						t.Fatal(err)
					}
					if !slices.Contains(tm.Formats, w[0]) || !slices.Contains(tm.Formats, w[1]) {
						t.Fatalf("the handover from %s to %s was written in %q, want %s and %s", from.name, to.name, tm.Formats, w[0], w[1])
					}
					c.waitEvent(id, "verified", 1, 30*time.Second)
					st := c.waitStopped(id, 30*time.Second)
					if st.ExitStatus == nil || *st.ExitStatus != 0 {
						t.Fatalf("the guest of %s after %s: %+v", to.name, from.name, st)
					}
					if st.LastRestart == nil || st.LastRestart.Timing.NewVersion != versionOf(t, to.bin) {
						t.Fatalf("the state after the restart: %+v", st)
					}
				})
			}
		}
	}
	// What each build says it reads and writes.
	for _, b := range builds {
		out, _, code := c0(t).runBinary(b.bin, "abi")
		var info boot.ABIInfo
		if code != 0 || json.Unmarshal([]byte(out), &info) != nil {
			t.Fatalf("%s abi: %d %q", b.name, code, out)
		}
		for _, f := range info.Formats {
			if f.Subsystem == "kho" || f.Subsystem == "memfd" {
				t.Logf("%s %s: reads %q writes %q", b.name, f.Subsystem, f.Reads, f.Writes)
			}
		}
		switch b.name {
		case "first":
			if slices.Contains(info.Reads, "kho-v2") || slices.Contains(info.Reads, "memfd-v2") {
				t.Errorf("the first-formats build reads %q", info.Reads)
			}
		case "newest":
			if slices.Contains(info.Reads, "kho-v1") || slices.Contains(info.Reads, "memfd-v1") {
				t.Errorf("the newest-formats build reads %q", info.Reads)
			}
		case "current":
			for _, f := range []string{"kho-v1", "kho-v2", "luo-session-v2", "memfd-v1", "memfd-v2"} {
				if !slices.Contains(info.Reads, f) {
					t.Errorf("runsc-luo abi does not list %s: %q", f, info.Reads)
				}
			}
		}
	}
}

// c0 is a CLI without sandboxes, for commands that need none.
func c0(t *testing.T) *cli { return newCLI(t) }

// versionOf returns what "BIN version" prints.
func versionOf(t *testing.T, bin string) string {
	out, _, code := c0(t).runBinary(bin, "version")
	if code != 0 {
		t.Fatalf("%s version: %d", bin, code)
	}
	return strings.TrimSpace(out)
}

// kho dump shows the root a sentry received in each format: the blob, dtc's
// decoding and JSON, all naming the format the restart wrote.
func TestKHODumpShowsTheFormatInEveryOutput(t *testing.T) {
	c := newCLI(t)
	const id = "khodump"
	c.must(append([]string{"run", "--detach", "--memory=64M", id, "--"}, guestArgs("1M", 3, true)...)...)
	c.waitEvent(id, "preserved", 0, 30*time.Second)
	c.restart(id)
	c.waitEvent(id, "preserved", 1, 30*time.Second)
	var root struct {
		Name       string         `json:"name"`
		Properties map[string]any `json:"properties"`
		Children   []struct {
			Name string `json:"name"`
		} `json:"children"`
	}
	if err := json.Unmarshal([]byte(c.must("kho", "dump", "--in", "--format=json", id)), &root); err != nil {
		t.Fatal(err)
	}
	if root.Properties["compatible"] != "kho-v2" || len(root.Children) == 0 || root.Children[0].Name != "LUO" {
		t.Fatalf("kho dump --format=json: %+v", root)
	}
	blob := c.must("kho", "dump", "--in", id)
	if !strings.HasPrefix(blob, "\xd0\x0d\xfe\xed") {
		t.Fatalf("kho dump (dtb) does not start with the FDT magic: %q", blob[:min(len(blob), 8)])
	}
	if _, err := exec.LookPath("dtc"); err != nil {
		t.Logf("dtc not installed: --format dts not checked")
	} else if dts := c.must("kho", "dump", "--in", "--format=dts", id); !strings.Contains(dts, `compatible = "kho-v2"`) {
		t.Fatalf("kho dump --format=dts:\n%s", dts)
	}
	if _, errOut, code := c.run("kho", "dump", "--format=yaml", id); code == 0 || !strings.Contains(errOut, "must be dtb, dts or json") {
		t.Fatalf("--format=yaml: %d %s", code, errOut)
	}
	c.must("kill", id)
}
