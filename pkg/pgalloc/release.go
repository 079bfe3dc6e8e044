package pgalloc

import (
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// releaseBatchPages is the amount of freed memory that wakes the
	// releaser at once; less than that waits up to releaseDelay so that
	// frees are punched out in batches.
	releaseBatchPages = 1024
	releaseDelay      = 2 * time.Millisecond

	// releaserStalePages bounds the stale memory one releaser round claims
	// (256 MiB): it is out of the allocator's reach until punched.
	releaserStalePages = 1 << 16
	// releaserStaleRanges bounds the number of stale ranges one round
	// claims.
	releaserStaleRanges = 4096

	// lazyScrubPages is the least an allocation scrubs when it has to take
	// stale pages itself (4 MiB), so a run of small allocations does not
	// make one system call each.
	lazyScrubPages = 1 << MaxOrder
)

// decommit punches [start, end) out of the file so that it reads as zero and
// uses no host memory. If the host refuses, it zeroes the pages by hand.
func (f *MemoryFile) decommit(start, end uint64) {
	off, n := int64(start<<PageShift), int64((end-start)<<PageShift)
	if err := unix.Fallocate(f.FD(), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		clear(f.mapping[off : off+n])
		return
	}
	// The punch unmapped the pages from every process: the chunks it
	// covers are new to this one again.
	f.forgetTouchesIn(start, end)
}

// coalesce sorts disjoint ranges and merges the adjacent ones in place.
func coalesce(rs []pfnRange) []pfnRange {
	slices.SortFunc(rs, func(a, b pfnRange) int {
		switch {
		case a.start < b.start:
			return -1
		case a.start > b.start:
			return 1
		}
		return 0
	})
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && out[n-1].end == r.start {
			out[n-1].end = r.end
			continue
		}
		out = append(out, r)
	}
	return out
}

// buildStaleLocked lists the stale ranges, if Adopt left them to be
// derived from the adopted set.
//
// +checklocks:f.mu
func (f *MemoryFile) buildStaleLocked() {
	if f.staleUnbuilt {
		f.installStaleLocked(f.set.gaps(f.pages))
	}
}

// installStaleLocked makes stale, derived from the adopted set, the list of
// stale ranges.
//
// Preconditions:
//   - f.staleUnbuilt is set: nothing stale has been taken yet.
//
// +checklocks:f.mu
func (f *MemoryFile) installStaleLocked(stale []pfnRange) {
	f.stale, f.staleHead, f.staleCursor, f.staleUnbuilt = stale, 0, [MaxOrder + 1]int{}, false
	if len(stale) == 0 {
		f.stale = nil
	}
}

// takeStaleLocked removes [r.start, end) from the stale range r (the low end
// of it) and returns its start.
//
// Preconditions:
//   - r is an element of f.stale and r.start < end <= r.end.
//
// +checklocks:f.mu
func (f *MemoryFile) takeStaleLocked(r *pfnRange, end uint64) uint64 {
	start := r.start
	r.start = end
	f.stalePages -= end - start
	for f.staleHead < len(f.stale) && f.stale[f.staleHead].start == f.stale[f.staleHead].end {
		f.staleHead++
	}
	if f.staleHead == len(f.stale) {
		f.stale, f.staleHead, f.staleCursor = nil, 0, [MaxOrder + 1]int{}
	}
	return start
}

// scrubStaleLocked scrubs the first stale range that holds an aligned block
// of the given order, from its low end to at least that block, and frees
// what it scrubbed. It returns false if no stale range holds such a block.
//
// +checklocks:f.mu
func (f *MemoryFile) scrubStaleLocked(order int) bool {
	f.buildStaleLocked()
	n := uint64(1) << order
	i := max(f.staleCursor[order], f.staleHead)
	for ; i < len(f.stale); i++ {
		r := &f.stale[i]
		if b := (r.start + n - 1) &^ (n - 1); b >= r.start && b+n <= r.end {
			break
		}
	}
	if i == len(f.stale) {
		f.staleCursor[order] = i
		return false
	}
	f.staleCursor[order] = i
	r := &f.stale[i]
	end := (r.start+n-1)&^(n-1) + n
	if w := min(r.start+lazyScrubPages, r.end); end < w {
		end = w
	}
	start := f.takeStaleLocked(r, end)
	f.decommit(start, end)
	f.free.insert(start, end)
	return true
}

// releaseWasteLocked punches out every freed folio and makes it free.
//
// +checklocks:f.mu
func (f *MemoryFile) releaseWasteLocked() {
	for _, r := range coalesce(f.waste) {
		f.decommit(r.start, r.end)
		f.free.insert(r.start, r.end)
	}
	f.waste, f.wastePages = f.waste[:0], 0
}

