package luo_test

import (
	"testing"
	"time"

	"github.com/livesentry/livesentry/pkg/sentry/luo"
)

// BenchmarkSerializeFormats measures what choosing a format costs inside
// the blackout: SerializeWith of 500 one-page memfds (one session) whose
// records are already in the chosen format, against one that converts them
// (memfd-v2 to memfd-v1 and back), interleaved in the same run. Each
// iteration serializes for a memfd-v1 peer (converting), for a memfd-v2
// peer (converting back) and for a memfd-v2 peer again (nothing to
// convert); Abort, which undoes each, is timed too. Reported: ns per file
// with and without conversion, and their ratio.
func BenchmarkSerializeFormats(b *testing.B) {
	s := coldBootBuild(b, v2Build)
	dev, _ := s.openDevice(b)
	sfd := s.createSession(b, dev, "bench")
	const files = 500
	for i := 0; i < files; i++ {
		if err := s.preserveFD(sfd, s.memfdWith(b, []byte{byte(i)}), uint64(i)); err != nil {
			b.Fatal(err)
		}
	}
	native := luo.SerializeOptions{PeerReads: []string{"luo-v1", "luo-session-v2", "memfd-v2", "memfd-v1"}}
	older := luo.SerializeOptions{PeerReads: []string{"luo-v1", "luo-session-v2", "memfd-v1"}}
	var tSame, tConvert time.Duration
	serialize := func(opts luo.SerializeOptions) time.Duration {
		start := time.Now()
		if err := s.l.SerializeWith(opts); err != nil {
			b.Fatal(err)
		}
		s.l.Abort()
		return time.Since(start)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tConvert += serialize(older)
		tConvert += serialize(native)
		tSame += 2 * serialize(native)
	}
	b.ReportMetric(float64(tSame.Nanoseconds())/float64(2*b.N*files), "ns/file-same")
	b.ReportMetric(float64(tConvert.Nanoseconds())/float64(2*b.N*files), "ns/file-converted")
	b.ReportMetric(float64(tConvert)/float64(tSame), "converted/same")
}
