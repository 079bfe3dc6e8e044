package luo

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// store64 publishes v in the 8 bytes at b[0:8], which must be 8-byte
// aligned, with one atomic store: a sentry killed at any instant leaves
// either the old or the new value in the memory file, never a mix. The
// value is stored little endian, the byte order of every record LUO
// writes (the host's: the sentry runs on little-endian hosts only).
func store64(b []byte, v uint64) {
	p := unsafe.Pointer(&b[:8][0])
	if uintptr(p)%8 != 0 {
		panic(fmt.Sprintf("luo: publishing through an unaligned address %p", p))
	}
	atomic.StoreUint64((*uint64)(p), v)
}
