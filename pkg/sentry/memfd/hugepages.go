package memfd

import (
	"os"
	"strconv"
	"strings"
	"sync"
)

// hugePageShifts are log2 of the huge page sizes an MFD_HUGETLB memfd may
// ask for: the host's hstates (/sys/kernel/mm/hugepages/hugepages-<N>kB),
// as hugetlb_file_setup accepts only sizes the kernel has an hstate for. A
// host that does not list them is taken to have 2 MiB pages only.
var hugePageShifts = sync.OnceValue(func() map[uint]bool {
	shifts := map[uint]bool{}
	ents, err := os.ReadDir("/sys/kernel/mm/hugepages")
	if err == nil {
		for _, e := range ents {
			kb, ok := strings.CutPrefix(e.Name(), "hugepages-")
			if !ok {
				continue
			}
			n, err := strconv.ParseUint(strings.TrimSuffix(kb, "kB"), 10, 64)
			if err != nil || n == 0 || n&(n-1) != 0 {
				continue
			}
			shift := uint(10)
			for ; n > 1; n >>= 1 {
				shift++
			}
			shifts[shift] = true
		}
	}
	if len(shifts) == 0 {
		shifts[21] = true
	}
	return shifts
})

// defaultHugePageShift is the default huge page size's shift (the
// smallest hstate, as default_hstate is on x86 unless the command line
// says otherwise).
func defaultHugePageShift() uint {
	def := uint(0)
	for s := range hugePageShifts() {
		if def == 0 || s < def {
			def = s
		}
	}
	return def
}
