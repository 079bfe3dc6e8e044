package boot

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// heapHeadroom is how much free heap populateHeap leaves mapped and
// faulted in ahead of a blackout: more than a boot allocates there (its
// bitmaps and page metadata come from pools of their own).
const heapHeadroom = 4 << 20

// populateHeap faults in every page of the mapping that holds the Go heap,
// with heapHeadroom of it free, so that the spans and goroutine stacks a
// blackout allocates land on pages already in memory.
//
// Allocating and dropping memory ahead of time is not enough: the
// runtime's scavenger gives free heap pages back to the kernel, and each
// processor hands out pages from a chunk of its own, which an allocation
// on another processor never touches. Each page the blackout touches
// first is then a page fault, a page allocation and a page cleared: about
// 3 µs here, and 50 to 350 µs on a virtual machine whose free memory the
// hypervisor has taken back (free page reporting), which is the state of
// most of its free memory once a large memory file has been filled
// (docs/restart.md). MADV_POPULATE_WRITE (Linux 5.14) faults in only what
// is missing and changes no byte: a page the scavenger released reads as
// zero, as the runtime expects, and so does a new one.
//
// The collector should be off (debug.SetGCPercent(-1)): it is what frees
// the headroom again for the scavenger to release. It returns the number
// of bytes in the mapping.
func populateHeap() (int, error) {
	// Dropped at once: the collection frees it, and the heap's mapping
	// has grown to hold it if it had to.
	addr := addressOf(make([]byte, heapHeadroom))
	runtime.GC()
	start, end, err := mappingOf(addr)
	if err != nil {
		return 0, err
	}
	if _, _, errno := unix.Syscall(unix.SYS_MADVISE, start, end-start, unix.MADV_POPULATE_WRITE); errno != 0 {
		return 0, fmt.Errorf("populating the heap (%#x-%#x): madvise(MADV_POPULATE_WRITE): %w", start, end, errno)
	}
	return int(end - start), nil
}

// addressOf returns the address of b's first byte.
func addressOf(b []byte) uintptr {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))
}

// mappingOf returns the bounds of this process's mapping that holds addr,
// from /proc/self/maps.
func mappingOf(addr uintptr) (start, end uintptr, err error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "start-end perms offset dev inode path"
		r, _, _ := bytes.Cut(sc.Bytes(), []byte(" "))
		lo, hi, ok := bytes.Cut(r, []byte("-"))
		if !ok {
			continue
		}
		s, err1 := strconv.ParseUint(string(lo), 16, 64)
		e, err2 := strconv.ParseUint(string(hi), 16, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		if uintptr(s) <= addr && addr < uintptr(e) {
			return uintptr(s), uintptr(e), nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	return 0, 0, fmt.Errorf("no mapping in /proc/self/maps holds %#x", addr)
}
