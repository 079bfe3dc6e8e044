package fdt

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Header is the header of a flattened device tree (version 17).
type Header struct {
	Magic           uint32
	TotalSize       uint32
	OffDtStruct     uint32
	OffDtStrings    uint32
	OffMemRsvmap    uint32
	Version         uint32
	LastCompVersion uint32
	BootCPUIDPhys   uint32
	SizeDtStrings   uint32
	SizeDtStruct    uint32
}

// DecodeHeader decodes the header at the start of b. It fails with EINVAL if
// b is shorter than HeaderSize; it does not validate the fields.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("fdt: %d-byte blob is shorter than the %d-byte header: %w", len(b), HeaderSize, unix.EINVAL)
	}
	be := binary.BigEndian
	return Header{
		Magic:           be.Uint32(b[0:]),
		TotalSize:       be.Uint32(b[4:]),
		OffDtStruct:     be.Uint32(b[8:]),
		OffDtStrings:    be.Uint32(b[12:]),
		OffMemRsvmap:    be.Uint32(b[16:]),
		Version:         be.Uint32(b[20:]),
		LastCompVersion: be.Uint32(b[24:]),
		BootCPUIDPhys:   be.Uint32(b[28:]),
		SizeDtStrings:   be.Uint32(b[32:]),
		SizeDtStruct:    be.Uint32(b[36:]),
	}, nil
}

// Parse reads the flattened device tree at the start of blob, which may be
// longer than the tree. It accepts at most maxSize bytes (totalsize must not
// exceed min(len(blob), maxSize)) and checks everything before it trusts it:
// the header (magic, totalsize, block offsets and sizes inside the blob,
// alignment, version 17 compatible), the memory reservation map (terminated
// inside the blob), every structure token, node and property name (inside
// their blocks, NUL-terminated), property lengths, properties before
// subnodes, no repeated property or sibling name, nesting at most MaxDepth,
// and a single root followed by the end token. A violation fails with
// EINVAL and an error naming the field or the structure block offset.
//
// The returned tree owns its memory: it does not alias blob.
func Parse(blob []byte, maxSize int) (*Node, error) {
	h, err := DecodeHeader(blob)
	if err != nil {
		return nil, err
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("fdt: "+format+": %w", append(args, unix.EINVAL)...)
	}
	if h.Magic != Magic {
		return nil, bad("header magic %#x, want %#x", h.Magic, Magic)
	}
	limit := uint64(max(0, min(len(blob), maxSize)))
	total := uint64(h.TotalSize)
	if total < HeaderSize || total > limit {
		return nil, bad("header totalsize %d outside [%d, %d]", total, HeaderSize, limit)
	}
	if h.Version < Version || h.LastCompVersion > Version {
		return nil, bad("header version %d (last compatible %d): want version >= %d and last compatible <= %d", h.Version, h.LastCompVersion, Version, Version)
	}
	structOff, structSize := uint64(h.OffDtStruct), uint64(h.SizeDtStruct)
	if structOff < HeaderSize || structOff%4 != 0 || structSize%4 != 0 || structOff+structSize > total {
		return nil, bad("structure block [off_dt_struct %d, size_dt_struct %d] not 4-byte aligned inside the %d-byte blob", structOff, structSize, total)
	}
	strOff, strSize := uint64(h.OffDtStrings), uint64(h.SizeDtStrings)
	if strOff < HeaderSize || strOff+strSize > total {
		return nil, bad("strings block [off_dt_strings %d, size_dt_strings %d] not inside the %d-byte blob", strOff, strSize, total)
	}
	rsv := uint64(h.OffMemRsvmap)
	if rsv < HeaderSize || rsv%8 != 0 {
		return nil, bad("off_mem_rsvmap %d not 8-byte aligned after the header", rsv)
	}
	for {
		if rsv+16 > total {
			return nil, bad("memory reservation map at off_mem_rsvmap %d has no terminating entry inside the %d-byte blob", h.OffMemRsvmap, total)
		}
		if binary.BigEndian.Uint64(blob[rsv:]) == 0 && binary.BigEndian.Uint64(blob[rsv+8:]) == 0 {
			break
		}
		rsv += 16
	}
	p := parser{
		st:      blob[structOff : structOff+structSize],
		strs:    blob[strOff : strOff+strSize],
		structs: structOff,
	}
	return p.parse()
}

type parser struct {
	st      []byte // structure block
	strs    []byte // strings block
	structs uint64 // offset of the structure block in the blob, for errors
	off     int    // next token's offset in st
}

func (p *parser) bad(format string, args ...any) error {
	return fmt.Errorf("fdt: structure block offset %d (blob offset %d): "+format+": %w",
		append([]any{p.off, p.structs + uint64(p.off)}, append(args, unix.EINVAL)...)...)
}

