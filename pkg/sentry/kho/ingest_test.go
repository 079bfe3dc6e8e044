package kho

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"golang.org/x/sys/unix"
)

// handover is a finalized outgoing state with preserved folios of orders 0
// and 3. In kho-v1 its map has an order-0 chunk followed by an order-3
// chunk; in kho-v2 its tree has two paths from the root, one per order.
type handover struct {
	format   string
	mf       *pgalloc.MemoryFile
	k        *KHO
	root     uint64
	small    pgalloc.Folio // order 0
	big      pgalloc.Folio // order 3
	chunk0   uint64        // order-0 chunk
	chunk1   uint64        // order-3 chunk
	bitmap0  uint64        // order-0 bitmap
	fileSize uint64
	// kho-v2: the tree's root and the nodes on the way to each folio's
	// leaf, root first, leaf last.
	treeRoot  uint64
	smallPath []uint64
	bigPath   []uint64
}

func newHandover(t *testing.T, format string) *handover {
	t.Helper()
	h := &handover{format: format, mf: newFile(t, 64<<20), fileSize: 64 << 20}
	var err error
	if h.k, err = New(h.mf); err != nil {
		t.Fatal(err)
	}
	if h.small, err = h.k.AllocPreserve(1); err != nil {
		t.Fatal(err)
	}
	if h.big, err = h.k.AllocPreserve(8 * abikho.PageSize); err != nil {
		t.Fatal(err)
	}
	if err := h.k.FinalizeFormat(format); err != nil {
		t.Fatal(err)
	}
	h.root = h.k.RootAddr()
	if format == abikho.CompatibleV2 {
		h.treeRoot = memMapAddr(t, h.k)
		h.smallPath = treePath(t, h.mf, h.treeRoot, h.small.PFN, 0)
		h.bigPath = treePath(t, h.mf, h.treeRoot, h.big.PFN, 3)
		return h
	}
	h.chunk0 = memMapAddr(t, h.k)
	var hdr abikho.MemChunkHdr
	hdr.Decode(page(t, h.mf, h.chunk0))
	if hdr.Order != 0 || hdr.NumElms != 1 || hdr.Next == 0 {
		t.Fatalf("unexpected first chunk %+v", hdr)
	}
	h.chunk1 = hdr.Next
	var ptr abikho.MemBitmapPtr
	ptr.Decode(page(t, h.mf, h.chunk0)[abikho.MemChunkBitmapOffset(0):])
	h.bitmap0 = ptr.Bitmap
	return h
}

// rewriteRoot rebuilds the root FDT at h.root after fn changed it.
func (h *handover) rewriteRoot(t *testing.T, fn func(*fdt.Node)) {
	t.Helper()
	n, err := fdt.Parse(page(t, h.mf, h.root), abikho.PageSize)
	if err != nil {
		t.Fatal(err)
	}
	fn(n)
	blob, err := fdt.Build(n)
	if err != nil {
		t.Fatal(err)
	}
	p := page(t, h.mf, h.root)
	clear(p)
	copy(p, blob)
}

func (h *handover) chunkHdr(t *testing.T, addr uint64, fn func(*abikho.MemChunkHdr)) {
	var hdr abikho.MemChunkHdr
	p := page(t, h.mf, addr)
	hdr.Decode(p)
	fn(&hdr)
	hdr.Encode(p)
}

func (h *handover) bitmapPtr(t *testing.T, addr uint64, i int, fn func(*abikho.MemBitmapPtr)) {
	var ptr abikho.MemBitmapPtr
	p := page(t, h.mf, addr)[abikho.MemChunkBitmapOffset(i):]
	ptr.Decode(p)
	fn(&ptr)
	ptr.Encode(p)
}

func setBit(b []byte, i uint64, on bool) {
	if on {
		b[i/8] |= 1 << (i % 8)
	} else {
		b[i/8] &^= 1 << (i % 8)
	}
}

