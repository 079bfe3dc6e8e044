package kho

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// TestRestartInOneProcess runs a whole handover between two pgalloc+KHO
// instances over the same memfd: random folios of random orders, a 3 MiB
// vmalloc array and two subtrees cross; every folio restores exactly once
// with its order and contents; whatever was not preserved reads zero.
func TestRestartInOneProcess(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		const size = 512 << 20
		rng := rand.New(rand.NewPCG(1, 2))
		mf := newFile(t, size)
		k, err := New(mf)
		if err != nil {
			t.Fatal(err)
		}

		// Random folios, about 3/4 of them preserved; the rest hold data too
		// and must not survive.
		var kept, dropped []pgalloc.Folio
		for i := 0; i < 400; i++ {
			f, err := mf.Allocate(rng.IntN(pgalloc.MaxOrder + 1))
			if err != nil {
				t.Fatal(err)
			}
			fill(mf.Bytes(f), f.PFN)
			if rng.IntN(4) == 0 {
				dropped = append(dropped, f)
				continue
			}
			if err := k.PreserveFolio(f); err != nil {
				t.Fatalf("PreserveFolio(%v): %v", f, err)
			}
			kept = append(kept, f)
		}
		// One preserved and then unpreserved folio must not survive either.
		f := kept[len(kept)-1]
		kept = kept[:len(kept)-1]
		if err := k.UnpreserveFolio(f); err != nil {
			t.Fatal(err)
		}
		dropped = append(dropped, f)

		// A 3 MiB vmalloc array of random bytes (768 pages: two chunk pages).
		v, err := AllocVmalloc(mf, 3<<20)
		if err != nil {
			t.Fatal(err)
		}
		data := make([]byte, 3<<20)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		if n, err := v.WriteAt(data, 0); n != len(data) || err != nil {
			t.Fatalf("WriteAt = %d, %v", n, err)
		}
		desc, err := k.PreserveVmalloc(v)
		if err != nil {
			t.Fatal(err)
		}

		// Two subtrees: one carries the vmalloc descriptor, one a string.
		blobA := subtreeBlob(t, k, func(n *fdt.Node) {
			b := make([]byte, abikho.VmallocSize)
			desc.Encode(b)
			n.SetProp("array", b)
		})
		blobB := subtreeBlob(t, k, func(n *fdt.Node) { n.SetString("greeting", "hello kexec world") })
		if err := k.AddSubtree("test-a", blobA.Addr()); err != nil {
			t.Fatal(err)
		}
		if err := k.AddSubtree("test-b", blobB.Addr()); err != nil {
			t.Fatal(err)
		}

		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		root := k.RootAddr()

		// The next sentry.
		mf2 := reopen(t, mf)
		k2, err := Ingest(mf2, root)
		if err != nil {
			t.Fatalf("Ingest: %v", err)
		}
		if k2.RootAddr() == 0 {
			t.Fatal("Ingest set up no outgoing root")
		}

		// Subtrees.
		addrA, err := k2.RetrieveSubtree("test-a")
		if err != nil || addrA != blobA.Addr() {
			t.Fatalf("RetrieveSubtree(test-a) = %#x, %v; want %#x", addrA, err, blobA.Addr())
		}
		addrB, err := k2.RetrieveSubtree("test-b")
		if err != nil || addrB != blobB.Addr() {
			t.Fatalf("RetrieveSubtree(test-b) = %#x, %v; want %#x", addrB, err, blobB.Addr())
		}
		if _, err := k2.RetrieveSubtree("test-c"); !errors.Is(err, unix.ENOENT) {
			t.Errorf("RetrieveSubtree(test-c) = %v, want ENOENT", err)
		}
		treeA := readSubtree(t, k2, mf2, addrA)
		treeB := readSubtree(t, k2, mf2, addrB)
		if s, err := treeB.String("greeting"); err != nil || s != "hello kexec world" {
			t.Errorf("test-b greeting = %q, %v", s, err)
		}
		raw, _ := treeA.Prop("array")
		var desc2 abikho.Vmalloc
		if err := desc2.Decode(raw); err != nil || desc2 != desc {
			t.Fatalf("test-a array = %+v, %v; want %+v", desc2, err, desc)
		}

		// The vmalloc array.
		v2, err := k2.RestoreVmalloc(desc2)
		if err != nil {
			t.Fatalf("RestoreVmalloc: %v", err)
		}
		got := make([]byte, v2.Len())
		if n, err := v2.ReadAt(got, 0); n != len(got) || err != nil {
			t.Fatalf("ReadAt = %d, %v", n, err)
		}
		if !bytes.Equal(got, data) {
			t.Error("the vmalloc array changed across the restart")
		}
		if _, err := k2.RestoreVmalloc(desc2); err == nil {
			t.Error("a second RestoreVmalloc succeeded")
		}

		// Every folio, in random order, exactly once.
		rng.Shuffle(len(kept), func(i, j int) { kept[i], kept[j] = kept[j], kept[i] })
		leftOut := kept[0]
		for _, f := range kept[1:] {
			addr := f.Addr()
			if f.Order > 0 {
				addr += uint64(rng.IntN(abikho.PageSize)) // an offset inside the head page is accepted
			}
			g, err := k2.RestoreFolio(addr)
			if err != nil || g != f {
				t.Fatalf("RestoreFolio(%#x) = %v, %v; want %v", addr, g, err, f)
			}
			if !filled(mf2.Bytes(g), f.PFN) {
				t.Fatalf("%v changed across the restart", f)
			}
			if _, err := k2.RestoreFolio(f.Addr()); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("second RestoreFolio(%v) = %v, want EINVAL", f, err)
			}
			mf2.DecRef(g)
		}
		for _, f := range dropped {
			if _, err := k2.RestoreFolio(f.Addr()); !errors.Is(err, unix.EINVAL) {
				t.Errorf("RestoreFolio of unpreserved %v = %v, want EINVAL", f, err)
			}
		}

		// The blobs are metadata: restore and free them. One folio was never
		// restored: releasing frees exactly it.
		for _, a := range []uint64{addrA, addrB} {
			if err := k2.RestoreFree(a); err != nil {
				t.Fatal(err)
			}
		}
		if n := k2.ReleaseUnrestored(); n != leftOut.Pages() {
			t.Errorf("ReleaseUnrestored = %d pages, want %d", n, leftOut.Pages())
		}
		if _, err := k2.RestoreFolio(leftOut.Addr()); !errors.Is(err, unix.EINVAL) {
			t.Errorf("RestoreFolio after ReleaseUnrestored = %v, want EINVAL", err)
		}
		v2.Free()

		// Now only the new root is allocated, and everything else reads zero.
		mf2.Drain()
		st := mf2.Stats()
		if st.AllocatedPages != 1 {
			t.Errorf("%d pages allocated after everything was restored and freed, want 1 (the new root): %+v", st.AllocatedPages, st)
		}
		newRoot := k2.RootAddr() >> abikho.PageShift
		for _, f := range append(dropped, kept...) {
			if newRoot >= f.PFN && newRoot < f.PFN+f.Pages() {
				continue // reused for the new root
			}
			b, _ := mf2.Slice(f.PFN, f.Pages())
			if !isZero(b) {
				t.Errorf("%v does not read zero after being freed or dropped", f)
			}
		}
		if st.FreePages != mf2.Pages()-2 {
			t.Errorf("free pages = %d, want %d", st.FreePages, mf2.Pages()-2)
		}
	})
}