// u32 reads the big-endian word at p.off and advances.
func (p *parser) u32() (uint32, bool) {
	if p.off+4 > len(p.st) {
		return 0, false
	}
	v := binary.BigEndian.Uint32(p.st[p.off:])
	p.off += 4
	return v, true
}

// token returns the next token that is not FDT_NOP.
func (p *parser) token() (uint32, error) {
	for {
		t, ok := p.u32()
		if !ok {
			return 0, p.bad("structure block ends without FDT_END")
		}
		if t != tokenNop {
			return t, nil
		}
	}
}

// name reads a NUL-terminated node name at p.off and skips its padding.
func (p *parser) name() (string, error) {
	n := bytes.IndexByte(p.st[p.off:], 0)
	if n < 0 {
		return "", p.bad("node name not NUL-terminated inside the structure block")
	}
	s := string(p.st[p.off : p.off+n])
	p.off += (n + 1 + 3) &^ 3
	if p.off > len(p.st) {
		return "", p.bad("node name padding runs past the structure block")
	}
	return s, nil
}

func (p *parser) parse() (*Node, error) {
	t, err := p.token()
	if err != nil {
		return nil, err
	}
	if t != tokenBeginNode {
		return nil, p.bad("first token %#x, want FDT_BEGIN_NODE", t)
	}
	name, err := p.name()
	if err != nil {
		return nil, err
	}
	if name != "" {
		return nil, p.bad("root node named %q, want empty", name)
	}
	root := &Node{}
	if err := p.body(root, nil, 1); err != nil {
		return nil, err
	}
	if t, err = p.token(); err != nil {
		return nil, err
	}
	if t != tokenEnd {
		return nil, p.bad("token %#x after the root node, want FDT_END", t)
	}
	if p.off != len(p.st) {
		return nil, p.bad("%d bytes after FDT_END inside size_dt_struct", len(p.st)-p.off)
	}
	return root, nil
}

// nodePath is a node's place in the tree, built only when an error names
// it: building every child's path string up front would cost time and
// memory quadratic in the blob for long names.
type nodePath struct {
	parent *nodePath
	name   string
}

// String returns the path with a trailing slash ("/" for the root).
func (np *nodePath) String() string {
	var names []string
	for e := np; e != nil; e = e.parent {
		names = append(names, e.name)
	}
	var b strings.Builder
	for i := len(names) - 1; i >= 0; i-- {
		b.WriteString("/")
		b.WriteString(names[i])
	}
	b.WriteString("/")
	return b.String()
}

// body reads n's properties and children up to and including its
// FDT_END_NODE.
func (p *parser) body(n *Node, path *nodePath, depth int) error {
	props := make(map[string]bool)
	children := make(map[string]bool)
	for {
		tokOff := p.off
		t, err := p.token()
		if err != nil {
			return err
		}
		switch t {
		case tokenEndNode:
			return nil
		case tokenProp:
			if len(n.Children) > 0 {
				p.off = tokOff
				return p.bad("property after a subnode in node %q", path.String())
			}
			size, ok1 := p.u32()
			nameOff, ok2 := p.u32()
			if !ok1 || !ok2 {
				return p.bad("property header runs past the structure block")
			}
			if uint64(size) > uint64(len(p.st)-p.off) {
				return p.bad("property length %d runs past the structure block", size)
			}
			if uint64(nameOff) >= uint64(len(p.strs)) {
				return p.bad("property name offset %d outside the %d-byte strings block", nameOff, len(p.strs))
			}
			end := bytes.IndexByte(p.strs[nameOff:], 0)
			if end <= 0 {
				return p.bad("property name at strings offset %d empty or not NUL-terminated", nameOff)
			}
			pname := string(p.strs[nameOff : int(nameOff)+end])
			if !validName(pname) || props[pname] {
				p.off = tokOff
				return p.bad("invalid or repeated property name %q in node %q", pname, path.String())
			}
			props[pname] = true
			n.Props = append(n.Props, Property{Name: pname, Value: bytes.Clone(p.st[p.off : p.off+int(size)])})
			p.off += (int(size) + 3) &^ 3
			if p.off > len(p.st) {
				return p.bad("property %q padding runs past the structure block", pname)
			}
		case tokenBeginNode:
			if depth+1 > MaxDepth {
				return p.bad("node nested deeper than %d under %q", MaxDepth, path.String())
			}
			name, err := p.name()
			if err != nil {
				return err
			}
			if !validName(name) || children[name] {
				p.off = tokOff
				return p.bad("invalid or repeated node name %q in node %q", name, path.String())
			}
			children[name] = true
			c := &Node{Name: name}
			n.Children = append(n.Children, c)
			if err := p.body(c, &nodePath{parent: path, name: name}, depth+1); err != nil {
				return err
			}
		default:
			p.off = tokOff
			return p.bad("unexpected token %#x inside node %q", t, path.String())
		}
	}
}
