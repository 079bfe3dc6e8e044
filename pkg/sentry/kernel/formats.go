package kernel

import (
	"fmt"

	abikho "github.com/livesentry/livesentry/pkg/abi/kho"
	abimemfd "github.com/livesentry/livesentry/pkg/abi/memfd"
	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
)

// formatsBuild chooses the handover formats of this build: "" for every
// format it knows (it reads all of them and writes, per subsystem, the
// newest the next sentry reads), "v1" for the first formats only (kho-v1,
// memfd-v1), "newest" for the newest only (kho-v2, memfd-v2). The
// format-compatibility tests build sentries of the three kinds with
// -ldflags "-X github.com/livesentry/livesentry/pkg/sentry/kernel.formatsBuild=v1";
// a build users run leaves it empty.
var formatsBuild string

// Format is what a build reads and writes for one subsystem of the
// handover.
type Format = luo.Format

// only keeps the formats of list that are in keep.
func only(list []string, keep ...string) []string {
	var out []string
	for _, f := range list {
		for _, k := range keep {
			if f == k {
				out = append(out, f)
			}
		}
	}
	return out
}

// khoFormats returns what this build reads and writes of KHO.
func khoFormats() Format {
	f := Format{Subsystem: "kho", Reads: kho.ReadFormats(), Writes: kho.WriteFormats()}
	switch formatsBuild {
	case "v1":
		f.Reads, f.Writes = only(f.Reads, abikho.CompatibleV1), only(f.Writes, abikho.CompatibleV1)
	case "newest":
		f.Reads, f.Writes = only(f.Reads, abikho.CompatibleV2), only(f.Writes, abikho.CompatibleV2)
	}
	return f
}

// memfdHandlers returns the memfd file handlers this build registers with
// LUO, newest format first.
func memfdHandlers(mf *pgalloc.MemoryFile, k *kho.KHO) []*luo.FileHandler {
	switch formatsBuild {
	case "v1":
		return []*luo.FileHandler{memfd.NewLUOHandler(mf, k)}
	case "newest":
		var hs []*luo.FileHandler
		for _, h := range memfd.NewLUOHandlers(mf, k) {
			if h.Compatible == abimemfd.CompatibleV2 {
				hs = append(hs, h)
			}
		}
		return hs
	}
	return memfd.NewLUOHandlers(mf, k)
}

// newLUO returns LUO over k with this build's file handlers registered.
func newLUO(mf *pgalloc.MemoryFile, k *kho.KHO) (*luo.LUO, error) {
	l := luo.New(k)
	for _, h := range memfdHandlers(mf, k) {
		if err := l.RegisterFileHandler(h); err != nil {
			return nil, fmt.Errorf("registering the %s LUO handler: %w", h.Compatible, err)
		}
	}
	return l, nil
}

// Formats returns, per subsystem of the handover (KHO, the LUO FDT, its
// session node, each file handler family), the formats this build reads
// and writes, newest first.
func Formats() []Format {
	l, err := newLUO(nil, nil)
	if err != nil {
		panic(fmt.Sprintf("kernel: this build's LUO handlers: %v", err))
	}
	return append([]Format{khoFormats()}, l.Formats()...)
}

// Reads returns every format this build reads, all subsystems together:
// what a new sentry tells the old one at a restart.
func Reads() []string {
	var out []string
	for _, f := range Formats() {
		out = append(out, f.Reads...)
	}
	return out
}

// khoFormatFor returns the KHO format to write for a next sentry that
// reads peerReads: the newest this build writes among them, or the default
// for nil. None is an error wrapping luo.ErrNoCommonFormat.
func khoFormatFor(peerReads []string) (string, error) {
	f := khoFormats()
	if peerReads == nil {
		if only(f.Writes, abikho.Compatible) != nil {
			return abikho.Compatible, nil
		}
		return f.Writes[0], nil
	}
	for _, w := range f.Writes {
		for _, r := range peerReads {
			if w == r {
				return w, nil
			}
		}
	}
	return "", fmt.Errorf("%w: kho: this sentry writes %q, the next one reads %q", luo.ErrNoCommonFormat, f.Writes, peerReads)
}
