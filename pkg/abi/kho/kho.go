// Package kho holds the byte layouts of Linux's Kexec HandOver ABI
// (include/linux/kho/abi/kexec_handover.h) as they sit in the memory file, in
// both versions this project reads and writes:
//
//   - "kho-v1" (v6.19, torvalds/linux c17ee635): the root FDT, the
//     preserved-memory map serialized at finalize as a chain of
//     khoser_mem_chunk pages pointing at per-order bitmaps (mem.go), and
//     the vmalloc descriptor kho_vmalloc with its chunk pages (vmalloc.go).
//   - "kho-v2" (torvalds/linux 3f2ad900): the same root FDT with subtree
//     nodes carrying preserved-data instead of fdt, preserved-memory-map
//     pointing at the root of a radix tree of one-page nodes kept current
//     at every preserve (radix.go), and the same kho_vmalloc.
//
// All integers are little-endian (the native order of the machines Linux KHO
// runs on); a "physical address" is a byte offset in the memory file, and 0
// means NULL. The package only encodes and decodes; it checks sizes, not
// meaning: validation of decoded values is the reader's job
// (pkg/sentry/kho).
package kho

import (
	"fmt"

	"golang.org/x/sys/unix"
)

const (
	// CompatibleV1 is the v6.19 root FDT's compatible string
	// (KHO_FDT_COMPATIBLE in torvalds/linux c17ee635).
	CompatibleV1 = "kho-v1"
	// CompatibleV2 is the radix-tree root FDT's compatible string
	// (KHO_FDT_COMPATIBLE in torvalds/linux 3f2ad900).
	CompatibleV2 = "kho-v2"
	// Compatible is the format written by a handover that does not name
	// one (pkg/sentry/kho's Finalize). Any layout change in this package
	// adds a new compatible string.
	Compatible = CompatibleV1
	// PropPreservedMemoryMap is the root property holding the physical
	// address of the preserved-memory map: in kho-v1 the first
	// khoser_mem_chunk (PROP_PRESERVED_MEMORY_MAP), in kho-v2 the root
	// kho_radix_node (KHO_FDT_MEMORY_MAP_PROP_NAME). Same name in both.
	PropPreservedMemoryMap = "preserved-memory-map"
	// PropSubFDT is the kho-v1 property of a subtree node holding the
	// physical address of the subsystem's own blob (PROP_SUB_FDT).
	PropSubFDT = "fdt"
	// PropPreservedData is the kho-v2 property of a subtree node holding
	// the physical address of the subsystem's own blob
	// (KHO_FDT_SUB_TREE_PROP_NAME).
	PropPreservedData = "preserved-data"
	// PropCompatible is the standard compatible property.
	PropCompatible = "compatible"

	// PageShift is log2(PageSize).
	PageShift = 12
	// PageSize is the size of every page this ABI describes: the root FDT
	// page, map chunks, bitmaps and vmalloc chunks are one page each.
	PageSize = 1 << PageShift
	// MaxPageOrder is the largest order of a preserved block
	// (MAX_PAGE_ORDER on x86-64).
	MaxPageOrder = 10
)

func short(what string, have, want int) error {
	return fmt.Errorf("%s: %d bytes, want %d: %w", what, have, want, unix.EINVAL)
}
