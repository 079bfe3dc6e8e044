package guestinit

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseOptions(t *testing.T) {
	for _, tc := range []struct {
		name        string
		opts        []string
		flags, prop uintptr
		data        string
	}{
		{name: "flags and data are split", opts: []string{"nosuid", "noexec", "mode=755", "size=64k"},
			flags: unix.MS_NOSUID | unix.MS_NOEXEC, data: "mode=755,size=64k"},
		{name: "a later option clears an earlier one", opts: []string{"ro", "rw"}},
		{name: "rbind is a recursive bind", opts: []string{"rbind", "ro"}, flags: unix.MS_BIND | unix.MS_REC | unix.MS_RDONLY},
		{name: "propagation goes apart", opts: []string{"rprivate", "nodev"}, flags: unix.MS_NODEV, prop: unix.MS_PRIVATE | unix.MS_REC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			flags, prop, data := parseOptions(tc.opts)
			if flags != tc.flags || prop != tc.prop || data != tc.data {
				t.Errorf("parseOptions(%q) = %#x, %#x, %q; want %#x, %#x, %q", tc.opts, flags, prop, data, tc.flags, tc.prop, tc.data)
			}
		})
	}
}

func TestInRoot(t *testing.T) {
	for _, tc := range []struct {
		name, dest, want string
	}{
		{name: "a destination lands below the root", dest: "/proc", want: "/r/proc"},
		{name: "dot-dots cannot climb out of the root", dest: "/../../etc", want: "/r/etc"},
		{name: "a relative destination is taken from the root", dest: "dev/shm", want: "/r/dev/shm"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := inRoot("/r", tc.dest)
			if err != nil || got != tc.want {
				t.Errorf("inRoot(%q) = %q, %v; want %q", tc.dest, got, err, tc.want)
			}
		})
	}
}

func TestInRootResolvesLinksInsideTheRoot(t *testing.T) {
	root := t.TempDir()
	for _, l := range []struct{ name, target string }{
		{"abs", "/etc"}, {"up", "../../../../host"}, {"rel", "usr/lib"}, {"loop", "loop"},
	} {
		if err := os.Symlink(l.target, filepath.Join(root, l.name)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name, dest, want string
		wantErr          bool
	}{
		{name: "an absolute link is taken from the root", dest: "/abs/passwd", want: "/etc/passwd"},
		{name: "a link climbing out stops at the root", dest: "/up/x", want: "/host/x"},
		{name: "a relative link is followed inside the root", dest: "/rel/x", want: "/usr/lib/x"},
		{name: "a link loop is an error", dest: "/loop/x", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := inRoot(root, tc.dest)
			if tc.wantErr {
				if err == nil {
					t.Errorf("inRoot(%q) = %q, want an error", tc.dest, got)
				}
				return
			}
			if err != nil || got != filepath.Join(root, tc.want) {
				t.Errorf("inRoot(%q) = %q, %v; want %q", tc.dest, got, err, filepath.Join(root, tc.want))
			}
		})
	}
}

func TestLookPath(t *testing.T) {
	if _, err := lookPath("nosuchprogram", []string{"PATH=/usr/bin:/bin"}); err == nil {
		t.Error("lookPath found a missing program")
	}
	if got, err := lookPath("/x/y", nil); err != nil || got != "/x/y" {
		t.Errorf("lookPath of a path = %q, %v", got, err)
	}
	if got, err := lookPath("sh", []string{"PATH=/nonexistent:/bin"}); err != nil || got != "/bin/sh" {
		t.Errorf("lookPath(sh) = %q, %v", got, err)
	}
}
