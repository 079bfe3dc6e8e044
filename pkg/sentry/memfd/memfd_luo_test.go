package memfd

import (
	"errors"
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"golang.org/x/sys/unix"
)

// memfd-v2 refuses at preserve a seal outside MEMFD_LUO_ALL_SEALS with
// EOPNOTSUPP and leaves the file unfrozen; memfd-v1, which carries no
// seals, preserves the same file. No F_ADD_SEALS can set such a seal, so
// the test sets it in the inode.
func TestPreserveRefusesSealsMemfdV2CannotCarry(t *testing.T) {
	mf, err := pgalloc.New(pgalloc.Options{Size: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer mf.Close()
	k, err := kho.New(mf)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Create(mf, "future-seal", unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer f.DecRef()
	if _, err := f.Pwrite([]byte("data"), 0); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.seals |= 0x40
	f.mu.Unlock()

	hs := NewLUOHandlers(mf, k)
	v2, v1 := hs[0], hs[1]
	args := &luo.FileOpArgs{Handler: v2, File: f}
	if err := v2.Ops.Preserve(args); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Fatalf("memfd-v2 preserve of seals 0x40 = %v, want EOPNOTSUPP", err)
	}
	if f.Frozen() || args.SerializedData != 0 {
		t.Fatalf("after the refused preserve: frozen %v, serialized data %#x", f.Frozen(), args.SerializedData)
	}
	args = &luo.FileOpArgs{Handler: v1, File: f}
	if err := v1.Ops.Preserve(args); err != nil {
		t.Fatalf("memfd-v1 preserve of the same file: %v", err)
	}
	v1.Ops.Unpreserve(args)
	if f.Frozen() {
		t.Fatal("frozen after unpreserve")
	}
}
