package fdt

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func sampleTree() *Node {
	root := &Node{}
	root.SetString("compatible", "kho-v1")
	root.SetU64("preserved-memory-map", 0x5000)
	a := root.AddChild("LUO")
	a.SetU64("fdt", 0x7000)
	a.SetU32("count", 3)
	a.AddChild("deeper").SetProp("empty", nil)
	root.AddChild("memblock").SetString("compatible", "memblock-v1")
	return root
}

func TestBuildParseRoundTrip(t *testing.T) {
	root := sampleTree()
	blob, err := Build(root)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	got, err := Parse(append(blob, make([]byte, 100)...), 4096)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if !reflect.DeepEqual(normalize(got), normalize(root)) {
		t.Errorf("round trip changed the tree:\n got %+v\nwant %+v", got, root)
	}
	n, err := got.Lookup("/LUO/deeper")
	if err != nil || n.Name != "deeper" {
		t.Fatalf("Lookup(/LUO/deeper) = %v, %v", n, err)
	}
	if v, err := got.Child("LUO").U64("fdt"); err != nil || v != 0x7000 {
		t.Errorf("U64(fdt) = %#x, %v; want 0x7000", v, err)
	}
	if v, err := got.Child("LUO").U32("count"); err != nil || v != 3 {
		t.Errorf("U32(count) = %d, %v; want 3", v, err)
	}
	if s, err := got.String("compatible"); err != nil || s != "kho-v1" {
		t.Errorf("String(compatible) = %q, %v", s, err)
	}
}

// normalize makes nil and empty property values compare equal.
func normalize(n *Node) *Node {
	c := &Node{Name: n.Name}
	for _, p := range n.Props {
		c.Props = append(c.Props, Property{Name: p.Name, Value: append([]byte{}, p.Value...)})
	}
	for _, ch := range n.Children {
		c.Children = append(c.Children, normalize(ch))
	}
	return c
}

