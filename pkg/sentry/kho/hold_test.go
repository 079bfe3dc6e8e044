package kho

import (
	"testing"
	"time"
)

// After Finalize the file is the next sentry's: a page this sentry frees
// must keep its contents (the next sentry may already use it), until Abort
// takes the file back.
func TestFinalizeHoldsReleasesUntilAbort(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		mf := newFile(t, 64<<20)
		k, err := New(mf)
		if err != nil {
			t.Fatal(err)
		}
		f, err := mf.Allocate(0)
		if err != nil {
			t.Fatal(err)
		}
		fill(mf.Bytes(f), 9)
		view := page(t, reopen(t, mf), f.Addr())
		if err := k.FinalizeFormat(format); err != nil {
			t.Fatal(err)
		}
		mf.DecRef(f)
		time.Sleep(20 * time.Millisecond) // several releaser delays
		if !filled(view, 9) || mf.Stats().ReleasingPages == 0 {
			t.Fatalf("a page freed after Finalize was released (%d pages releasing)", mf.Stats().ReleasingPages)
		}
		if err := k.Abort(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for mf.Stats().ReleasingPages != 0 {
			if time.Now().After(deadline) {
				t.Fatal("pages freed while finalized are still not released after Abort")
			}
			time.Sleep(time.Millisecond)
		}
		if !isZero(view) {
			t.Fatal("the freed page still holds data after Abort")
		}
	})
}
