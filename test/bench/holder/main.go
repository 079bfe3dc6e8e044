// Command holder is the program the benchmark runs in gVisor and
// checkpoints and restores: a static binary that holds -size bytes of
// random data (ChaCha8 from -seed) in anonymous memory, prints "filled"
// once they are written, then a line "tick N" every millisecond (the
// benchmark timestamps the lines it reads: the last one before the
// checkpoint and the first one after the restore bound the pause). On
// SIGUSR1 it reads the last byte, then compares every byte with the
// stream regenerated from the seed, and prints "verified ok" or
// "verified bad at OFFSET".
//
// Build it with CGO_ENABLED=0 so that it runs in an empty root.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"time"

	"golang.org/x/sys/unix"
)

const chunk = 1 << 20

func fill(b []byte, seed uint64) {
	rng := rand.NewChaCha8(key(seed))
	for off := 0; off < len(b); off += chunk {
		rng.Read(b[off:min(off+chunk, len(b))])
	}
}

func key(seed uint64) [32]byte {
	var k [32]byte
	for i := range 8 {
		k[i] = byte(seed >> (8 * i))
	}
	return k
}

// verify returns the offset of the first byte that differs, or -1.
func verify(b []byte, seed uint64) int {
	rng := rand.NewChaCha8(key(seed))
	want := make([]byte, chunk)
	for off := 0; off < len(b); off += chunk {
		end := min(off+chunk, len(b))
		w := want[:end-off]
		rng.Read(w)
		if !bytes.Equal(w, b[off:end]) {
			for i := range w {
				if w[i] != b[off+i] {
					return off + i
				}
			}
		}
	}
	return -1
}

func main() {
	size := flag.Int64("size", 64<<20, "bytes to hold")
	seed := flag.Uint64("seed", 1, "seed of the contents")
	flag.Parse()
	b, err := unix.Mmap(-1, 0, int(*size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder: mmap:", err)
		os.Exit(1)
	}
	fill(b, *seed)
	fmt.Fprintf(os.Stdout, "filled %d\n", len(b))
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, unix.SIGUSR1)
	tick := time.NewTicker(time.Millisecond)
	for n := 0; ; n++ {
		select {
		case <-usr1:
			start := time.Now()
			last := b[len(b)-1]
			fmt.Fprintf(os.Stdout, "lastbyte %d %v\n", last, time.Since(start))
			if off := verify(b, *seed); off >= 0 {
				fmt.Fprintf(os.Stdout, "verified bad at %d\n", off)
			} else {
				fmt.Fprintf(os.Stdout, "verified ok %v\n", time.Since(start))
			}
		case <-tick.C:
			fmt.Fprintf(os.Stdout, "tick %d\n", n)
		}
	}
}
