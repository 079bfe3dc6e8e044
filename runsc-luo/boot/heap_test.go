package boot

import (
	"runtime"
	"runtime/debug"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// minorFaults is this process's count of minor page faults.
func minorFaults(t *testing.T) int64 {
	t.Helper()
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return ru.Minflt
}

//go:noinline
func deepStack(n int) byte {
	var b [1024]byte
	b[n%len(b)] = byte(n)
	if n == 0 {
		return b[0]
	}
	return deepStack(n-1) + b[n%len(b)]
}

// TestPopulatedHeapServesABootWithoutFaults allocates what a boot does (small
// objects on every processor, goroutines whose stacks grow) once after the
// runtime gave its free memory back, and once after populateHeap: the
// first faults in hundreds of pages, the second next to none.
func TestPopulatedHeapServesABootWithoutFaults(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's shadow memory takes page faults of its own")
	}
	gcPercent := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(gcPercent)
	boot := func() int64 {
		before := minorFaults(t)
		sinks := make([][][]byte, 2*runtime.GOMAXPROCS(0))
		var wg sync.WaitGroup
		for g := range sinks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 200 {
					sinks[g] = append(sinks[g], make([]byte, 512+16*i))
				}
				deepStack(40)
			}()
		}
		wg.Wait()
		runtime.KeepAlive(sinks)
		return minorFaults(t) - before
	}
	debug.FreeOSMemory()
	released := boot()
	debug.FreeOSMemory()
	n, err := populateHeap()
	if err != nil {
		t.Fatal(err)
	}
	populated := boot()
	t.Logf("heap mapping %d KiB; faults: %d with the free heap released, %d after populateHeap", n>>10, released, populated)
	if released < 50 {
		// Transparent huge pages (enabled "always") back the heap
		// with a fault per 2 MiB.
		t.Skipf("the allocation faulted in only %d pages with the free heap released: too few to tell populateHeap's effect", released)
	}
	if populated > released/10 {
		t.Errorf("after populateHeap the allocation faulted in %d pages, want at most a tenth of %d", populated, released)
	}
}

func TestMappingOfFindsTheHeapAndRefusesAnUnmappedAddress(t *testing.T) {
	b := make([]byte, 1<<20)
	start, end, err := mappingOf(addressOf(b))
	if err != nil {
		t.Fatal(err)
	}
	if a := addressOf(b); a < start || a+uintptr(len(b)) > end {
		t.Errorf("mapping %#x-%#x does not hold the slice at %#x", start, end, a)
	}
	if _, _, err := mappingOf(0); err == nil {
		t.Error("address 0: want an error, got a mapping")
	}
}
