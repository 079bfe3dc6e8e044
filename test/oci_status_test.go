package test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// luo status gives every preserved file's size and the memory it holds,
// and adds them up per session and for the sandbox; kho dump's dts and
// dtb both go through dtc.
func TestOCILUOStatusCountsBytes(t *testing.T) {
	c := newCLI(t)
	c.must("run", "--detach", "--memory=256M", "sizes", "--", runsc, "demo-guest", "--size=8M", "--files=3", "--sessions=2")
	c.waitEvent("sizes", "preserved", 0, 10*time.Second)
	var v struct {
		Sessions []struct {
			Name  string `json:"name"`
			Bytes int64  `json:"bytes"`
			Files []struct {
				Bytes          *int64 `json:"bytes"`
				AllocatedBytes *int64 `json:"allocated_bytes"`
			} `json:"files"`
		} `json:"sessions"`
		Total struct {
			Sessions int   `json:"sessions"`
			Files    int   `json:"files"`
			Bytes    int64 `json:"bytes"`
		} `json:"total"`
	}
	out := c.must("luo", "status", "sizes")
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatal(err)
	}
	if v.Total.Sessions != 2 || v.Total.Files != 3 || v.Total.Bytes != 8<<20 {
		t.Errorf("totals %+v, want 2 sessions, 3 files, %d bytes:\n%s", v.Total, 8<<20, out)
	}
	var sum int64
	for _, s := range v.Sessions {
		var own int64
		for _, f := range s.Files {
			if f.Bytes == nil || f.AllocatedBytes == nil || *f.AllocatedBytes < *f.Bytes {
				t.Errorf("session %s: file sizes %v/%v", s.Name, f.Bytes, f.AllocatedBytes)
				continue
			}
			own += *f.Bytes
		}
		if own != s.Bytes {
			t.Errorf("session %s: bytes %d, its files add up to %d", s.Name, s.Bytes, own)
		}
		sum += s.Bytes
	}
	if sum != v.Total.Bytes {
		t.Errorf("sessions add up to %d, total says %d", sum, v.Total.Bytes)
	}
	if table := c.must("luo", "status", "--format=table", "sizes"); !strings.Contains(table, "TOTAL") || !strings.Contains(table, "8388608") {
		t.Errorf("luo status --format=table:\n%s", table)
	}

	if _, err := exec.LookPath("dtc"); err != nil {
		t.Skipf("dtc is not installed (apt-get install device-tree-compiler): %v", err)
	}
	dir := t.TempDir()
	dtb := filepath.Join(dir, "root.dtb")
	c.must("kho", "dump", "--format=dtb", "-o", dtb, "sizes")
	if out, err := exec.Command("dtc", "-I", "dtb", "-O", "dts", dtb).CombinedOutput(); err != nil || !strings.Contains(string(out), "kho-v") {
		t.Errorf("dtc -I dtb: %v\n%s", err, out)
	}
	dts := filepath.Join(dir, "root.dts")
	if err := os.WriteFile(dts, []byte(c.must("kho", "dump", "--format=dts", "sizes")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("dtc", "-I", "dts", "-O", "dtb", "-o", filepath.Join(dir, "again.dtb"), dts).CombinedOutput(); err != nil {
		t.Errorf("dtc -I dts: %v\n%s", err, out)
	}
	var js any
	if err := json.Unmarshal([]byte(c.must("kho", "dump", "--format=json", "sizes")), &js); err != nil {
		t.Errorf("kho dump --format=json: %v", err)
	}
	c.must("delete", "--force", "sizes")
}
