package pgalloc

import "testing"

func poolLen() int {
	chunkPool.mu.Lock()
	defer chunkPool.mu.Unlock()
	return len(chunkPool.free)
}

// TestPreparedMetadataChunksServeTheFillAndAreCounted adopts order-0
// blocks in three chunks of a file (and a 2 MiB block, which needs no
// chunk) after PrepareMetadata: the chunks the fill needs come from the
// pool, MetadataChunks counts them, and ReleaseMetadataPool drops the rest.
func TestPreparedMetadataChunksServeTheFillAndAreCounted(t *testing.T) {
	defer ReleaseMetadataPool()
	base := newTestFile(t, 64<<20)
	blocks := []Block{{PFN: 1}, {PFN: 2}, {PFN: 512 + 7}, {PFN: 2048, Order: 9}, {PFN: 6*512 + 3}}
	g := openUnadopted(t, base)
	PrepareMetadata(5)
	if n := poolLen(); n != 5 {
		t.Fatalf("PrepareMetadata(5) left %d chunks in the pool", n)
	}
	if err := g.AdoptBitmaps(toBitmaps(g.Pages(), blocks)); err != nil {
		t.Fatal(err)
	}
	g.FillMetadata()
	if n := poolLen(); n != 2 {
		t.Fatalf("after the fill of three chunks of 4 KiB folios the pool has %d chunks, want 2", n)
	}
	if n := g.MetadataChunks(); n != 3 {
		t.Fatalf("MetadataChunks = %d, want 3 (the 2 MiB block needs none)", n)
	}
	for _, b := range blocks {
		if fo, refs, ok := g.Lookup(b.PFN); !ok || fo.Order != b.Order || refs != 1 {
			t.Fatalf("Lookup(%#x) = %v, %d, %v; want the adopted block with one reference", b.PFN, fo, refs, ok)
		}
	}
	ReleaseMetadataPool()
	if n := poolLen(); n != 0 {
		t.Fatalf("ReleaseMetadataPool left %d chunks", n)
	}
	// Without a pool, chunks come from the heap as before.
	g.ResumeReleases()
	fo, err := g.Allocate(0)
	if err != nil {
		t.Fatal(err)
	}
	if _, refs, ok := g.Lookup(fo.PFN); !ok || refs != 1 {
		t.Fatalf("a folio allocated with no pool left: %d references, allocated %t", refs, ok)
	}
}
