package noisetor

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/noisetor/noisetor/tortest"
)

// TestTorAvailabilityAuthorizedFlood: over the private Tor network, a member
// authorized at both layers (its own Tor client-authorization key and its
// own noisetor key, on its own tor) opens many onion streams to the service,
// some idle and some stalled after a genuine KK message 1. In wire version 1
// eight of the latter locked every member out; now the other member keeps
// getting in.
func TestTorAvailabilityAuthorizedFlood(t *testing.T) {
	srv, cli := torPair(t)
	n := tortest.Shared(t)
	p := newTorPeers(t, 443)

	// Mallory: a second member with its own keys and its own tor.
	malloryKey := torStaticKey(t)
	malloryAuth, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.server.Keyring.Add(Peer{Name: "mallory", PublicKey: malloryKey.PublicKey(), ClientAuth: malloryAuth.PublicKey()}); err != nil {
		t.Fatal(err)
	}
	malloryRing, _ := NewKeyring(Peer{Name: "server", PublicKey: p.server.StaticKey.PublicKey(), Address: p.addr})
	mallory := &Config{StaticKey: malloryKey, Keyring: malloryRing}
	dir := t.TempDir()
	malloryTor, spare, _ := torStartPair(t, n, filepath.Join(dir, "a"), filepath.Join(dir, "b"), torTestLogger(t), torTestLogger(t))
	spare.Close()
	defer malloryTor.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ol, err := srv.ListenOnion(ctx, &OnionConfig{Key: p.onionKey, Port: 443, Keyring: p.server.Keyring})
	if err != nil {
		t.Fatal(err)
	}
	defer ol.Close()
	l := NewListener(ol, p.server)
	defer l.Close()
	go torServeEcho(l)

	walletDialer := &Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey}}
	memberIn := func(what string) time.Duration {
		t.Helper()
		start := time.Now()
		dctx, dcancel := context.WithTimeout(ctx, 60*time.Second)
		defer dcancel()
		c, _, err := torFirstByte(dctx, walletDialer, p.addr)
		if err != nil {
			t.Fatalf("%s: wallet: %v", what, err)
		}
		torEcho(t, c, []byte("hello"))
		c.Close()
		return time.Since(start)
	}
	memberIn("before the attack")

	// The attack: idle streams and genuine stalled handshakes, opened in
	// parallel for as long as the test runs.
	raw := &TorDialer{Tor: malloryTor, ClientAuth: malloryAuth}
	server := p.server.StaticKey.PublicKey()
	var opened, stalled atomic.Int64
	var mu sync.Mutex
	var held []net.Conn
	defer func() {
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()
	actx, acancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; actx.Err() == nil; i++ {
				sctx, scancel := context.WithTimeout(actx, 20*time.Second)
				c, err := raw.DialContext(sctx, "tcp", p.addr)
				scancel()
				if err != nil {
					continue
				}
				opened.Add(1)
				if (w+i)%2 == 0 {
					c.Write(genuineFlight(t, mallory, server, KK))
					stalled.Add(1)
				}
				mu.Lock()
				held = append(held, c)
				mu.Unlock()
			}
		}()
	}
	// Let the attack build up, then the wallet must keep getting in.
	for opened.Load() < 100 && ctx.Err() == nil {
		time.Sleep(100 * time.Millisecond)
	}
	var slowest time.Duration
	for i := range 5 {
		slowest = max(slowest, memberIn(fmt.Sprintf("under attack, attempt %d", i+1)))
	}
	acancel()
	wg.Wait()
	torRecord(t, "authorized member flooding the onion service (%d streams, %d stalled after a genuine message 1): the other member's 5 dials all got in, slowest %v",
		opened.Load(), stalled.Load(), slowest.Round(time.Millisecond))
}
