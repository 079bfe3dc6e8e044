package pgalloc

import (
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"
)

// BitmapBits is the number of blocks one Bitmap describes: one page of
// bits, the size of a KHO bitmap (struct kho_mem_phys_bits) or radix-tree
// leaf.
const BitmapBits = PageSize * 8

// Bitmap is one page of preservation bits. Bit i of word w is bit 64*w+i,
// the bit order of a Linux bitmap of unsigned longs on a little-endian
// machine.
type Bitmap [BitmapBits / 64]uint64

// Bitmaps is a preserved set as sparse per-order bitmaps, the form in which
// KHO hands it over: bit j of Bitmaps[o][i] means that the block of order o
// at PFN (i*BitmapBits + j) << o is preserved. A nil or missing Bitmap has
// no bit set.
type Bitmaps [MaxOrder + 1][]*Bitmap

// bit reports whether block bi of order o is set.
func (s *Bitmaps) bit(o int, bi uint64) bool {
	i := bi / BitmapBits
	if i >= uint64(len(s[o])) || s[o][i] == nil {
		return false
	}
	j := bi % BitmapBits
	return s[o][i][j/64]&(1<<(j%64)) != 0
}

// word returns the 64 bits of order o that start at block bi, a multiple
// of 64.
func (s *Bitmaps) word(o int, bi uint64) uint64 {
	i := bi / BitmapBits
	if i >= uint64(len(s[o])) || s[o][i] == nil {
		return 0
	}
	return s[o][i][bi%BitmapBits/64]
}

// firstSet returns the first set block of order o in [lo, hi).
func (s *Bitmaps) firstSet(o int, lo, hi uint64) (uint64, bool) {
	for lo < hi {
		i := lo / BitmapBits
		if i >= uint64(len(s[o])) {
			return 0, false
		}
		b := s[o][i]
		if b == nil {
			lo = (i + 1) * BitmapBits
			continue
		}
		w := b[lo%BitmapBits/64] >> (lo % 64)
		if w != 0 {
			if bi := lo + uint64(bits.TrailingZeros64(w)); bi < hi {
				return bi, true
			}
			return 0, false
		}
		lo = (lo + 64) &^ 63
	}
	return 0, false
}

// AdoptBitmaps is Adopt for a preserved set given as per-order bitmaps. It
// costs time in proportion to the bitmaps, whatever the number of blocks in
// them: it checks every set bit (no block at PFN 0 or past the end of the
// file, no block overlapping a block of another order) and counts the
// blocks a word at a time. Like AdoptRuns, it writes no page metadata (a
// section is filled from the bitmaps when it is first needed) and builds
// no list of stale ranges (the releaser derives it from the bitmaps once
// releases resume, or the first allocation that needs a stale page does).
// It changes nothing if a bit is bad; the error names the block. It takes
// ownership of set: the caller must not modify the bitmaps afterwards.
func (f *MemoryFile) AdoptBitmaps(set Bitmaps) error {
	var folios [MaxOrder + 1]uint64
	sections := make([]bool, f.numSections())
	for o := range set {
		valid := f.pages >> o // blocks of order o that end inside the file
		for i, b := range set[o] {
			if b == nil {
				continue
			}
			base := uint64(i) * BitmapBits
			if o == 0 && base+BitmapBits <= valid {
				// Every block of this bitmap ends inside the file and
				// lies in one section (checked at compile time), and order
				// 0 overlaps nothing here (the higher orders check
				// against it): only PFN 0 is left to check, then the
				// bits are counted.
				if base == 0 && b[0]&1 != 0 {
					return fmt.Errorf("adopting preserved block %v: PFN 0 is reserved: %w", Block{Order: o}, unix.EINVAL)
				}
				if n := countBits(b); n > 0 {
					folios[0] += n
					sections[base>>sectionShift] = true
				}
				continue
			}
			for w, word := range b {
				if word == 0 {
					continue
				}
				first := base + uint64(w)*64
				if first == 0 && word&1 != 0 {
					return fmt.Errorf("adopting preserved block %v: PFN 0 is reserved: %w", Block{Order: o}, unix.EINVAL)
				}
				last := first + 63 - uint64(bits.LeadingZeros64(word))
				if last >= valid {
					bi, _ := set.firstSet(o, max(first, valid), last+1)
					return fmt.Errorf("adopting preserved block %v: outside the %d-page memory file: %w", Block{PFN: bi << o, Order: o}, f.pages, unix.ERANGE)
				}
				if o > 0 {
					if err := checkOverlap(&set, o, first, word); err != nil {
						return err
					}
				}
				folios[o] += uint64(bits.OnesCount64(word))
				// A word covers 64 aligned blocks, at most 2^16
				// aligned pages: all in one section.
				sections[first<<o>>sectionShift] = true
			}
		}
	}
	return f.adoptSet(&set, folios, sections)
}

