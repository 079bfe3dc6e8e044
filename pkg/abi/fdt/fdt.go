// Package fdt reads and writes flattened device trees (FDT, "DTB", the
// format dtc and libfdt speak), strictly and within bounds.
//
// It exists because the KHO root and the subtrees that hang from it (LUO's
// "LUO" node, for example) are FDT blobs that cross a sentry restart inside
// the memory file: whatever reads them must treat them as untrusted bytes.
// Parse never allocates more than a small multiple of the blob's size, never
// panics, and rejects a blob with an error that names the offending field or
// structure offset.
//
// API:
//
//	root, err := fdt.Parse(blob, maxSize)   // strict reader; blob may be longer than the FDT
//	n, err := root.Lookup("/kho/sub")       // node by path; root is "/"
//	v, ok := n.Prop("fdt")                  // raw property bytes
//	a, err := n.U64("fdt")                  // 8-byte property (see below)
//	s, err := n.String("compatible")        // one NUL-terminated string
//
//	root := &fdt.Node{}                     // the root node's name is empty
//	root.SetString("compatible", "kho-v1")
//	root.SetU64("preserved-memory-map", 0)
//	child := root.AddChild("LUO")
//	blob, err := fdt.Build(root)            // version 17 blob, dtc-compatible
//
// Integers: the FDT header and structure tokens are big-endian, as the
// format requires. Property values are bytes; U32/U64 and SetU32/SetU64 use
// the native byte order of the machines Linux KHO runs on (little-endian),
// exactly as Linux's kho code stores physical addresses with
// fdt_property(fdt, name, &phys, sizeof(phys)). dtc shows such a u64 as two
// cells with the low word first.
package fdt

import (
	"encoding/binary"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	// Magic is the FDT header's magic number.
	Magic = 0xd00dfeed
	// Version is the FDT version Build writes.
	Version = 17
	// LastCompVersion is the oldest version a Build blob is compatible with.
	LastCompVersion = 16
	// HeaderSize is the size of the version 17 header.
	HeaderSize = 40
	// MaxDepth is the deepest node nesting Parse accepts (the root is depth 1).
	MaxDepth = 32

	tokenBeginNode = 0x1
	tokenEndNode   = 0x2
	tokenProp      = 0x3
	tokenNop       = 0x4
	tokenEnd       = 0x9
)

// Property is one property of a node: a name and its raw value.
type Property struct {
	Name  string
	Value []byte
}

// Node is one node of a device tree. The root node's Name is empty.
type Node struct {
	Name     string
	Props    []Property
	Children []*Node
}

// Prop returns the value of the property name, or false if n has none.
func (n *Node) Prop(name string) ([]byte, bool) {
	for _, p := range n.Props {
		if p.Name == name {
			return p.Value, true
		}
	}
	return nil, false
}

// U64 returns the 8-byte, little-endian property name. It fails with ENOENT
// if n has no such property and with EINVAL if it is not 8 bytes long; the
// error names the node and the property.
func (n *Node) U64(name string) (uint64, error) {
	v, err := n.sized(name, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(v), nil
}

// U32 returns the 4-byte, little-endian property name, failing like U64.
func (n *Node) U32(name string) (uint32, error) {
	v, err := n.sized(name, 4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(v), nil
}

func (n *Node) sized(name string, size int) ([]byte, error) {
	v, ok := n.Prop(name)
	if !ok {
		return nil, fmt.Errorf("fdt: node %q has no property %q: %w", n.displayName(), name, unix.ENOENT)
	}
	if len(v) != size {
		return nil, fmt.Errorf("fdt: property %q of node %q is %d bytes, want %d: %w", name, n.displayName(), len(v), size, unix.EINVAL)
	}
	return v, nil
}

// String returns the property name as a string: its value must be exactly
// one NUL-terminated string with no other NUL. It fails with ENOENT if n has
// no such property and with EINVAL otherwise.
func (n *Node) String(name string) (string, error) {
	v, ok := n.Prop(name)
	if !ok {
		return "", fmt.Errorf("fdt: node %q has no property %q: %w", n.displayName(), name, unix.ENOENT)
	}
	if len(v) == 0 || v[len(v)-1] != 0 || strings.IndexByte(string(v[:len(v)-1]), 0) >= 0 {
		return "", fmt.Errorf("fdt: property %q of node %q is not one NUL-terminated string: %w", name, n.displayName(), unix.EINVAL)
	}
	return string(v[:len(v)-1]), nil
}

func (n *Node) displayName() string {
	if n.Name == "" {
		return "/"
	}
	return n.Name
}

// Child returns the child of n called name, or nil.
func (n *Node) Child(name string) *Node {
	for _, c := range n.Children {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// Lookup returns the node at path, relative to n ("/" or "" is n itself,
// "/a/b" its child a's child b). It fails with ENOENT, naming the first
// missing component.
func (n *Node) Lookup(path string) (*Node, error) {
	cur := n
	for _, c := range strings.Split(strings.Trim(path, "/"), "/") {
		if c == "" {
			continue
		}
		next := cur.Child(c)
		if next == nil {
			return nil, fmt.Errorf("fdt: node %q has no child %q (looking up %q): %w", cur.displayName(), c, path, unix.ENOENT)
		}
		cur = next
	}
	return cur, nil
}

// SetProp sets the property name to value, replacing an existing one.
func (n *Node) SetProp(name string, value []byte) {
	for i := range n.Props {
		if n.Props[i].Name == name {
			n.Props[i].Value = value
			return
		}
	}
	n.Props = append(n.Props, Property{Name: name, Value: value})
}

// SetU64 sets the property name to the 8-byte little-endian value v.
func (n *Node) SetU64(name string, v uint64) {
	n.SetProp(name, binary.LittleEndian.AppendUint64(nil, v))
}

// SetU32 sets the property name to the 4-byte little-endian value v.
func (n *Node) SetU32(name string, v uint32) {
	n.SetProp(name, binary.LittleEndian.AppendUint32(nil, v))
}

// SetString sets the property name to s followed by a NUL.
func (n *Node) SetString(name, s string) {
	n.SetProp(name, append([]byte(s), 0))
}

// AddChild appends a new, empty child called name to n and returns it.
func (n *Node) AddChild(name string) *Node {
	c := &Node{Name: name}
	n.Children = append(n.Children, c)
	return c
}

// RemoveChild removes the child of n called name and reports whether there
// was one.
func (n *Node) RemoveChild(name string) bool {
	for i, c := range n.Children {
		if c.Name == name {
			n.Children = append(n.Children[:i:i], n.Children[i+1:]...)
			return true
		}
	}
	return false
}