// subtreeBlob returns a preserved page holding an FDT built by fn.
func subtreeBlob(t *testing.T, k *KHO, fn func(*fdt.Node)) pgalloc.Folio {
	t.Helper()
	n := &fdt.Node{}
	n.SetString("compatible", "test-v1")
	fn(n)
	blob, err := fdt.Build(n)
	if err != nil {
		t.Fatal(err)
	}
	f, err := k.AllocPreserve(uint64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	copy(k.mf.Bytes(f), blob)
	return f
}

// readSubtree parses the subtree blob at addr.
func readSubtree(t *testing.T, k *KHO, mf *pgalloc.MemoryFile, addr uint64) *fdt.Node {
	t.Helper()
	n, err := fdt.Parse(page(t, mf, addr), abikho.PageSize)
	if err != nil {
		t.Fatalf("subtree at %#x: %v", addr, err)
	}
	return n
}

// TestTwoRestarts hands a folio over twice: the second sentry re-preserves
// what it restored, and its own root (the first root page, reused) is
// what the third sentry reads.
func TestTwoRestarts(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		mf1 := newFile(t, 64<<20)
		k1, err := New(mf1)
		if err != nil {
			t.Fatal(err)
		}
		f, err := k1.AllocPreserve(4 * abikho.PageSize)
		if err != nil {
			t.Fatal(err)
		}
		fill(mf1.Bytes(f), 42)
		if err := k1.AddSubtree("first", f.Addr()); err != nil {
			t.Fatal(err)
		}
		if err := k1.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}

		mf2 := reopen(t, mf1)
		k2, err := Ingest(mf2, k1.RootAddr())
		if err != nil {
			t.Fatal(err)
		}
		// The handover is accepted: the second sentry may allocate (and so
		// scrub) what the first did not preserve.
		mf2.ResumeReleases()
		if k2.RootAddr() != k1.RootAddr() {
			t.Errorf("the second root is at %#x, want the first root's page %#x", k2.RootAddr(), k1.RootAddr())
		}
		if n := rootTree(t, k2); len(n.Children) != 0 {
			t.Errorf("the second sentry's outgoing root has %d subtrees, want none", len(n.Children))
		}
		g, err := k2.RestoreFolio(f.Addr())
		if err != nil || g != f {
			t.Fatalf("RestoreFolio = %v, %v", g, err)
		}
		if err := k2.PreserveFolio(g); err != nil {
			t.Fatal(err)
		}
		if err := k2.AddSubtree("second", g.Addr()); err != nil {
			t.Fatal(err)
		}
		if err := k2.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}

		mf3 := reopen(t, mf2)
		k3, err := Ingest(mf3, k2.RootAddr())
		if err != nil {
			t.Fatal(err)
		}
		if a, err := k3.RetrieveSubtree("second"); err != nil || a != f.Addr() {
			t.Errorf("RetrieveSubtree(second) = %#x, %v", a, err)
		}
		if _, err := k3.RetrieveSubtree("first"); !errors.Is(err, unix.ENOENT) {
			t.Errorf("RetrieveSubtree(first) = %v, want ENOENT (it belonged to the first handover)", err)
		}
		h, err := k3.RestoreFolio(f.Addr())
		if err != nil || h != f || !filled(mf3.Bytes(h), 42) {
			t.Fatalf("after two restarts RestoreFolio = %v, %v (contents kept: %v)", h, err, err == nil && filled(mf3.Bytes(h), 42))
		}
	})
}