func TestAccessorErrors(t *testing.T) {
	root := sampleTree()
	root.SetProp("two", []byte("a\x00b\x00"))
	for _, tc := range []struct {
		name string
		call func() error
		want error
		msg  string
	}{
		{"a missing property is ENOENT", func() error { _, err := root.U64("nope"); return err }, unix.ENOENT, `"nope"`},
		{"a u64 of the wrong size is EINVAL", func() error { _, err := root.U64("compatible"); return err }, unix.EINVAL, `"compatible"`},
		{"a u32 of the wrong size is EINVAL", func() error { _, err := root.U32("preserved-memory-map"); return err }, unix.EINVAL, "want 4"},
		{"a string with two NULs is EINVAL", func() error { _, err := root.String("two"); return err }, unix.EINVAL, `"two"`},
		{"a string without a NUL is EINVAL", func() error { _, err := root.String("preserved-memory-map"); return err }, unix.EINVAL, "NUL"},
		{"a missing node is ENOENT", func() error { _, err := root.Lookup("/LUO/none"); return err }, unix.ENOENT, `"none"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("got %v, want %v mentioning %s", err, tc.want, tc.msg)
			}
		})
	}
}

func TestBuildRejectsBadTrees(t *testing.T) {
	deep := &Node{}
	n := deep
	for i := 0; i < MaxDepth; i++ {
		n = n.AddChild("d")
	}
	for _, tc := range []struct {
		name string
		root *Node
	}{
		{"a named root is rejected", &Node{Name: "x"}},
		{"an empty child name is rejected", &Node{Children: []*Node{{}}}},
		{"a child name with a slash is rejected", &Node{Children: []*Node{{Name: "a/b"}}}},
		{"repeated sibling names are rejected", &Node{Children: []*Node{{Name: "a"}, {Name: "a"}}}},
		{"repeated property names are rejected", &Node{Props: []Property{{Name: "p"}, {Name: "p"}}}},
		{"a property name with a NUL is rejected", &Node{Props: []Property{{Name: "p\x00"}}}},
		{"a tree deeper than MaxDepth is rejected", deep},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Build(tc.root); !errors.Is(err, unix.EINVAL) {
				t.Errorf("Build = %v, want EINVAL", err)
			}
		})
	}
}

// mutate returns a copy of blob changed by fn.
func mutate(blob []byte, fn func(b []byte)) []byte {
	b := bytes.Clone(blob)
	fn(b)
	return b
}

func be32(b []byte, off int, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }

func TestParseRejectsMalformedBlobs(t *testing.T) {
	blob, err := Build(sampleTree())
	if err != nil {
		t.Fatal(err)
	}
	h, _ := DecodeHeader(blob)
	so := int(h.OffDtStruct)
	for _, tc := range []struct {
		name string
		blob []byte
		max  int
		msg  string
	}{
		{"a blob shorter than the header is rejected", blob[:39], 4096, "shorter than"},
		{"a wrong magic is rejected", mutate(blob, func(b []byte) { b[0] = 0 }), 4096, "magic"},
		{"a totalsize beyond the blob is rejected", mutate(blob, func(b []byte) { be32(b, 4, uint32(len(b)+1)) }), 4096, "totalsize"},
		{"a totalsize beyond the limit is rejected", blob, len(blob) - 1, "totalsize"},
		{"a negative limit accepts nothing", blob, -1, "totalsize"},
		{"an old version is rejected", mutate(blob, func(b []byte) { be32(b, 20, 16) }), 4096, "version"},
		{"a future last compatible version is rejected", mutate(blob, func(b []byte) { be32(b, 24, 18) }), 4096, "version"},
		{"a structure block past the end is rejected", mutate(blob, func(b []byte) { be32(b, 36, 1<<30) }), 4096, "size_dt_struct"},
		{"a misaligned structure block is rejected", mutate(blob, func(b []byte) { be32(b, 8, uint32(so+2)) }), 4096, "off_dt_struct"},
		{"a strings block past the end is rejected", mutate(blob, func(b []byte) { be32(b, 32, 0xffffffff) }), 4096, "size_dt_strings"},
		{"a forged strings size is rejected without allocating", mutate(blob, func(b []byte) { be32(b, 32, 0xf0000000) }), 4096, "size_dt_strings"},
		{"a misaligned reservation map is rejected", mutate(blob, func(b []byte) { be32(b, 16, 44) }), 4096, "off_mem_rsvmap"},
		{"an unterminated reservation map is rejected", mutate(blob, func(b []byte) { b[47] = 1 }), 4096, "terminating"},
		{"a first token other than BEGIN_NODE is rejected", mutate(blob, func(b []byte) { be32(b, so, tokenProp) }), 4096, "first token"},
		{"an unknown token is rejected", mutate(blob, func(b []byte) { be32(b, so+8, 7) }), 4096, "unexpected token"},
		{"a property name offset outside the strings is rejected", mutate(blob, func(b []byte) { be32(b, so+16, 0xffff) }), 4096, "name offset"},
		{"a property length past the block is rejected", mutate(blob, func(b []byte) { be32(b, so+12, 0xffffff) }), 4096, "property length"},
		{"a missing END token is rejected", mutate(blob, func(b []byte) { be32(b, so+int(h.SizeDtStruct)-4, tokenNop) }), 4096, "without FDT_END"},
		{"a root with a name is rejected", mutate(blob, func(b []byte) { b[so+4] = 'x' }), 4096, "root node named"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.blob, tc.max)
			if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Parse = %v, want EINVAL mentioning %q", err, tc.msg)
			}
		})
	}
}

func TestParseRejectsStructuralErrors(t *testing.T) {
	// Hand-assembled structure blocks around a valid header.
	tok := func(ws ...uint32) []byte {
		var b []byte
		for _, w := range ws {
			b = binary.BigEndian.AppendUint32(b, w)
		}
		return b
	}
	strs := []byte("p\x00")
	nodeA := append(tok(tokenBeginNode), 'a', 0, 0, 0)
	prop := tok(tokenProp, 0, 0)
	root := tok(tokenBeginNode, 0)
	end := tok(tokenEndNode)
	for _, tc := range []struct {
		name string
		st   []byte
		msg  string
	}{
		{"a property after a subnode is rejected", concat(root, nodeA, end, prop, end, tok(tokenEnd)), "property after a subnode"},
		{"a repeated property is rejected", concat(root, prop, prop, end, tok(tokenEnd)), "repeated property"},
		{"repeated sibling nodes are rejected", concat(root, nodeA, end, nodeA, end, end, tok(tokenEnd)), "repeated node name"},
		{"bytes after END are rejected", concat(root, end, tok(tokenEnd), tok(tokenNop)), "after FDT_END"},
		{"a second root is rejected", concat(root, end, root, end, tok(tokenEnd)), "after the root node"},
		{"an unterminated node is rejected", concat(root, nodeA), "without FDT_END"},
		{"nesting deeper than MaxDepth is rejected", concat(root, bytes.Repeat(nodeA, MaxDepth), bytes.Repeat(end, MaxDepth+1), tok(tokenEnd)), "deeper"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(assemble(tc.st, strs), 1<<20)
			if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Parse = %v, want EINVAL mentioning %q", err, tc.msg)
			}
		})
	}
	if _, err := Parse(assemble(concat(root, prop, nodeA, end, end, tok(tokenEnd)), strs), 1<<20); err != nil {
		t.Errorf("the well-formed hand-assembled blob does not parse: %v", err)
	}
}

func concat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

// assemble wraps a structure block and a strings block in a header.
func assemble(st, strs []byte) []byte {
	b := make([]byte, HeaderSize+16)
	be32(b, 0, Magic)
	be32(b, 8, uint32(len(b)))
	be32(b, 12, uint32(len(b)+len(st)))
	be32(b, 16, HeaderSize)
	be32(b, 20, Version)
	be32(b, 24, LastCompVersion)
	be32(b, 32, uint32(len(strs)))
	be32(b, 36, uint32(len(st)))
	b = append(append(b, st...), strs...)
	be32(b, 4, uint32(len(b)))
	return b
}

func TestDtcDecodesBuild(t *testing.T) {
	dtc, err := exec.LookPath("dtc")
	if err != nil {
		t.Skip("dtc not installed (apt-get install device-tree-compiler); .ci/run installs it")
	}
	blob, err := Build(sampleTree())
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(dtc, "-I", "dtb", "-O", "dts")
	cmd.Stdin = bytes.NewReader(blob)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("dtc: %v\n%s", err, out)
	}
	for _, want := range []string{`compatible = "kho-v1";`, "preserved-memory-map = <0x500000 0x00>;", "LUO {", "fdt = <0x700000 0x00>;", "deeper {", "empty;", `compatible = "memblock-v1";`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("dtc output lacks %q:\n%s", want, out)
		}
	}
	// Values are little-endian, so dtc shows 0x5000 as the cells <0x500000 0x00>.
	// And dtc's own output parses back.
	cmd = exec.Command(dtc, "-I", "dts", "-O", "dtb")
	cmd.Stdin = bytes.NewReader(out)
	dtb, err := cmd.Output()
	if err != nil {
		t.Fatalf("dtc -O dtb: %v", err)
	}
	got, err := Parse(dtb, len(dtb))
	if err != nil {
		t.Fatalf("Parse of dtc's blob: %v", err)
	}
	if v, err := got.Child("LUO").U64("fdt"); err != nil || v != 0x7000 {
		t.Errorf("dtc's blob: LUO/fdt = %#x, %v", v, err)
	}
}

func FuzzParse(f *testing.F) {
	blob, _ := Build(sampleTree())
	f.Add(blob)
	f.Add(blob[:60])
	f.Fuzz(func(t *testing.T, b []byte) {
		root, err := Parse(b, 1<<16)
		if err != nil {
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("Parse error is not EINVAL: %v", err)
			}
			return
		}
		again, err := Build(root)
		if err != nil {
			t.Fatalf("a parsed tree does not build: %v", err)
		}
		back, err := Parse(again, len(again))
		if err != nil {
			t.Fatalf("a rebuilt tree does not parse: %v", err)
		}
		if !reflect.DeepEqual(normalize(back), normalize(root)) {
			t.Fatalf("rebuild changed the tree")
		}
	})
}

// A node with a long name and many children must not make Parse build a
// path string per child: that costs memory quadratic in the blob, and the
// blob may come from another sentry.
func TestParseMemoryIsLinearInTheBlob(t *testing.T) {
	root := &Node{}
	parent := root.AddChild(strings.Repeat("n", 16<<10))
	for i := 0; i < 4000; i++ {
		parent.AddChild(fmt.Sprintf("c%d", i))
	}
	blob, err := Build(root)
	if err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, err := Parse(blob, len(blob)); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if got, limit := after.TotalAlloc-before.TotalAlloc, uint64(64*len(blob)); got > limit {
		t.Fatalf("parsing a %d-byte blob allocated %d bytes, more than %d", len(blob), got, limit)
	}
}

func TestNodesMarshalToReadableJSON(t *testing.T) {
	root := &Node{}
	root.SetString("compatible", "kho-v2")
	root.SetU64("preserved-memory-map", 0x5000)
	sub := root.AddChild("LUO")
	sub.SetU32("cell", 7)
	sub.SetProp("blob", []byte{1, 2, 3})
	b, err := json.Marshal(root)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"name":"/","properties":{"compatible":"kho-v2","preserved-memory-map":20480},"children":[{"name":"LUO","properties":{"blob":"0x010203","cell":7}}]}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
}
