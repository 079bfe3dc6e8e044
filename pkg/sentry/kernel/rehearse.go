package kernel

import (
	"fmt"
	"time"

	abiluo "github.com/livesentry/livesentry/pkg/abi/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
)

// rehearsalFiles are the sizes of the memfds a rehearsal preserves: a
// 4 KiB folio, a 2 MiB folio and a tail, so that every record kind is
// written and read.
var rehearsalFiles = []int{4096, 2<<20 + 4096}

// rehearse runs a live restart once, in this process, on a small kernel of
// its own: a session with a few memfds preserved, the old side's freeze
// and finalize, and the new side's map, ingest and deserialize of the
// result, which is then thrown away. A new sentry does this before it says
// it is ready, so that the boot inside the blackout runs code whose pages
// are faulted in, on a heap already grown: run cold, the same boot is
// several times slower than warm. It hands over in the formats a restart
// to a sentry of this build uses (the old side chooses among what this
// build reads, Reads), so that the code warmed is the code of that boot:
// a kho-v2 tree read ahead of the pause (PrereadHandover) and carried,
// not the kho-v1 map a handover to no particular peer would write. It
// returns the kho format it rehearsed.
func rehearse() (string, error) {
	k, err := New(Options{MemorySize: 16 << 20})
	if err != nil {
		return "", err
	}
	defer k.Shutdown()
	fdt := &FDTable{}
	defer fdt.CloseAll()
	dev, err := k.luo.OpenDevice()
	if err != nil {
		return "", err
	}
	defer dev.DecRef()
	cs := abiluo.CreateSession{Size: abiluo.CreateSessionSize}
	copy(cs.Name[:], "rehearsal")
	arg := make([]byte, abiluo.CreateSessionSize)
	cs.Encode(arg)
	reply, err := dev.Ioctl(fdt, abiluo.IoctlCreateSession, arg)
	if err != nil {
		return "", fmt.Errorf("creating a session: %w", err)
	}
	if err := cs.Decode(reply); err != nil {
		return "", err
	}
	buf := make([]byte, 4096)
	for i, size := range rehearsalFiles {
		f, err := memfd.Create(k.mf, "rehearsal", 0)
		if err != nil {
			return "", err
		}
		fd, err := fdt.InstallFD(f, true)
		f.DecRef()
		if err != nil {
			return "", err
		}
		for off := 0; off < size; off += len(buf) {
			if _, err := f.Pwrite(buf, int64(off)); err != nil {
				return "", err
			}
		}
		pf := abiluo.SessionFD{Size: abiluo.SessionPreserveFDSize, FD: fd, Token: uint64(i + 1)}
		arg := make([]byte, abiluo.SessionPreserveFDSize)
		pf.Encode(arg)
		sess, err := fdt.FileFromFD(cs.FD)
		if err != nil {
			return "", err
		}
		if _, err := sess.Ioctl(fdt, abiluo.IoctlSessionPreserve, arg); err != nil {
			return "", fmt.Errorf("preserving a memfd: %w", err)
		}
	}
	// As a transfer-mode restart does: the new side reads the tree
	// ahead while the old one runs, and boots from what it read.
	root, generation, ok := k.Preview(Reads())
	if !ok {
		return "", fmt.Errorf("nothing to read ahead in a handover to this build")
	}
	shown, err := k.mf.DupFile()
	if err != nil {
		return "", err
	}
	pre, err := PrereadHandover(shown, root, generation)
	if err != nil {
		return "", err
	}
	defer pre.Close()
	if err := k.Pause(time.Time{}); err != nil {
		return "", err
	}
	h, err := k.PrepareHandover(nil, Reads())
	if err != nil {
		k.Resume()
		return "", err
	}
	defer func() {
		k.AbortHandover()
		k.Resume()
	}()
	file, err := k.mf.DupFile()
	if err != nil {
		return "", err
	}
	k2, err := NewFromPreread(pre, file, h.Root, h.Generation, Options{}, nil)
	if err != nil {
		return "", err
	}
	format := k2.kho.IncomingFormat()
	k2.Shutdown()
	return format, nil
}
