package luo_test

import (
	"testing"

	"github.com/livesentry/livesentry/pkg/pgalloc"
	"github.com/livesentry/livesentry/pkg/sentry/kho"
	"github.com/livesentry/livesentry/pkg/sentry/luo"
	"github.com/livesentry/livesentry/pkg/sentry/memfd"
)

const benchMemfdSize = 1 << 30

// benchSentry boots a sentry with room for a 1 GiB memfd and fills one in
// chunks of the given size, which decides the page cache's folio size
// (4 KiB writes make order-0 folios, aligned 2 MiB writes order-9 ones).
func benchSentry(b *testing.B, chunk int) (*sentry, int32) { return benchSentryTB(b, chunk) }

func benchSentryTB(b testing.TB, chunk int) (*sentry, int32) {
	b.Helper()
	mf, err := pgalloc.New(pgalloc.Options{Size: 3 << 30})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { mf.Close() })
	k, err := kho.New(mf)
	if err != nil {
		b.Fatal(err)
	}
	s := &sentry{mf: mf, k: k, l: luo.New(k), fdt: newFDTable()}
	if err := s.l.RegisterFileHandler(memfd.NewLUOHandler(mf, k)); err != nil {
		b.Fatal(err)
	}
	fd := s.memfdWith(b, nil)
	f := s.memfd(b, fd)
	buf := make([]byte, chunk)
	for off := 0; off < benchMemfdSize; off += chunk {
		buf[0] = byte(off / chunk)
		if _, err := f.Pwrite(buf, int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	return s, fd
}

var folioSizes = []struct {
	name  string
	chunk int
}{
	{"folio=4KiB", 4 << 10},
	{"folio=2MiB", 2 << 20},
}

// BenchmarkPreserve measures PRESERVE_FD of a 1 GiB memfd without holes:
// freeze, pin, KHO-preserve every folio, write the folio array and
// preserve it. Closing the session (unpreserve) is not timed.
func BenchmarkPreserve(b *testing.B) {
	for _, fs := range folioSizes {
		b.Run(fs.name, func(b *testing.B) {
			s, fd := benchSentry(b, fs.chunk)
			dev, _ := s.openDevice(b)
			folios := benchMemfdSize / fs.chunk
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				sfd := s.createSession(b, dev, "bench")
				b.StartTimer()
				if err := s.preserveFD(sfd, fd, 1); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				s.fdt.close(b, sfd)
				b.StartTimer()
			}
			reportPerFolio(b, folios)
		})
	}
}

// BenchmarkRetrieve measures RETRIEVE_FD of a 1 GiB memfd after a
// restart: read the record and the folio array, KHO-restore every folio
// and build the page cache. Each iteration is one more restart of the same
// memory file; everything but the retrieve is untimed.
func BenchmarkRetrieve(b *testing.B) {
	for _, fs := range folioSizes {
		b.Run(fs.name, func(b *testing.B) {
			s, fd := benchSentry(b, fs.chunk)
			dev, _ := s.openDevice(b)
			if err := s.preserveFD(s.createSession(b, dev, "bench"), fd, 1); err != nil {
				b.Fatal(err)
			}
			folios := benchMemfdSize / fs.chunk
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				n := s.restart(b)
				dev2, _ := n.openDevice(b)
				r := n.retrieveSession(b, dev2, "bench")
				n.mf.Drain()
				b.StartTimer()
				got, err := n.retrieveFD(r, 1)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				if sz := n.memfd(b, got).Size(); sz != benchMemfdSize {
					b.Fatalf("retrieved memfd has size %d", sz)
				}
				if err := n.finish(r); err != nil {
					b.Fatal(err)
				}
				if err := n.preserveFD(n.createSession(b, dev2, "bench"), got, 1); err != nil {
					b.Fatal(err)
				}
				s = n
				b.StartTimer()
			}
			reportPerFolio(b, folios)
		})
	}
}

func reportPerFolio(b *testing.B, folios int) {
	ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(ns/float64(folios), "ns/folio")
	b.ReportMetric(ns/1e6, "ms/op")
}
