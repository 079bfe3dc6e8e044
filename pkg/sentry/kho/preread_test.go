package kho

import (
	"errors"
	"testing"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// prereadState preserves blocks of several orders and bitmap indexes in a
// fresh 1 GiB file and returns the KHO and the order-0 pfns preserved.
func prereadState(t *testing.T) (*KHO, *pgalloc.MemoryFile, []uint64) {
	t.Helper()
	k, mf := newKHO(t, 1<<30)
	pfns := []uint64{40000, 80001, 200000, 250000}
	for _, pfn := range pfns {
		if err := k.PreservePages(pfn, 1); err != nil {
			t.Fatalf("PreservePages(%d): %v", pfn, err)
		}
	}
	if err := k.PreservePages(4096, 512); err != nil {
		t.Fatal(err)
	}
	return k, mf, pfns
}

// checkRestores checks that k restores each of pfns as an order-0 folio
// and refuses its neighbour, which was never preserved.
func checkRestores(t *testing.T, k *KHO, pfns []uint64) {
	t.Helper()
	for _, pfn := range pfns {
		if f, err := k.RestoreFolio(pfn << abikho.PageShift); err != nil || f != (pgalloc.Folio{PFN: pfn}) {
			t.Errorf("RestoreFolio(pfn %#x) = %v, %v; want the preserved order-0 folio", pfn, f, err)
		}
		if _, err := k.RestoreFolio((pfn + 2) << abikho.PageShift); !errors.Is(err, unix.EINVAL) {
			t.Errorf("RestoreFolio(pfn %#x), never preserved: %v, want EINVAL", pfn+2, err)
		}
	}
}

// finalizeAndIngestPrepared finalizes k1 in kho-v2 and ingests its
// handover in mf2 with IngestPrepared(p); it returns the result, the read
// calls the ingest made and whether it adopted p's reading.
func finalizeAndIngestPrepared(t *testing.T, k1 *KHO, mf2 *pgalloc.MemoryFile, p *Prepared) (*KHO, int, bool) {
	t.Helper()
	if err := k1.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	calls := readCalls(t)
	k2, used, err := IngestPrepared(mf2, k1.RootAddr(), p)
	if err != nil {
		t.Fatal(err)
	}
	return k2, calls(), used
}

// A tree read ahead (Preread) and not changed since is adopted by
// IngestPrepared after one read, the root page's, and gives what Ingest
// gives.
func TestIngestPreparedReadsOnlyTheRootPage(t *testing.T) {
	k1, mf1, pfns := prereadState(t)
	mf2 := reopen(t, mf1)
	p, err := Preread(mf2, k1.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	k2, n, used := finalizeAndIngestPrepared(t, k1, mf2, p)
	if n != 1 || !used {
		t.Errorf("IngestPrepared made %d reads, adopted what was read ahead %v; want 1 read (the root page) and true", n, used)
	}
	if !k2.Carried() {
		t.Errorf("the tree read ahead was not carried over as the outgoing one")
	}
	checkRestores(t, k2, pfns)
	if _, err := k2.RestorePages(4096<<abikho.PageShift, 512); err != nil {
		t.Errorf("RestorePages of the order-9 block: %v", err)
	}
}

// If the root page changed after the preread (here a subtree named in it),
// IngestPrepared reads the whole handover again, and the result is the
// handover as it is now.
func TestIngestPreparedRereadsAChangedRoot(t *testing.T) {
	k1, mf1, pfns := prereadState(t)
	mf2 := reopen(t, mf1)
	p, err := Preread(mf2, k1.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	blob, err := k1.AllocPreserve(abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := k1.AddSubtree("late", blob.Addr()); err != nil {
		t.Fatal(err)
	}
	k2, n, used := finalizeAndIngestPrepared(t, k1, mf2, p)
	if n < 3 || used {
		t.Errorf("IngestPrepared of a changed root made %d reads, adopted what was read ahead %v; want the root, the tree and the root again, and false", n, used)
	}
	if addr, err := k2.RetrieveSubtree("late"); err != nil || addr != blob.Addr() {
		t.Errorf("RetrieveSubtree(late) = %#x, %v; want %#x, named after the preread", addr, err, blob.Addr())
	}
	checkRestores(t, k2, append(pfns, blob.PFN))
}

// IngestPrepared of a Prepared read from another file or root, or used
// already, is Ingest.
func TestIngestPreparedOfAnotherHandoverIsIngest(t *testing.T) {
	k1, mf1, pfns := prereadState(t)
	if err := k1.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	mf2, other := reopen(t, mf1), reopen(t, mf1)
	p, err := Preread(other, k1.RootAddr())
	if err != nil {
		t.Fatal(err)
	}
	calls := readCalls(t)
	k2, used, err := IngestPrepared(mf2, k1.RootAddr(), p)
	if err != nil || used {
		t.Fatalf("IngestPrepared with another file's Prepared: used %v, %v", used, err)
	}
	if n := calls(); n < 2 {
		t.Errorf("IngestPrepared with another file's Prepared made %d reads, want a whole Ingest", n)
	}
	checkRestores(t, k2, pfns)
	// That used p up: with its own file now, it is Ingest too.
	calls()
	k3, used, err := IngestPrepared(other, k1.RootAddr(), p)
	if err != nil || used {
		t.Fatalf("IngestPrepared with a used Prepared: used %v, %v", used, err)
	}
	if n := calls(); n < 2 {
		t.Errorf("IngestPrepared with a used Prepared made %d reads, want a whole Ingest", n)
	}
	checkRestores(t, k3, pfns)
}

// Preread checks what Ingest checks, and refuses a kho-v1 root, whose map
// is written at the finalize.
func TestPrereadRefusesWhatIngestRefuses(t *testing.T) {
	h := newHandover(t, abikho.CompatibleV2)
	abikho.SetRadixNodeEntry(page(t, h.mf, h.smallPath[len(h.smallPath)-2]), 0, 0x3) // misaligned
	mf2 := reopen(t, h.mf)
	if _, err := Preread(mf2, h.root); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Preread of a tree with a misaligned entry: %v, want EINVAL", err)
	}
	h1 := newHandover(t, abikho.CompatibleV1)
	if _, err := Preread(reopen(t, h1.mf), h1.root); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Preread of a kho-v1 root: %v, want EINVAL", err)
	}
}

// TreeGeneration changes with every change of the tree (preserve,
// unpreserve, a restored block freed from a carried tree) and with
// nothing else (reads, finalizing in kho-v2, naming a subtree).
func TestTreeGenerationChangesWithTheTree(t *testing.T) {
	k, _ := newKHO(t, 64<<20)
	gen := k.TreeGeneration()
	same := func(what string) {
		t.Helper()
		if g := k.TreeGeneration(); g != gen {
			t.Errorf("%s changed the tree generation %d to %d", what, gen, g)
		}
	}
	changed := func(what string) {
		t.Helper()
		g := k.TreeGeneration()
		if g == gen {
			t.Errorf("%s left the tree generation at %d", what, g)
		}
		gen = g
	}
	f, err := k.AllocPreserve(8 * abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	changed("AllocPreserve")
	if err := k.PreservePages(100, 3); err != nil {
		t.Fatal(err)
	}
	changed("PreservePages into an existing leaf")
	if err := k.PreservePages(1<<13, 1); err != nil {
		t.Fatal(err)
	}
	changed("PreservePages")
	k.TreePages()
	k.ReadAhead()
	same("reading the tree")
	if err := k.UnpreservePages(100, 3); err != nil {
		t.Fatal(err)
	}
	changed("UnpreservePages")
	if err := k.UnpreservePages(100, 1); err == nil {
		t.Fatal("unpreserving a page twice succeeded")
	}
	same("a failed unpreserve")
	if err := k.AddSubtree("s", f.Addr()); err != nil {
		t.Fatal(err)
	}
	same("AddSubtree")
	if err := k.FinalizeFormat(abikho.CompatibleV2); err != nil {
		t.Fatal(err)
	}
	same("FinalizeFormat(kho-v2)")
	if err := k.Abort(); err != nil {
		t.Fatal(err)
	}
	if err := k.UnpreserveFree(f); err != nil {
		t.Fatal(err)
	}
	changed("UnpreserveFree")
}