// An order-0 bitmap, aligned to its size, lies in one section of page
// metadata: this fails to compile if it is larger than a section.
const _ = uint64(1)<<sectionShift - BitmapBits

// countBits returns the number of bits set in b.
func countBits(b *Bitmap) uint64 {
	var n int
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return uint64(n)
}

// checkOverlap checks the blocks of order o > 0 set in word, whose first
// block is first, against every lower order. Two aligned blocks overlap
// only if the smaller one lies inside the larger one, so this finds every
// overlap once every order has been checked. It reads each lower-order word
// under word's blocks once, and looks at single blocks only where one is
// set.
func checkOverlap(set *Bitmaps, o int, first, word uint64) error {
	for lo := 0; lo < o; lo++ {
		shift := uint(o - lo)
		start, end := first<<shift, (first+64)<<shift
		if _, ok := set.firstSet(lo, start, end); !ok {
			continue
		}
		for w := word; w != 0; w &= w - 1 {
			bi := first + uint64(bits.TrailingZeros64(w))
			if x, ok := set.firstSet(lo, bi<<shift, (bi+1)<<shift); ok {
				return fmt.Errorf("adopting preserved block %v: overlaps preserved block %v: %w", Block{PFN: x << lo, Order: lo}, Block{PFN: bi << o, Order: o}, unix.EINVAL)
			}
		}
	}
	return nil
}

// fill implements adoptedSet.fill.
func (s *Bitmaps) fill(start, end uint64, set func(pfn uint64, pi pageInfo)) {
	for o := range s {
		// Blocks whose head is in [start, end): start is aligned to a
		// chunk, not to every order, so round up.
		lo := (start + 1<<o - 1) >> o
		for bi, ok := s.firstSet(o, lo, (end+1<<o-1)>>o); ok; bi, ok = s.firstSet(o, bi+1, (end+1<<o-1)>>o) {
			set(bi<<o, pageInfo{refs: 1, order: uint8(o), head: true})
		}
	}
}

// gaps implements adoptedSet.gaps: the pages of [1, pages) that no block
// covers, found 64 pages at a time from every order's bits.
func (s *Bitmaps) gaps(pages uint64) []pfnRange {
	var out []pfnRange
	inGap, gapStart := true, uint64(1)
	for win := uint64(0); win*64 < pages; win++ {
		cov := s.coverage(win)
		if win == 0 {
			cov |= 1 // PFN 0 is never free
		}
		for pos := uint(0); pos < 64; {
			if inGap {
				rest := cov >> pos
				if rest == 0 {
					break
				}
				pos += uint(bits.TrailingZeros64(rest))
				if end := win*64 + uint64(pos); gapStart < end {
					out = append(out, pfnRange{start: gapStart, end: end})
				}
				inGap = false
				continue
			}
			rest := ^cov >> pos
			if rest == 0 {
				break
			}
			pos += uint(bits.TrailingZeros64(rest))
			inGap, gapStart = true, win*64+uint64(pos)
		}
	}
	if inGap && gapStart < pages {
		out = append(out, pfnRange{start: gapStart, end: pages})
	}
	return out
}

// coverage returns the pages of window win (pages [64*win, 64*win+64))
// that some block covers, as a bit per page.
func (s *Bitmaps) coverage(win uint64) uint64 {
	cov := s.word(0, win*64)
	for o := 1; o <= MaxOrder; o++ {
		if cov == ^uint64(0) {
			break
		}
		if o >= 6 {
			// One block covers the whole window.
			if s.bit(o, win>>(o-6)) {
				cov = ^uint64(0)
			}
			continue
		}
		per := uint(64 >> o) // blocks of order o in the window
		bi := win * uint64(per)
		x := s.word(o, bi&^63) >> (bi % 64) & (1<<per - 1)
		for ; x != 0; x &= x - 1 {
			j := uint(bits.TrailingZeros64(x))
			cov |= (1<<(1<<o) - 1) << (j << o)
		}
	}
	return cov
}