// TestIngestValidation corrupts a kho-v1 handover field by field.
// TestIngestValidationV2 does the same for kho-v2.
func TestIngestValidation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(t *testing.T, h *handover) (root uint64)
		errno   error
		msg     []string
	}{
		{
			name:    "a valid handover is accepted",
			corrupt: func(t *testing.T, h *handover) uint64 { return h.root },
		},
		{
			name:    "a corrupt FDT magic is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 { page(t, h.mf, h.root)[0] ^= 0xff; return h.root },
			errno:   unix.EINVAL, msg: []string{"magic"},
		},
		{
			name: "an FDT larger than its page is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				binary.BigEndian.PutUint32(page(t, h.mf, h.root)[4:], abikho.PageSize+1)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"totalsize"},
		},
		{
			name: "a wrong compatible is rejected, naming both strings",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetString("compatible", "kho-v9") })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{`"kho-v9"`, `"kho-v1"`},
		},
		{
			name: "a missing compatible is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.Props = n.Props[1:] })
				return h.root
			},
			errno: unix.ENOENT, msg: []string{"compatible"},
		},
		{
			name: "a missing preserved-memory-map is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.Props = n.Props[:1] })
				return h.root
			},
			errno: unix.ENOENT, msg: []string{"preserved-memory-map"},
		},
		{
			name: "a preserved-memory-map that is not 8 bytes is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU32("preserved-memory-map", uint32(h.chunk0)) })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"preserved-memory-map", "4 bytes"},
		},
		{
			name: "a zero preserved-memory-map (not finalized) is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU64("preserved-memory-map", 0) })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"preserved-memory-map is 0"},
		},
		{
			name: "an out-of-range map is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU64("preserved-memory-map", h.fileSize) })
				return h.root
			},
			errno: unix.ERANGE, msg: []string{"map chunk", "0x4000000"},
		},
		{
			name: "a misaligned chunk is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.rewriteRoot(t, func(n *fdt.Node) { n.SetU64("preserved-memory-map", h.chunk0+8) })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"map chunk", "page-aligned"},
		},
		{
			name: "a chunk order above the maximum is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.chunkHdr(t, h.chunk1, func(c *abikho.MemChunkHdr) { c.Order = pgalloc.MaxOrder + 1 })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"order 11 above 10"},
		},
		{
			name: "a cycle in the chunk list is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.chunkHdr(t, h.chunk1, func(c *abikho.MemChunkHdr) { c.Next = h.chunk0 })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"loops back"},
		},
		{
			name: "a chunk that points to itself is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.chunkHdr(t, h.chunk0, func(c *abikho.MemChunkHdr) { c.Next = h.chunk0 })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"loops back"},
		},
		{
			name: "a count over the chunk's capacity is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.chunkHdr(t, h.chunk0, func(c *abikho.MemChunkHdr) { c.NumElms = abikho.MemChunkCapacity + 1 })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"num_elms 256 above the capacity of 255"},
		},
		{
			name: "an empty chunk is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.chunkHdr(t, h.chunk0, func(c *abikho.MemChunkHdr) { c.NumElms = 0 })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"num_elms 0"},
		},
		{
			name: "a misaligned phys_start is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.bitmapPtr(t, h.chunk0, 0, func(p *abikho.MemBitmapPtr) { p.PhysStart = abikho.PageSize })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"phys_start 0x1000"},
		},
		{
			name: "a bitmap outside the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				h.bitmapPtr(t, h.chunk0, 0, func(p *abikho.MemBitmapPtr) { p.Bitmap = 1 << 40 })
				return h.root
			},
			errno: unix.ERANGE, msg: []string{"bitmap", "0x10000000000"},
		},
		{
			name: "a bitmap listed twice is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				var ptr abikho.MemBitmapPtr
				ptr.Decode(page(t, h.mf, h.chunk0)[abikho.MemChunkBitmapOffset(0):])
				h.bitmapPtr(t, h.chunk0, 1, func(p *abikho.MemBitmapPtr) { *p = ptr })
				h.chunkHdr(t, h.chunk0, func(c *abikho.MemChunkHdr) { c.NumElms = 2 })
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"listed twice"},
		},
		{
			name: "a preserved block beyond the end of the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setBit(page(t, h.mf, h.bitmap0), h.fileSize/abikho.PageSize+3, true)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"bit 16387", "beyond"},
		},
		{
			name: "a preserved pfn 0 is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setBit(page(t, h.mf, h.bitmap0), 0, true)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"pfn 0"},
		},
		{
			name: "overlapping preserved blocks are rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setBit(page(t, h.mf, h.bitmap0), h.big.PFN+1, true)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"overlaps"},
		},
		{
			name: "a root page that is not preserved is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 {
				setBit(page(t, h.mf, h.bitmap0), h.root/abikho.PageSize, false)
				return h.root
			},
			errno: unix.EINVAL, msg: []string{"root page is not preserved"},
		},
		{
			name:    "a misaligned root address is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 { return h.root + 8 },
			errno:   unix.EINVAL, msg: []string{"page-aligned"},
		},
		{
			name:    "a root outside the file is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 { return h.fileSize },
			errno:   unix.ERANGE, msg: []string{"outside"},
		},
		{
			name:    "a zero root address is rejected",
			corrupt: func(t *testing.T, h *handover) uint64 { return 0 },
			errno:   unix.EINVAL, msg: []string{"non-zero"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHandover(t, abikho.CompatibleV1)
			root := tc.corrupt(t, h)
			mf2 := reopen(t, h.mf)
			k2, err := Ingest(mf2, root)
			if tc.errno == nil {
				if err != nil {
					t.Fatalf("Ingest: %v", err)
				}
				for _, f := range []pgalloc.Folio{h.small, h.big} {
					if g, err := k2.RestoreFolio(f.Addr()); err != nil || g != f {
						t.Errorf("RestoreFolio(%v) = %v, %v", f, g, err)
					}
				}
				return
			}
			if !errors.Is(err, tc.errno) {
				t.Fatalf("Ingest = %v, want %v", err, tc.errno)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			// Nothing was adopted: the allocator has not started.
			if _, err := mf2.Allocate(0); !errors.Is(err, unix.EINVAL) {
				t.Errorf("Allocate after a failed Ingest = %v, want EINVAL (not adopted)", err)
			}
		})
	}
}