// TestIngestScrubsNothing checks that Ingest leaves every page the previous
// sentry did not preserve as it was (stale, not scrubbed), so that with
// releases held the previous sentry can still roll back.
func TestIngestScrubsNothing(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		mf := newFile(t, 64<<20)
		k, err := New(mf)
		if err != nil {
			t.Fatal(err)
		}
		kept, err := k.AllocPreserve(8 * abikho.PageSize)
		if err != nil {
			t.Fatal(err)
		}
		dropped, err := mf.Allocate(0)
		if err != nil {
			t.Fatal(err)
		}
		fill(mf.Bytes(dropped), 9)
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		mf2 := reopen(t, mf)
		mf2.HoldReleases()
		if _, err := Ingest(mf2, k.RootAddr()); err != nil {
			t.Fatal(err)
		}
		st := mf2.Stats()
		// A carried kho-v2 tree's pages are adopted too.
		k2nodes := uint64(0)
		if format == abikho.CompatibleV2 {
			k2nodes = treeNodes(k)
		}
		if want := mf2.Pages() - 1 - 1 - kept.Pages() - k2nodes; st.StalePages != want || st.FreePages != 0 {
			t.Errorf("after Ingest: %d stale and %d free pages, want %d stale and none free", st.StalePages, st.FreePages, want)
		}
		if !filled(mf2.Bytes(dropped), 9) {
			t.Error("Ingest scrubbed a page the previous sentry did not preserve")
		}
		mf2.ResumeReleases()
	})
}
