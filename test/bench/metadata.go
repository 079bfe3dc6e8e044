package main

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/livesentry/livesentry/pkg/abi/fdt"
	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	"github.com/livesentry/livesentry/pkg/guest"
	"github.com/livesentry/livesentry/pkg/sentry/kernel"
)

// metadata is what a livesentry restart hands over besides the guest's
// data, read from the memory file exactly as the next sentry reads it:
//
//   - Map: the KHO preserved-memory map written at finalize (chunk pages
//     and bitmap pages), which the next sentry reads and then frees;
//   - Preserved: every other preserved page that holds no memfd data —
//     the KHO root FDT, LUO's FDT and session/file records, and the
//     memfd-v1 folio arrays (16 bytes per folio).
//
// Besides these, only the descriptor (a few hundred bytes of JSON) and
// three fds cross the socket.
type metadata struct {
	ChunkPages, BitmapPages uint64
	PreservedBytes          uint64
	DataBytes               uint64
}

func (m metadata) mapBytes() uint64 { return (m.ChunkPages + m.BitmapPages) * abikho.PageSize }

// Total is the metadata handed over, in bytes.
func (m metadata) Total() uint64 { return m.mapBytes() + m.PreservedBytes - m.DataBytes }

func (m metadata) String() string {
	return fmt.Sprintf("%.1f KiB = KHO map %d chunk + %d bitmap pages, and %.1f KiB of preserved non-data pages (KHO root, LUO records, memfd folio arrays) beside %s of data",
		float64(m.Total())/1024, m.ChunkPages, m.BitmapPages, float64(m.PreservedBytes-m.DataBytes)/1024, sizeLabel(m.DataBytes))
}

// demoFileSizes is how the demo guest splits total over n memfds.
func demoFileSizes(total int64, n int) []int64 {
	sizes := make([]int64, n)
	part := total / int64(n)
	var sum int64
	for i := range sizes {
		sizes[i] = max(part-int64(i)*4099, 1)
		sum += sizes[i]
	}
	sizes[n-1] += total - sum
	return sizes
}

// measureMetadata boots a kernel in this process, lets a guest create
// and preserve the demo guest's layout (3 memfds, 2 sessions, the same
// sizes and folio sizes, random contents), runs the old sentry's side of
// a restart (pause, PrepareHandover) and walks the KHO map in the memory
// file; then it rolls the restart back and shuts the kernel down.
func measureMetadata(size uint64, smallFolios bool) (metadata, error) {
	k, err := kernel.New(kernel.Options{MemorySize: size + 256<<20})
	if err != nil {
		return metadata{}, err
	}
	dir, err := os.MkdirTemp("", "ls-meta-")
	if err != nil {
		k.Shutdown()
		return metadata{}, err
	}
	defer os.RemoveAll(dir)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "guest.sock"), Net: "unix"})
	if err != nil {
		k.Shutdown()
		return metadata{}, err
	}
	served := make(chan error, 1)
	go func() { served <- k.Serve(l) }()
	defer func() {
		l.Close()
		<-served
		k.Shutdown()
	}()
	g, err := guest.Dial(filepath.Join(dir, "guest.sock"))
	if err != nil {
		return metadata{}, err
	}
	defer g.Disconnect()
	var m metadata
	if err := preserveDemoLayout(g, size, smallFolios, &m); err != nil {
		return metadata{}, err
	}
	if err := k.Pause(time.Time{}); err != nil {
		return metadata{}, err
	}
	defer k.Resume()
	h, err := k.PrepareHandover(nil, nil)
	if err != nil {
		return metadata{}, err
	}
	defer k.AbortHandover()
	f, err := k.MemoryFile().DupFile()
	if err != nil {
		return metadata{}, err
	}
	defer f.Close()
	if err := walkMap(f, h.Root, &m); err != nil {
		return metadata{}, err
	}
	if m.PreservedBytes < m.DataBytes {
		return metadata{}, fmt.Errorf("the KHO map preserves %d bytes, less than the %d bytes of data", m.PreservedBytes, m.DataBytes)
	}
	return m, nil
}

func preserveDemoLayout(g *guest.Conn, size uint64, smallFolios bool, m *metadata) error {
	dev, err := g.OpenLiveUpdate()
	if err != nil {
		return err
	}
	var sess [2]int
	for i := range sess {
		if sess[i], err = g.CreateSession(dev, fmt.Sprintf("meta-%d", i)); err != nil {
			return err
		}
	}
	const chunk = 4 << 20
	buf := make([]byte, chunk)
	rng := rand.NewChaCha8([32]byte{2})
	for i, n := range demoFileSizes(int64(size), 3) {
		fd, err := g.MemfdCreate(fmt.Sprintf("meta-%d", i), 0)
		if err != nil {
			return err
		}
		if smallFolios {
			for off := int64(0); off < n; off += 2 << 20 {
				if _, err := g.Pwrite(fd, buf[:1], off); err != nil {
					return err
				}
			}
		}
		for off := int64(0); off < n; off += chunk {
			p := buf[:min(chunk, n-off)]
			rng.Read(p)
			if _, err := g.Pwrite(fd, p, off); err != nil {
				return err
			}
		}
		if err := g.PreserveFD(sess[i%2], fd, uint64(i+1)); err != nil {
			return err
		}
		if err := g.Close(fd); err != nil {
			return err
		}
		m.DataBytes += uint64(n+abikho.PageSize-1) / abikho.PageSize * abikho.PageSize
	}
	return nil
}

// walkMap reads the KHO root at root in the memory file f, follows its
// preserved-memory map and counts its pages and the bytes it preserves.
func walkMap(f *os.File, root uint64, m *metadata) error {
	page := make([]byte, abikho.PageSize)
	read := func(addr uint64) error {
		if _, err := f.ReadAt(page, int64(addr)); err != nil {
			return fmt.Errorf("reading the page at %#x: %w", addr, err)
		}
		return nil
	}
	if err := read(root); err != nil {
		return err
	}
	tree, err := fdt.Parse(page, abikho.PageSize)
	if err != nil {
		return fmt.Errorf("the KHO root: %w", err)
	}
	next, err := tree.U64(abikho.PropPreservedMemoryMap)
	if err != nil {
		return err
	}
	bitmap := make([]byte, abikho.PageSize)
	for seen := 0; next != 0; seen++ {
		if seen > 1<<20 {
			return fmt.Errorf("the KHO map has a cycle")
		}
		if err := read(next); err != nil {
			return err
		}
		m.ChunkPages++
		var hdr abikho.MemChunkHdr
		if err := hdr.Decode(page); err != nil {
			return err
		}
		if hdr.NumElms > abikho.MemChunkCapacity {
			return fmt.Errorf("chunk at %#x has %d bitmaps", next, hdr.NumElms)
		}
		for i := range int(hdr.NumElms) {
			var p abikho.MemBitmapPtr
			if err := p.Decode(page[abikho.MemChunkBitmapOffset(i):]); err != nil {
				return err
			}
			if _, err := f.ReadAt(bitmap, int64(p.Bitmap)); err != nil {
				return fmt.Errorf("reading the bitmap at %#x: %w", p.Bitmap, err)
			}
			m.BitmapPages++
			var set uint64
			for j := 0; j < len(bitmap); j += 8 {
				set += uint64(bits.OnesCount64(binary.LittleEndian.Uint64(bitmap[j:])))
			}
			m.PreservedBytes += set * (abikho.PageSize << hdr.Order)
		}
		next = hdr.Next
	}
	return nil
}
