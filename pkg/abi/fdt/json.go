package fdt

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"unicode"
)

// jsonNode is a Node as MarshalJSON writes it.
type jsonNode struct {
	Name       string         `json:"name"`
	Properties map[string]any `json:"properties,omitempty"`
	Children   []*Node        `json:"children,omitempty"`
}

// MarshalJSON writes the node for people to read: each property value as a
// string if it is one printable NUL-terminated string, as a number if it
// is 4 or 8 bytes (little-endian: KHO and LUO write their addresses and
// counts in the CPU's byte order, as Linux does, not as big-endian FDT
// cells), and as hex otherwise.
func (n *Node) MarshalJSON() ([]byte, error) {
	j := jsonNode{Name: n.Name, Children: n.Children}
	if len(n.Props) > 0 {
		j.Properties = make(map[string]any, len(n.Props))
	}
	for _, p := range n.Props {
		j.Properties[p.Name] = propValue(p.Value)
	}
	if j.Name == "" {
		j.Name = "/"
	}
	return json.Marshal(j)
}

func propValue(v []byte) any {
	if s, ok := printable(v); ok {
		return s
	}
	switch len(v) {
	case 4:
		return binary.LittleEndian.Uint32(v)
	case 8:
		return binary.LittleEndian.Uint64(v)
	}
	return "0x" + hex.EncodeToString(v)
}

// printable returns v as a string if it is one NUL-terminated run of
// printable characters.
func printable(v []byte) (string, bool) {
	if len(v) < 2 || v[len(v)-1] != 0 {
		return "", false
	}
	for _, c := range v[:len(v)-1] {
		if c >= 0x80 || !unicode.IsPrint(rune(c)) {
			return "", false
		}
	}
	return string(v[:len(v)-1]), true
}
