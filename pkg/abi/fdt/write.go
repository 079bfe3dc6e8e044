package fdt

import (
	"encoding/binary"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Build returns root as a version 17 flattened device tree: header, an
// empty memory reservation map, the structure block and the strings block
// (property names deduplicated). The result reads back with Parse and with
// dtc. It fails with EINVAL, naming the node, if a name is empty (except the
// root's), contains '/' or NUL, repeats a sibling's name, or if the tree is
// deeper than MaxDepth.
func Build(root *Node) ([]byte, error) {
	if root.Name != "" {
		return nil, fmt.Errorf("fdt: root node has name %q, want empty: %w", root.Name, unix.EINVAL)
	}
	w := writer{strOff: make(map[string]uint32)}
	if err := w.node(root, "", 1); err != nil {
		return nil, err
	}
	w.structs = binary.BigEndian.AppendUint32(w.structs, tokenEnd)

	const rsvOff = HeaderSize
	structOff := rsvOff + 16
	stringsOff := structOff + len(w.structs)
	total := stringsOff + len(w.strings)
	out := make([]byte, HeaderSize+16, total)
	be := binary.BigEndian
	be.PutUint32(out[0:], Magic)
	be.PutUint32(out[4:], uint32(total))
	be.PutUint32(out[8:], uint32(structOff))
	be.PutUint32(out[12:], uint32(stringsOff))
	be.PutUint32(out[16:], rsvOff)
	be.PutUint32(out[20:], Version)
	be.PutUint32(out[24:], LastCompVersion)
	be.PutUint32(out[28:], 0) // boot_cpuid_phys
	be.PutUint32(out[32:], uint32(len(w.strings)))
	be.PutUint32(out[36:], uint32(len(w.structs)))
	// out[40:56] is the memory reservation map's terminating (0, 0) entry.
	out = append(out, w.structs...)
	out = append(out, w.strings...)
	return out, nil
}

type writer struct {
	structs []byte
	strings []byte
	strOff  map[string]uint32
}

func validName(s string) bool {
	return s != "" && !strings.ContainsAny(s, "/\x00")
}

func (w *writer) node(n *Node, path string, depth int) error {
	if depth > MaxDepth {
		return fmt.Errorf("fdt: node %q is nested deeper than %d: %w", path, MaxDepth, unix.EINVAL)
	}
	w.structs = binary.BigEndian.AppendUint32(w.structs, tokenBeginNode)
	w.structs = append(w.structs, n.Name...)
	w.structs = append(w.structs, 0)
	w.pad()
	seen := make(map[string]bool, len(n.Props))
	for _, p := range n.Props {
		if !validName(p.Name) || seen[p.Name] {
			return fmt.Errorf("fdt: node %q: invalid or repeated property name %q: %w", path+"/", p.Name, unix.EINVAL)
		}
		seen[p.Name] = true
		off, ok := w.strOff[p.Name]
		if !ok {
			off = uint32(len(w.strings))
			w.strOff[p.Name] = off
			w.strings = append(w.strings, p.Name...)
			w.strings = append(w.strings, 0)
		}
		w.structs = binary.BigEndian.AppendUint32(w.structs, tokenProp)
		w.structs = binary.BigEndian.AppendUint32(w.structs, uint32(len(p.Value)))
		w.structs = binary.BigEndian.AppendUint32(w.structs, off)
		w.structs = append(w.structs, p.Value...)
		w.pad()
	}
	clear(seen)
	for _, c := range n.Children {
		cpath := path + "/" + c.Name
		if !validName(c.Name) || seen[c.Name] {
			return fmt.Errorf("fdt: node %q: invalid or repeated child name %q: %w", path+"/", c.Name, unix.EINVAL)
		}
		seen[c.Name] = true
		if err := w.node(c, cpath, depth+1); err != nil {
			return err
		}
	}
	w.structs = binary.BigEndian.AppendUint32(w.structs, tokenEndNode)
	return nil
}

func (w *writer) pad() {
	for len(w.structs)%4 != 0 {
		w.structs = append(w.structs, 0)
	}
}