func TestRestoreValidation(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name  string
			call  func(h *handover, k *KHO) error
			errno error
		}{
			{"a double restore fails", func(h *handover, k *KHO) error {
				if _, err := k.RestoreFolio(h.big.Addr()); err != nil {
					return err
				}
				_, err := k.RestoreFolio(h.big.Addr())
				return err
			}, unix.EINVAL},
			{"a tail-page restore fails", func(h *handover, k *KHO) error {
				_, err := k.RestoreFolio(h.big.Addr() + abikho.PageSize)
				return err
			}, unix.EINVAL},
			{"an aligned tail-page restore fails", func(h *handover, k *KHO) error {
				_, err := k.RestoreFolio(h.big.Addr() + 4*abikho.PageSize)
				return err
			}, unix.EINVAL},
			{"a never-preserved address fails", func(h *handover, k *KHO) error {
				_, err := k.RestoreFolio(h.fileSize / 2)
				return err
			}, unix.EINVAL},
			{"an address beyond the file fails", func(h *handover, k *KHO) error {
				_, err := k.RestoreFolio(1 << 62)
				return err
			}, unix.EINVAL},
			{"the old root cannot be restored twice", func(h *handover, k *KHO) error {
				_, err := k.RestoreFolio(h.root)
				return err
			}, unix.EINVAL},
			{"restoring pages with another split fails and restores nothing", func(h *handover, k *KHO) error {
				if _, err := k.RestorePages(h.big.Addr(), 4); err == nil {
					return errors.New("RestorePages(4 of an order-3 block) succeeded")
				}
				if _, err := k.RestorePages(h.small.Addr(), 9); err == nil {
					return errors.New("RestorePages past a preserved block succeeded")
				}
				f, err := k.RestoreFolio(h.small.Addr())
				if err != nil || f != h.small {
					return errors.New("the first block of a failed RestorePages was consumed")
				}
				return nil
			}, nil},
			{"restoring pages with the same split returns order-0 pages", func(h *handover, k *KHO) error {
				fs, err := k.RestorePages(h.big.Addr(), 8)
				if err != nil {
					return err
				}
				if len(fs) != 8 {
					return fmt.Errorf("RestorePages returned %d folios, want 8", len(fs))
				}
				for i, f := range fs {
					want := pgalloc.Folio{PFN: h.big.PFN + uint64(i)}
					if g, refs, ok := k.mf.Lookup(f.PFN); f != want || !ok || g != want || refs != 1 {
						return fmt.Errorf("page %d: %v (allocated as %v with %d references), want an order-0 folio at pfn %#x", i, f, g, refs, want.PFN)
					}
				}
				return nil
			}, nil},
			{"restoring zero pages fails", func(h *handover, k *KHO) error {
				_, err := k.RestorePages(h.big.Addr(), 0)
				return err
			}, unix.EINVAL},
			{"restore-free of address 0 is a no-op", func(h *handover, k *KHO) error {
				return k.RestoreFree(0)
			}, nil},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := newHandover(t, format)
				k, err := Ingest(reopen(t, h.mf), h.root)
				if err != nil {
					t.Fatal(err)
				}
				if err := tc.call(h, k); tc.errno == nil && err != nil || tc.errno != nil && !errors.Is(err, tc.errno) {
					t.Errorf("got %v, want %v", err, tc.errno)
				}
			})
		}
	})
}

