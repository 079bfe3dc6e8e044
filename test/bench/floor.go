package main

import (
	"fmt"
	"math/rand/v2"
	"time"

	"golang.org/x/sys/unix"
)

// measureCopyFloor times what any restart that copies memory pays at
// least: copy_file_range of a memfd holding r.Size bytes of random data
// into a new memfd (host pages, in the kernel, no user-space copy). The
// source is filled once; each run copies into a fresh memfd, which is
// closed afterwards.
func measureCopyFloor(c Config, r *Row) error {
	src, err := unix.MemfdCreate("bench-copy-src", unix.MFD_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(src)
	const chunk = 4 << 20
	buf := make([]byte, chunk)
	rng := rand.NewChaCha8([32]byte{3})
	for off := uint64(0); off < r.Size; off += chunk {
		p := buf[:min(chunk, r.Size-off)]
		rng.Read(p)
		if _, err := unix.Pwrite(src, p, int64(off)); err != nil {
			return fmt.Errorf("filling the source memfd: %w", err)
		}
	}
	for rep := 0; rep < c.Reps; rep++ {
		dst, err := unix.MemfdCreate("bench-copy-dst", unix.MFD_CLOEXEC)
		if err != nil {
			return err
		}
		start := time.Now()
		err = copyAll(src, dst, r.Size)
		d := time.Since(start)
		unix.Close(dst)
		if err != nil {
			return err
		}
		r.Pause = append(r.Pause, d)
		c.Logf("%s copy floor %d: %v", sizeLabel(r.Size), rep+1, d)
	}
	return nil
}

func copyAll(src, dst int, size uint64) error {
	var roff, woff int64
	for uint64(roff) < size {
		n, err := unix.CopyFileRange(src, &roff, dst, &woff, int(min(size-uint64(roff), 1<<30)), 0)
		if err != nil {
			return fmt.Errorf("copy_file_range at %d: %w", roff, err)
		}
		if n == 0 {
			return fmt.Errorf("copy_file_range: end of the source at %d of %d", roff, size)
		}
	}
	return nil
}
