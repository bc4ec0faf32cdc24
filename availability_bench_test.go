package noisetor

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkPreambleReject: the responder's CPU per key-less KK preamble it
// rejects (the whole server handshake from bytes, without the TCP accept),
// with 1 and with 10,000 keyring peers, in the same run. Goal: ratio ≤ 2.
func BenchmarkPreambleReject(b *testing.B) {
	responder := func(peers int) *Config {
		ring := new(Keyring)
		for i := range peers {
			k := mustKey(b)
			if err := ring.Add(Peer{Name: fmt.Sprintf("p%d", i), PublicKey: k.PublicKey()}); err != nil {
				b.Fatal(err)
			}
		}
		k, _ := GenerateKey(X25519, nil)
		cfg := &Config{StaticKey: k, Keyring: ring, Logger: slog.New(slog.DiscardHandler)}
		cfg.keys().findKK(ring, &preamble{}, make([]byte, preambleLen), time.Now()) // build the index
		return cfg
	}
	small, large := responder(1), responder(10000)
	flight := func() []byte {
		pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
		raw := pre.marshal()
		rand.Read(raw[8:])
		return appendMessage(raw, randBytes(48))
	}
	const batch = 64
	flights := make([][]byte, batch)
	for i := range flights {
		flights[i] = flight()
	}
	reject := func(cfg *Config) time.Duration {
		start := time.Now()
		for _, f := range flights {
			if Server(newScriptConn(f), cfg).HandshakeContext(context.Background()) == nil {
				b.Fatal("a random preamble was accepted")
			}
		}
		return time.Since(start)
	}
	var tSmall, tLarge time.Duration
	n := 0
	for b.Loop() {
		tSmall += reject(small)
		tLarge += reject(large)
		n += batch
	}
	b.ReportMetric(float64(tSmall.Nanoseconds())/float64(n), "ns/reject-1peer")
	b.ReportMetric(float64(tLarge.Nanoseconds())/float64(n), "ns/reject-10kpeers")
	b.ReportMetric(float64(tLarge)/float64(tSmall), "ratio-10k/1")
}

// BenchmarkHandshakeUnderFlood: a member's handshakes per second with a real
// Listener on 127.0.0.1, alone and while an outsider who knows every public
// key floods forged KK preambles as fast as it can, alternating in the same
// run; and the static DH the listener performs per forged connection.
// Goals: ratio ≥ 0.8, DH per forged connection 0.
func BenchmarkHandshakeUnderFlood(b *testing.B) {
	ps := newTestPeers(b, "server", "client")
	key := &countingKey{PrivateKey: ps["server"].key}
	ps["server"].cfg.StaticKey = key
	ps["server"].cfg.Logger = slog.New(slog.DiscardHandler)
	ps["client"].cfg.Logger = slog.New(slog.DiscardHandler)
	ln := listenServing(b, ps["server"].cfg, nil)
	addr := ln.Addr().String()
	dialer := &Dialer{Config: ps["client"].cfg, Peer: "server"}
	member := func(d time.Duration) int {
		n := 0
		for end := time.Now().Add(d); time.Now().Before(end); n++ {
			c, err := dialer.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
		return n
	}
	member(100 * time.Millisecond) // derive the pair keys

	var flooding atomic.Bool
	var forged atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// The outsider's best forgery, sealed with a pair key of its own (made
	// once: per connection the flood costs it only an HMAC and a dial).
	outsider, _ := GenerateKey(X25519, nil)
	server := key.PublicKey()
	ss, _ := outsider.DH(server)
	forgedKey, _ := derivePairKey(ss, outsider.PublicKey(), server)
	junk := randBytes(48)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if !flooding.Load() {
					time.Sleep(time.Millisecond)
					continue
				}
				c, err := net.Dial("tcp", addr)
				if err != nil {
					continue
				}
				pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
				rand.Read(pre.salt[:])
				c.Write(appendMessage(pre.sealKK(forgedKey, time.Now()), junk))
				c.Close()
				forged.Add(1)
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()

	const phase = 250 * time.Millisecond
	var quiet, flooded int
	var dhFlood int64
	var forgedTotal int64
	for b.Loop() {
		quiet += member(phase)
		flooding.Store(true)
		time.Sleep(10 * time.Millisecond) // let the flood reach full speed
		dh0, f0 := key.dh.Load(), forged.Load()
		got := member(phase)
		flooded += got
		flooding.Store(false)
		time.Sleep(10 * time.Millisecond)
		// Each member handshake costs 2 static DH (es, ss) at the responder.
		dhFlood += key.dh.Load() - dh0 - 2*int64(got)
		forgedTotal += forged.Load() - f0
	}
	b.ReportMetric(float64(quiet)/(float64(b.N)*phase.Seconds()), "member-hs/s")
	b.ReportMetric(float64(flooded)/(float64(b.N)*phase.Seconds()), "member-hs/s-flooded")
	b.ReportMetric(float64(flooded)/float64(quiet), "ratio-flooded/quiet")
	b.ReportMetric(float64(forgedTotal)/(float64(b.N)*phase.Seconds()), "forged-conn/s")
	b.ReportMetric(float64(dhFlood)/float64(max(forgedTotal, 1)), "DH/forged-conn")
}
