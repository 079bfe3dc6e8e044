package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// gvisorUsable says why real gVisor cannot be measured here ("" if it
// can).
func gvisorUsable(c Config) string {
	if c.Runsc == "" {
		return "no runsc binary (build it with -build-runsc)"
	}
	if _, err := os.Stat(c.Runsc); err != nil {
		return fmt.Sprintf("no runsc binary at %s (build it with -build-runsc)", c.Runsc)
	}
	if os.Geteuid() != 0 {
		return "runsc restore needs root here (it refuses --rootless)"
	}
	if c.Holder == "" {
		return "no holder program"
	}
	return ""
}

// line is one line of the holder's output and when it was read.
type line struct {
	text string
	at   time.Time
}

// readLines sends every line of r, timestamped, to the returned channel,
// which is closed at EOF.
func readLines(r io.Reader) <-chan line {
	ch := make(chan line, 1<<16)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			ch <- line{text: strings.Trim(sc.Text(), "\x00 "), at: time.Now()}
		}
	}()
	return ch
}

// waitLine waits for a line starting with prefix; the channel closing or
// the timeout is an error.
func waitLine(ch <-chan line, prefix string, timeout time.Duration) (line, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case l, ok := <-ch:
			if !ok {
				return line{}, fmt.Errorf("the holder's output ended before %q", prefix)
			}
			if strings.HasPrefix(l.text, prefix) {
				return l, nil
			}
		case <-t.C:
			return line{}, fmt.Errorf("no %q line from the holder within %v", prefix, timeout)
		}
	}
}

// runsc runs gVisor's runsc with the benchmark's global flags.
type runsc struct {
	bin, root string
}

func (r *runsc) cmd(args ...string) *exec.Cmd {
	return exec.Command(r.bin, append([]string{"--root=" + r.root, "--platform=systrap", "--network=none"}, args...)...)
}

func (r *runsc) run(args ...string) error {
	var errOut bytes.Buffer
	cmd := r.cmd(args...)
	cmd.Stderr = &errOut
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("runsc %s: %v: %s", strings.Join(args, " "), err, lastLines(errOut.String(), 5))
	}
	return nil
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], " / ")
}

// measureGVisor runs the holder (r.Size bytes of random data in
// anonymous memory) in a gVisor sandbox c.Reps times; each time it
// checkpoints it (runsc checkpoint --image-path, which stops the
// sandbox), restores it (runsc restore --bundle --image-path) and has it
// verify every byte. The app pause is from the last line read from the
// holder before the checkpoint to the first line read after the restore
// (it prints one every millisecond). Variants: r.Method gvisor (defaults:
// buffered writes and reads of the image), gvisor-direct (checkpoint and
// restore --direct, O_DIRECT), gvisor-background (restore --background:
// the sandbox runs while the pages are still loading).
func measureGVisor(c Config, r *Row) error {
	dir, err := os.MkdirTemp(c.WorkDir, "gv-")
	if err != nil {
		return err
	}
	rs := &runsc{bin: c.Runsc, root: filepath.Join(dir, "root")}
	defer func() {
		// With --network=none runsc bind-mounts an empty network
		// namespace into its root and leaves it there.
		unix.Unmount(filepath.Join(rs.root, "null-netns"), unix.MNT_DETACH)
		os.RemoveAll(dir)
	}()
	bundle := filepath.Join(dir, "bundle")
	if err := os.MkdirAll(filepath.Join(bundle, "rootfs"), 0o755); err != nil {
		return err
	}
	holder, err := os.ReadFile(c.Holder)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bundle, "rootfs", "holder"), holder, 0o755); err != nil {
		return err
	}
	var ckptArgs, restoreArgs []string
	switch r.Method {
	case methodGVisorDir:
		ckptArgs, restoreArgs = []string{"--direct"}, []string{"--direct"}
	case methodGVisorBg:
		restoreArgs = []string{"--background"}
	}
	// Filling in the sandbox and the copy each way take seconds per GiB.
	timeout := time.Minute + time.Duration(r.Size>>30)*30*time.Second
	for rep := 1; rep <= c.Reps; rep++ {
		seed := rand.Uint64()
		os.Remove(filepath.Join(bundle, "config.json"))
		if err := rs.run("spec", "--bundle", bundle, "--", "/holder", fmt.Sprintf("-size=%d", r.Size), fmt.Sprintf("-seed=%d", seed)); err != nil {
			return err
		}
		id := fmt.Sprintf("lsbench-%03d", rep)
		img := filepath.Join(dir, "image")
		os.RemoveAll(img)
		pause, ckpt, verify, err := gvisorOnce(rs, bundle, img, id, ckptArgs, restoreArgs, timeout)
		// Whatever state the sandbox is in, it goes.
		rs.run("kill", id, "KILL")
		rs.run("delete", "--force", id)
		os.RemoveAll(img)
		if err != nil {
			return err
		}
		r.Pause = append(r.Pause, pause)
		c.Logf("%s %s %d: app pause %v (checkpoint command %v), restored and verified %v after the pause",
			sizeLabel(r.Size), r.Name(), rep, pause, ckpt, verify)
	}
	return nil
}

func gvisorOnce(rs *runsc, bundle, img, id string, ckptArgs, restoreArgs []string, timeout time.Duration) (pause, ckpt, verify time.Duration, err error) {
	run := rs.cmd("run", "--bundle", bundle, id)
	var runErr bytes.Buffer
	run.Stderr = &runErr
	out, err := run.StdoutPipe()
	if err != nil {
		return 0, 0, 0, err
	}
	if err := run.Start(); err != nil {
		return 0, 0, 0, err
	}
	defer run.Process.Kill()
	lines := readLines(out)
	if _, err := waitLine(lines, "filled", timeout); err != nil {
		return 0, 0, 0, fmt.Errorf("%w: %s", err, lastLines(runErr.String(), 5))
	}
	// Let it tick for a while: the pause is measured from its last tick.
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	if err := rs.run(append(append([]string{"checkpoint", "--image-path=" + img}, ckptArgs...), id)...); err != nil {
		return 0, 0, 0, err
	}
	ckpt = time.Since(start)
	var last line
	for l := range lines {
		last = l
	}
	run.Wait()
	if last.at.IsZero() || !strings.HasPrefix(last.text, "tick") {
		return 0, 0, 0, fmt.Errorf("the holder's last line before the checkpoint is %q", last.text)
	}
	restore := rs.cmd(append(append([]string{"restore", "--bundle", bundle, "--image-path", img}, restoreArgs...), id)...)
	var restoreErr bytes.Buffer
	restore.Stderr = &restoreErr
	rout, err := restore.StdoutPipe()
	if err != nil {
		return 0, 0, 0, err
	}
	if err := restore.Start(); err != nil {
		return 0, 0, 0, err
	}
	defer func() {
		restore.Process.Kill()
		restore.Wait()
	}()
	rlines := readLines(rout)
	first, err := waitLine(rlines, "", timeout)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("after restore: %w: %s", err, lastLines(restoreErr.String(), 5))
	}
	pause = first.at.Sub(last.at)
	if err := rs.run("kill", id, "USR1"); err != nil {
		return 0, 0, 0, err
	}
	v, err := waitLine(rlines, "verified", timeout)
	if err != nil {
		return 0, 0, 0, err
	}
	if !strings.HasPrefix(v.text, "verified ok") {
		return 0, 0, 0, fmt.Errorf("after restore the holder says %q", v.text)
	}
	return pause, ckpt, v.at.Sub(last.at), nil
}
