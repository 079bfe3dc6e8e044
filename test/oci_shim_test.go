package test

import (
	"os"
	"path/filepath"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// An unmodified, dynamically linked C program runs under the libc shim
// inside a container: the shim and the guest socket are bound into the
// container (under /dev/.livesentry), and the shim's whole test program
// passes there. The root filesystem is the host's /usr, bound read-only,
// with the usual merged-/usr links, and the program in /prog.
func TestOCIShimWorksInsideTheRootfs(t *testing.T) {
	prog := compileC(t, "shimtests/shim.c", "-lpthread")
	c := newCLI(t)
	bundle := t.TempDir()
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{"usr", "prog", "tmp"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if err := os.Symlink("usr/"+l, filepath.Join(rootfs, l)); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(prog)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "prog", "shim"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	c.must("spec", "--bundle", bundle, "--", "/prog/shim")
	editSpec(t, bundle, func(s *specs.Spec) {
		s.Mounts = append(s.Mounts,
			specs.Mount{Destination: "/usr", Type: "bind", Source: "/usr", Options: []string{"rbind", "ro"}},
			specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs"})
	})
	out, errOut, code := c.run("run", "--memory=128M", "--bundle", bundle, "shim-oci")
	if code != 0 {
		t.Errorf("exit %d; stderr: %s\noutput:\n%s", code, errOut, out)
	}
	checkTAP(t, out)
}
