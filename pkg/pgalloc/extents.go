package pgalloc

import "github.com/google/btree"

// pfnRange is a range of pages [start, end), in PFNs.
type pfnRange struct{ start, end uint64 }

// extent is a range of free pages [start, end), in PFNs.
type extent struct {
	start, end uint64

	// order is the largest order, capped at MaxOrder, of a naturally
	// aligned block that fits in the extent: the index of the byOrder tree
	// that holds it.
	order int
}

func extentLessByEnd(a, b *extent) bool { return a.end < b.end }

// extentSet is the free space of a MemoryFile: coalesced, disjoint extents
// kept in B-trees.
//
// Every extent is in byEnd and in exactly one byOrder tree, chosen by the
// largest naturally aligned block it can hold. Both kinds of tree are
// ordered by the extent's end, so carving a block from the low end of an
// extent (the common case) changes no key and moves nothing.
//
// Placement policy (buddy-style, deterministic): an order-k allocation takes
// the lowest-addressed extent among those whose largest aligned block has
// the smallest order ≥ k, and within it the lowest naturally aligned block.
// Like a buddy allocator, it splits the smallest sufficient free block first
// and so keeps large aligned blocks intact for large folios. The same
// sequence of calls always yields the same PFNs.
type extentSet struct {
	byEnd   *btree.BTreeG[*extent]
	byOrder [MaxOrder + 1]*btree.BTreeG[*extent]
	pages   uint64
}

const btreeDegree = 16

func newExtentSet() extentSet {
	var s extentSet
	s.byEnd = btree.NewG(btreeDegree, extentLessByEnd)
	for i := range s.byOrder {
		s.byOrder[i] = btree.NewG(btreeDegree, extentLessByEnd)
	}
	return s
}

// capacityOrder returns the largest order ≤ MaxOrder of a naturally aligned
// block inside [start, end), or -1 if the range is empty.
func capacityOrder(start, end uint64) int {
	for o := MaxOrder; o >= 0; o-- {
		n := uint64(1) << o
		b := (start + n - 1) &^ (n - 1)
		if b+n <= end && b >= start {
			return o
		}
	}
	return -1
}

// reindex moves e to the byOrder tree that matches its current bounds.
// e's key (end) must be the one it was indexed under.
func (s *extentSet) reindex(e *extent) {
	o := capacityOrder(e.start, e.end)
	if o == e.order {
		return
	}
	s.byOrder[e.order].Delete(e)
	e.order = o
	s.byOrder[o].ReplaceOrInsert(e)
}

func (s *extentSet) add(e *extent) {
	e.order = capacityOrder(e.start, e.end)
	s.byEnd.ReplaceOrInsert(e)
	s.byOrder[e.order].ReplaceOrInsert(e)
}

func (s *extentSet) remove(e *extent) {
	s.byEnd.Delete(e)
	s.byOrder[e.order].Delete(e)
}

// insert adds the free range [start, end), merging it with the extents it
// touches.
//
// Preconditions:
//   - start < end.
//   - No page of [start, end) is already in s.
func (s *extentSet) insert(start, end uint64) {
	s.pages += end - start
	pred, hasPred := s.byEnd.Get(&extent{end: start})
	var succ *extent
	s.byEnd.AscendGreaterOrEqual(&extent{end: end + 1}, func(e *extent) bool {
		if e.start == end {
			succ = e
		}
		return false
	})
	switch {
	case hasPred && succ != nil:
		s.remove(pred)
		succ.start = pred.start
		s.reindex(succ)
	case hasPred:
		s.remove(pred)
		pred.end = end
		s.add(pred)
	case succ != nil:
		succ.start = start
		s.reindex(succ)
	default:
		s.add(&extent{start: start, end: end})
	}
}

// alloc removes and returns the first naturally aligned block of 2^order
// pages under the placement policy, or false if no extent can hold one.
func (s *extentSet) alloc(order int) (uint64, bool) {
	var e *extent
	for o := order; o <= MaxOrder; o++ {
		if m, ok := s.byOrder[o].Min(); ok {
			e = m
			break
		}
	}
	if e == nil {
		return 0, false
	}
	n := uint64(1) << order
	b := (e.start + n - 1) &^ (n - 1)
	s.pages -= n
	leftEmpty, rightEmpty := b == e.start, b+n == e.end
	switch {
	case leftEmpty && rightEmpty:
		s.remove(e)
	case leftEmpty:
		e.start = b + n
		s.reindex(e)
	case rightEmpty:
		s.remove(e)
		e.end = b
		s.add(e)
	default:
		left := &extent{start: e.start, end: b}
		e.start = b + n
		s.reindex(e)
		s.add(left)
	}
	return b, true
}