func (f *MemoryFile) wakeReleaser() {
	select {
	case f.releaserWake <- struct{}{}:
	default:
	}
}

// releaserMain is the releaser goroutine: it punches out freed folios and
// stale ranges and returns them to the free set, without holding f.mu
// across the system calls.
func (f *MemoryFile) releaserMain() {
	defer close(f.releaserDone)
	for {
		select {
		case <-f.releaserStop:
			return
		case <-f.releaserWake:
		}
		f.mu.Lock()
		small := f.wastePages < releaseBatchPages && f.stalePages == 0
		f.mu.Unlock()
		if small {
			select {
			case <-f.releaserStop:
				return
			case <-time.After(releaseDelay):
			}
		}
		for f.releaseOnce() {
			select {
			case <-f.releaserStop:
				return
			default:
			}
		}
	}
}

// releaseOnce runs one releaser round and reports whether it did anything.
func (f *MemoryFile) releaseOnce() bool {
	f.mu.Lock()
	if f.staleUnbuilt && !f.held {
		// Derive the stale ranges from the adopted set (which never
		// changes) without holding the lock: an allocation may build
		// them meanwhile, and then this copy is dropped.
		set, pages := f.set, f.pages
		f.mu.Unlock()
		stale := set.gaps(pages)
		f.mu.Lock()
		if f.staleUnbuilt {
			f.installStaleLocked(stale)
		}
	}
	if f.held {
		f.mu.Unlock()
		return false
	}
	// Double-buffer the waste list so that DecRef does not grow a new
	// slice after every round.
	waste := f.waste
	f.waste, f.wasteSpare = f.wasteSpare[:0], nil
	claimed := f.wastePages
	f.wastePages = 0
	var stale []pfnRange
	var stalePages uint64
	for f.staleHead < len(f.stale) && stalePages < releaserStalePages && len(stale) < releaserStaleRanges {
		r := &f.stale[f.staleHead]
		end := min(r.end, r.start+releaserStalePages-stalePages)
		stalePages += end - r.start
		start := f.takeStaleLocked(r, end)
		stale = append(stale, pfnRange{start: start, end: end})
	}
	claimed += stalePages
	f.inflightPages += claimed
	f.mu.Unlock()
	if claimed == 0 {
		return false
	}

	waste = coalesce(waste)
	for _, r := range waste {
		f.decommit(r.start, r.end)
	}
	for _, r := range stale {
		f.decommit(r.start, r.end)
	}

	f.mu.Lock()
	for _, r := range waste {
		f.free.insert(r.start, r.end)
	}
	for _, r := range stale {
		f.free.insert(r.start, r.end)
	}
	f.inflightPages -= claimed
	if f.wasteSpare == nil {
		f.wasteSpare = waste[:0]
	}
	f.cond.Broadcast()
	f.mu.Unlock()
	return true
}

// Drain scrubs every stale page and releases every freed folio now, and
// waits for the releaser's batches in flight, so that all memory not in an
// allocated folio is free and uncommitted when it returns. It is for
// shutdown accounting, tests and benchmarks; the allocator never needs it.
func (f *MemoryFile) Drain() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.buildStaleLocked()
	for {
		switch {
		case f.staleHead < len(f.stale):
			r := &f.stale[f.staleHead]
			end := r.end
			start := f.takeStaleLocked(r, end)
			f.decommit(start, end)
			f.free.insert(start, end)
		case len(f.waste) > 0:
			f.releaseWasteLocked()
		case f.inflightPages > 0:
			f.cond.Wait()
		default:
			return
		}
	}
}

// HoldReleases stops the background releaser from punching anything out of
// the file until ResumeReleases, and waits for a round already in flight to
// finish. Freed folios and stale ranges stay where they are (and keep their
// contents). A restart needs this on both sides: the outgoing sentry must
// not punch pages after it has handed the file over (the next sentry
// regards them as stale and may already have reused them), and the incoming
// sentry must not scrub the previous sentry's memory before it has
// acknowledged the handover (the previous sentry resumes if it refuses).
// While held, an allocation that finds no free page fails with ENOMEM
// rather than scrub stale or freed pages itself. Drain ignores the hold.
func (f *MemoryFile) HoldReleases() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.held = true
	for f.inflightPages > 0 {
		f.cond.Wait()
	}
}

// ResumeReleases undoes HoldReleases and wakes the releaser for whatever
// accumulated meanwhile.
func (f *MemoryFile) ResumeReleases() {
	f.mu.Lock()
	f.held = false
	f.mu.Unlock()
	f.wakeReleaser()
}
