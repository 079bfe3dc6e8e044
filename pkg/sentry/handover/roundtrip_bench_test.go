package handover

import (
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// envEchoPeer makes the test binary an echo peer (TestMain) on fd 3:
// "raw" answers each byte with blocking read(2)/write(2), "channel"
// answers each message with a Channel.
const envEchoPeer = "LIVESENTRY_TEST_ECHO_PEER"

func TestMain(m *testing.M) {
	switch os.Getenv(envEchoPeer) {
	case "raw":
		var b [1]byte
		for {
			if n, err := unix.Read(3, b[:]); n != 1 || err != nil {
				os.Exit(0)
			}
			unix.Write(3, b[:])
		}
	case "channel":
		ch, err := NewChannel(os.NewFile(3, "peer"))
		if err != nil {
			os.Exit(1)
		}
		for {
			var m Commit
			if _, err := ch.Recv(&m); err != nil {
				os.Exit(0)
			}
			ch.Send(&m)
		}
	}
	os.Exit(m.Run())
}

// BenchmarkCrossProcessRoundTrip is the floor of every hand-off inside a
// restart's blackout: one message to another process and its answer, the
// other process waiting in between as a sentry waits for its peer. Each
// round trip starts after the machine has been idle for a moment (5 ms:
// the peer's CPU may have gone idle, as in a restart). "raw" is two
// processes blocked in read(2); "channel" is the handover protocol's own
// Channel (JSON in one sendmsg, Go's network poller on both sides).
// Reported: the median and 90th percentile round trip.
//
//	go test ./pkg/sentry/handover -run '^$' -bench CrossProcessRoundTrip -benchtime 200x
func BenchmarkCrossProcessRoundTrip(b *testing.B) {
	for _, kind := range []string{"raw", "channel"} {
		b.Run(kind, func(b *testing.B) {
			ch, peer, err := Pair()
			if err != nil {
				b.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), envEchoPeer+"="+kind)
			cmd.ExtraFiles = []*os.File{peer}
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			peer.Close()
			// Our end's close ends the peer.
			defer cmd.Wait()
			defer ch.Close()
			var raw int
			if kind == "raw" {
				rc, err := ch.conn.SyscallConn()
				if err != nil {
					b.Fatal(err)
				}
				// A blocking dup of our end: read(2) sleeps in the kernel.
				rc.Control(func(fd uintptr) { raw, err = unix.Dup(int(fd)) })
				if err != nil {
					b.Fatal(err)
				}
				unix.SetNonblock(raw, false)
				defer unix.Close(raw)
			}
			rtts := make([]time.Duration, 0, b.N)
			var one [1]byte
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				time.Sleep(5 * time.Millisecond)
				b.StartTimer()
				start := time.Now()
				if kind == "raw" {
					unix.Write(raw, one[:])
					if n, err := unix.Read(raw, one[:]); n != 1 || err != nil {
						b.Fatalf("echo: %d, %v", n, err)
					}
				} else {
					if err := ch.Send(&Commit{PID: 1}); err != nil {
						b.Fatal(err)
					}
					var m Commit
					if _, err := ch.Recv(&m); err != nil || m.PID != 1 {
						b.Fatalf("echo: %+v, %v", m, err)
					}
				}
				rtts = append(rtts, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(rtts)
			b.ReportMetric(float64(rtts[len(rtts)/2])/1e3, "p50-µs")
			b.ReportMetric(float64(rtts[len(rtts)*9/10])/1e3, "p90-µs")
		})
	}
}
