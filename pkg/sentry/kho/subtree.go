package kho

import (
	"fmt"
	"strings"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"golang.org/x/sys/unix"
)

// subtreeProp returns the name of a subtree node's address property in the
// format named by compat: fdt in kho-v1, preserved-data in kho-v2.
func subtreeProp(compat string) string {
	if compat == abikho.CompatibleV1 {
		return abikho.PropSubFDT
	}
	return abikho.PropPreservedData
}

// writeRootLocked rewrites the outgoing root FDT page from k.out, in the
// format k.out.format. If the FDT does not fit, it fails with ENOMEM and
// leaves the page as it was. Linux
// edits the page in place with libfdt; rebuilding one page is as cheap and
// keeps the blob packed.
//
// +checklocks:k.mu
func (k *KHO) writeRootLocked() error {
	memMap := k.out.v1Map
	if k.out.format == abikho.CompatibleV2 {
		memMap = k.out.tree.root.Addr()
	}
	blob, err := buildRoot(k.out.format, memMap, k.out.subtrees)
	if err != nil {
		return err
	}
	page := k.mf.Bytes(k.out.root)
	if len(blob) > len(page) {
		return fmt.Errorf("kho: the root FDT needs %d bytes, more than its %d-byte page: %w", len(blob), len(page), unix.ENOMEM)
	}
	n := copy(page, blob)
	clear(page[n:])
	return nil
}

// buildRoot returns the root FDT blob in format, naming memMap and
// subtrees.
func buildRoot(format string, memMap uint64, subtrees []subtree) ([]byte, error) {
	root := &fdt.Node{}
	root.SetString(abikho.PropCompatible, format)
	root.SetU64(abikho.PropPreservedMemoryMap, memMap)
	prop := subtreeProp(format)
	for _, s := range subtrees {
		root.AddChild(s.name).SetU64(prop, s.addr)
	}
	blob, err := fdt.Build(root)
	if err != nil {
		return nil, fmt.Errorf("kho: building the root FDT: %w", err)
	}
	return blob, nil
}

// AddSubtree adds a node called name to the outgoing root with property
// fdt = addr, the byte address of a blob (usually an FDT) that the caller
// has already preserved. It fails with EEXIST if a node of that name exists,
// with EINVAL for an empty name or one containing '/' or NUL or a zero or
// out-of-file address, and with ENOMEM when the root page is full. It
// mirrors kho_add_subtree.
func (k *KHO) AddSubtree(name string, addr uint64) error {
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("kho: subtree name %q: empty or contains '/' or NUL: %w", name, unix.EINVAL)
	}
	if addr == 0 || addr >= k.mf.Size() {
		return fmt.Errorf("kho: subtree %q at %#x: not an address inside the %d-byte memory file: %w", name, addr, k.mf.Size(), unix.EINVAL)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, s := range k.out.subtrees {
		if s.name == name {
			return fmt.Errorf("kho: subtree %q already added (at %#x): %w", name, s.addr, unix.EEXIST)
		}
	}
	k.out.subtrees = append(k.out.subtrees, subtree{name: name, addr: addr})
	// A failed write leaves the page as it was.
	if err := k.writeRootLocked(); err != nil {
		k.out.subtrees = k.out.subtrees[:len(k.out.subtrees)-1]
		return fmt.Errorf("kho: adding subtree %q: %w", name, err)
	}
	return nil
}

// RemoveSubtree removes the node whose fdt property is addr from the
// outgoing root. It fails with ENOENT if there is none. It mirrors
// kho_remove_subtree.
func (k *KHO) RemoveSubtree(addr uint64) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for i, s := range k.out.subtrees {
		if s.addr == addr {
			k.out.subtrees = append(k.out.subtrees[:i:i], k.out.subtrees[i+1:]...)
			return k.writeRootLocked()
		}
	}
	return fmt.Errorf("kho: no subtree with blob at %#x: %w", addr, unix.ENOENT)
}

// RetrieveSubtree returns the address of the blob that the previous sentry
// added under name. It fails with ENOENT after a cold boot or if the
// incoming root has no such node, and with EINVAL for an empty name or if
// the node's address property (fdt in kho-v1, preserved-data in kho-v2) is
// missing or not 8 bytes. The caller validates
// and restores the blob itself. It mirrors kho_retrieve_subtree.
func (k *KHO) RetrieveSubtree(name string) (uint64, error) {
	if name == "" {
		return 0, fmt.Errorf("kho: retrieving a subtree with an empty name: %w", unix.EINVAL)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.in == nil {
		return 0, fmt.Errorf("kho: retrieving subtree %q: no incoming handover: %w", name, unix.ENOENT)
	}
	n := k.in.tree.Child(name)
	if n == nil {
		return 0, fmt.Errorf("kho: retrieving subtree %q: no such node in the incoming root: %w", name, unix.ENOENT)
	}
	prop := subtreeProp(k.in.format)
	v, ok := n.Prop(prop)
	if !ok || len(v) != 8 {
		return 0, fmt.Errorf("kho: retrieving subtree %q: property %q missing or not 8 bytes: %w", name, prop, unix.EINVAL)
	}
	addr, _ := n.U64(prop)
	return addr, nil
}