func TestColdBootHasNothingIncoming(t *testing.T) {
	k, err := New(newFile(t, 16<<20))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.RetrieveSubtree("LUO"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("RetrieveSubtree = %v, want ENOENT", err)
	}
	if _, err := k.RestoreFolio(k.RootAddr()); !errors.Is(err, unix.EINVAL) {
		t.Errorf("RestoreFolio = %v, want EINVAL", err)
	}
	if n := k.ReleaseUnrestored(); n != 0 {
		t.Errorf("ReleaseUnrestored = %d, want 0", n)
	}
	if _, in := k.Dump(); in != nil {
		t.Errorf("Dump has an incoming root after a cold boot")
	}
	if k.Incoming() {
		t.Errorf("Incoming after a cold boot")
	}
}

func TestRetrieveSubtreeErrors(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		h := newHandover(t, format)
		h.rewriteRoot(t, func(n *fdt.Node) {
			n.AddChild("good").SetU64(subtreeProp(format), h.small.Addr())
			n.AddChild("short").SetU32(subtreeProp(format), 1)
			n.AddChild("bare")
		})
		oldRoot := bytes.Clone(page(t, h.mf, h.root))
		k, err := Ingest(reopen(t, h.mf), h.root)
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name  string
			sub   string
			errno error
		}{
			{"a node with an 8-byte fdt is found", "good", nil},
			{"a missing node is ENOENT", "none", unix.ENOENT},
			{"an fdt property of 4 bytes is EINVAL", "short", unix.EINVAL},
			{"a node without fdt is EINVAL", "bare", unix.EINVAL},
			{"an empty name is EINVAL", "", unix.EINVAL},
		} {
			t.Run(tc.name, func(t *testing.T) {
				addr, err := k.RetrieveSubtree(tc.sub)
				if tc.errno == nil {
					if err != nil || addr != h.small.Addr() {
						t.Errorf("got %#x, %v", addr, err)
					}
					return
				}
				if !errors.Is(err, tc.errno) {
					t.Errorf("got %v, want %v", err, tc.errno)
				}
			})
		}
		// The incoming root is what the previous sentry wrote.
		_, in := k.Dump()
		if len(in) == 0 || !bytes.Equal(in, oldRoot[:len(in)]) {
			t.Error("Dump's incoming root differs from the root page")
		}
	})
}
