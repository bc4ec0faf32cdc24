//go:build embedtor

package tortest

import (
	"context"
	"testing"
	"time"
)

// BenchmarkFixtures compares the two fixtures in one run: each iteration
// starts the network on the system tor and then on the embedded tor, adds
// one tor with StartTor to each, and measures the network's start (keys
// included), the added tor's bootstrap, and the memory of a tor (resident,
// and the private part of it): the mean over the five, once all have
// bootstrapped. It needs tor and tor-gencert in
// PATH as well:
//
//	go test -tags embedtor -run '^$' -bench Fixtures -benchtime 3x ./tortest
func BenchmarkFixtures(b *testing.B) {
	if _, err := findTor("tor"); err != nil {
		b.Skip(err)
	}
	kinds := []struct{ name, torPath string }{{"system", "tor"}, {"embedded", ""}}
	type sums struct{ start, client, rss, uss float64 }
	total := make([]sums, len(kinds))
	for i := 0; i < b.N; i++ {
		for k, kind := range kinds {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			n, err := Start(ctx, &Options{TorPath: kind.torPath})
			if err != nil {
				cancel()
				b.Fatalf("%s: %v", kind.name, err)
			}
			if n.Embedded != (kind.torPath == "") {
				b.Fatalf("%s: Embedded = %v", kind.name, n.Embedded)
			}
			tr, err := n.StartTor(ctx, nil)
			cancel()
			if err != nil {
				n.Close()
				b.Fatalf("%s: %v", kind.name, err)
			}
			var rss, uss int64
			procs := append(append([]*torProc(nil), n.nodes...), tr.p)
			for _, p := range procs {
				r, s, err := procMemory(p.pid())
				if err != nil {
					n.Close()
					b.Fatalf("%s: %v", kind.name, err)
				}
				rss, uss = rss+r, uss+s
			}
			n.Close()
			t := &total[k]
			t.start += n.StartupTime.Seconds()
			t.client += tr.StartupTime.Seconds()
			t.rss += float64(rss) / float64(len(procs)) / 1e6
			t.uss += float64(uss) / float64(len(procs)) / 1e6
			b.Logf("%s: network %.1fs, StartTor %.1fs, per tor %.1f MB RSS, of which %.1f MB private", kind.name,
				n.StartupTime.Seconds(), tr.StartupTime.Seconds(),
				float64(rss)/float64(len(procs))/1e6, float64(uss)/float64(len(procs))/1e6)
		}
	}
	for k, kind := range kinds {
		t, n := total[k], float64(b.N)
		b.ReportMetric(t.start/n, kind.name+"-start-s")
		b.ReportMetric(t.client/n, kind.name+"-StartTor-s")
		b.ReportMetric(t.rss/n, kind.name+"-MB-RSS/tor")
		b.ReportMetric(t.uss/n, kind.name+"-MB-private/tor")
	}
	b.ReportMetric(0, "ns/op")
}
