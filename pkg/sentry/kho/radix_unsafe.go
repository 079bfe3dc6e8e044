package kho

import (
	"encoding/binary"
	"unsafe"
)

// bitmapBytes returns b's memory as the page it is read from, on a
// little-endian machine, where a bitmap's words in memory have the byte
// order of a KHO bitmap or radix-tree leaf (unsigned longs, little-endian);
// nil on a big-endian one.
func bitmapBytes(b *bitmap) []byte {
	if !littleEndian {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(b)), unsafe.Sizeof(*b))
}

// bitmapsBytes is bitmapBytes for adjacent bitmaps: the pages they are
// read from, in order.
func bitmapsBytes(bs []bitmap) []byte {
	if !littleEndian || len(bs) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&bs[0])), uintptr(len(bs))*unsafe.Sizeof(bs[0]))
}

// littleEndian reports whether this machine stores words little-endian.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1
