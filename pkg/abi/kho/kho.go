// Package kho holds the byte layouts of Linux's Kexec HandOver ABI
// (include/linux/kho/abi/kexec_handover.h, v6.19, "kho-v1") as they sit in
// the memory file: the root FDT's compatible string and property names, the
// serialized preserved-memory map (khoser_mem_chunk) and the vmalloc
// descriptor (kho_vmalloc) with its chunk pages.
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
	// Compatible is the root FDT's compatible string (KHO_FDT_COMPATIBLE).
	// Any layout change in this package bumps it.
	Compatible = "kho-v1"
	// PropPreservedMemoryMap is the root property holding the physical
	// address of the first khoser_mem_chunk (PROP_PRESERVED_MEMORY_MAP).
	PropPreservedMemoryMap = "preserved-memory-map"
	// PropSubFDT is the property of a subtree node holding the physical
	// address of the subsystem's own blob (PROP_SUB_FDT).
	PropSubFDT = "fdt"
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
