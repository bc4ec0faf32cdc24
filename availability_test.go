package noisetor

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Availability tests: attackers who know every public key, or hold a
// keyring key of their own, try to keep a member out of a real Listener on
// 127.0.0.1. The member dials through a proxy that delays every byte, as a
// Tor circuit does, from another loopback address than the attacker's. The
// assertion is that the member keeps getting in, attempt after attempt.

// memberKeepsGettingIn dials the listener as the member "client" through a
// delaying proxy attempts times in a row, and fails the test at the first
// attempt that does not reach Accept.
func (s *abuseServer) memberKeepsGettingIn(t *testing.T, oneWay time.Duration, attempts int) {
	t.Helper()
	proxy := delayProxy(t, s.addr, "127.0.0.2", oneWay)
	for i := range attempts {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 20*oneWay+5*time.Second)
		c, err := (&Dialer{Config: s.client, Peer: "server"}).DialContext(ctx, "tcp", proxy)
		if err == nil {
			select {
			case sc := <-s.accepted:
				sc.Close()
			case <-ctx.Done():
				err = errors.New("handshake done but Accept did not return the connection")
			}
			c.Close()
		}
		cancel()
		if err != nil {
			t.Fatalf("member attempt %d of %d under attack: %v", i+1, attempts, err)
		}
		t.Logf("member attempt %d: in after %v", i+1, time.Since(start).Round(time.Millisecond))
	}
}

// stallWithFlight opens n connections that each send flight and then stall,
// keeping them open until the test ends.
func stallWithFlight(t *testing.T, addr string, n int, flight func() []byte) {
	t.Helper()
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("stalling connection: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		if f := flight(); f != nil {
			c.Write(f)
		}
	}
}

// genuineFlight is what a keyring member sends first: a valid preamble and
// message 1, from its own key.
func genuineFlight(t *testing.T, member *Config, server PublicKey, pattern Pattern) []byte {
	t.Helper()
	pre := preamble{pattern: pattern, curve: X25519, cipher: ChaChaPoly}
	rand.Read(pre.salt[:])
	var raw []byte
	if pattern == KK {
		k, err := member.keys().secrets(server)
		if err != nil {
			t.Fatal(err)
		}
		raw = pre.sealKK(k.toPeer, time.Now())
	} else {
		raw = pre.sealXK(server)
	}
	hs, err := newHandshakeState(handshakeParams{initiator: true, pattern: pattern, cipher: ChaChaPoly,
		static: member.StaticKey, remoteStatic: server, prologue: prologue(raw), random: rand.Reader})
	if err != nil {
		t.Fatal(err)
	}
	msg1, _, _, err := hs.WriteMessage(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return appendMessage(raw, msg1)
}

// A malicious member stalls many handshakes after its genuine message 1, and
// an outsider who knows the server's public key stalls XK handshakes. In wire
// version 1 eight such connections held every DH slot for the whole
// handshake timeout and locked everyone out.
func TestAvailabilityStalledHandshakes(t *testing.T) {
	checkNoGoroutineLeak(t)
	s := newAbuseServer(t, func(c *Config) {
		c.Patterns = []Pattern{KK, XK}
		c.MaxConcurrentDH = 2
	})
	mallory := newTestPeers(t, "mallory")["mallory"]
	if err := s.cfg.Keyring.Add(Peer{Name: "mallory", PublicKey: mallory.key.PublicKey()}); err != nil {
		t.Fatal(err)
	}
	server := s.key.PublicKey()
	stallWithFlight(t, s.addr, 200, func() []byte { return genuineFlight(t, mallory.cfg, server, KK) })
	stallWithFlight(t, s.addr, 200, func() []byte { return genuineFlight(t, mallory.cfg, server, XK) })
	time.Sleep(200 * time.Millisecond) // let them all reach their stall
	s.memberKeepsGettingIn(t, 200*time.Millisecond, 8)

	// Mallory holds no more than its own share of handshakes.
	l := s.ln.(*listener)
	l.mu.Lock()
	turns := l.admission.turns[mallory.key.PublicKey()]
	held := 0
	if turns != nil {
		held = len(turns.running) + len(turns.waiting)
	}
	l.mu.Unlock()
	if limit := (1 + maxWaitingTurns) * defaultMaxHandshakesPerPeer; held > limit {
		t.Errorf("mallory holds %d handshakes, more than its share of %d", held, limit)
	}
	t.Logf("mallory holds %d handshake turns of %d", held, (1+maxWaitingTurns)*defaultMaxHandshakesPerPeer)
}

// An outsider opens empty connections as fast as it can. In wire version 1
// the listener dropped the oldest pending connection, which was the member's
// slow one; now a flood from one address only displaces itself.
func TestAvailabilityConnectionFlood(t *testing.T) {
	checkNoGoroutineLeak(t)
	const places = 256
	s := newAbuseServer(t, func(c *Config) { c.MaxPendingHandshakes = places })
	stop := make(chan struct{})
	var flooded atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var held []net.Conn
			defer func() {
				for _, c := range held {
					c.Close()
				}
			}()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", s.addr, time.Second)
				if err != nil {
					continue
				}
				flooded.Add(1)
				held = append(held, c)
				if len(held) > places { // keep the file descriptors bounded
					held[0].Close()
					held = held[1:]
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	s.memberKeepsGettingIn(t, 400*time.Millisecond, 5)
	rate := float64(flooded.Load()) / time.Since(start).Seconds()
	close(stop)
	wg.Wait()
	t.Logf("flood: %d empty connections (%.0f/s)", flooded.Load(), rate)
	if flooded.Load() < 4*places {
		t.Errorf("the flood opened only %d connections, too few to fill the %d places", flooded.Load(), places)
	}
}

// forgedFlight is the best a party that knows every public key but holds no
// keyring key can send as KK: a preamble sealed with a pair key it can
// compute (its own key with the server's), claiming whoever it likes.
func forgedFlight(forger *PrivateKey, server PublicKey) []byte {
	ss, _ := forger.DH(server)
	k, _ := derivePairKey(ss, forger.PublicKey(), server)
	pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
	rand.Read(pre.salt[:])
	return appendMessage(pre.sealKK(k, time.Now()), randBytes(48))
}

// Forged preambles cost the listener no DH, and get the same reaction
// whatever key they were made for: an immediate close, nothing sent.
func TestAvailabilityForgedPreambles(t *testing.T) {
	checkNoGoroutineLeak(t)
	s := newAbuseServer(t, nil)
	// Warm up: the pair keys are derived once per keyring peer.
	c, sc, err := s.dialLegit(t, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	sc.Close()
	dhBefore := s.key.dh.Load()

	stranger, _ := GenerateKey(X25519, nil)
	server := s.key.PublicKey()
	member := s.client.StaticKey.PublicKey()
	cases := []struct {
		name   string
		flight func() []byte
	}{
		// In version 1 the first was answered by waiting and the second by
		// a close: a membership oracle.
		{"claims a member", func() []byte {
			b := forgedFlight(stranger, server)
			// The forger cannot compute the member's pair key; this is its
			// best guess at one: the version 1 construction from public keys.
			k, _ := derivePairKey([]byte(member.raw), member, server)
			pre, _ := parsePreamble(b[:preambleLen])
			copy(b, pre.sealKK(k, time.Now()))
			return b
		}},
		{"claims a stranger", func() []byte { return forgedFlight(stranger, server) }},
		// The preamble alone: version 1 waited for message 1 after a
		// preamble naming a trusted key, and closed at once otherwise.
		{"preamble alone, claims a member", func() []byte {
			pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
			rand.Read(pre.salt[:])
			k, _ := derivePairKey([]byte(member.raw), member, server)
			return pre.sealKK(k, time.Now())
		}},
		{"preamble alone, claims a stranger", func() []byte { return forgedFlight(stranger, server)[:preambleLen] }},
	}
	const perCase = 300
	for _, tc := range cases {
		var slowest time.Duration
		for range perCase {
			raw, err := net.Dial("tcp", s.addr)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			raw.Write(tc.flight())
			n, closed := readUntilClosed(raw, time.Now().Add(2*time.Second))
			raw.Close()
			if n != 0 || !closed {
				t.Fatalf("%s: the listener answered %d bytes, closed=%v; want a close and nothing", tc.name, n, closed)
			}
			slowest = max(slowest, time.Since(start))
		}
		t.Logf("%s: %d forged preambles, each closed at once (slowest %v)", tc.name, perCase, slowest.Round(time.Millisecond))
	}
	if n := s.key.dh.Load() - dhBefore; n != 0 {
		t.Errorf("forged preambles cost %d static DH, want 0", n)
	}
	s.expectNoAccept(t, 100*time.Millisecond)
}

// Key-less refusals are counted and logged in aggregate, not one record each.
func TestAvailabilityRefusalLogIsAggregated(t *testing.T) {
	var records atomic.Int64
	h := &countingHandler{}
	s := newAbuseServer(t, func(c *Config) { c.Logger = slog.New(recordCounter{h, &records}) })
	const n = 500
	for i := range n {
		_, payload := garbage(i%garbageKinds, s.key.PublicKey())
		raw, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		raw.Write(payload)
		raw.Close()
	}
	// Wait until the listener holds none of them, twice in a row.
	l := s.ln.(*listener)
	for quiet, deadline := 0, time.Now().Add(10*time.Second); quiet < 2 && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		l.mu.Lock()
		if l.admission.count == 0 {
			quiet++
		} else {
			quiet = 0
		}
		l.mu.Unlock()
	}
	s.flushLogs()
	if got := h.failed.Load(); got != n {
		t.Errorf("counted %d refusals, want %d; reasons:\n  %s", got, n, h.summary())
	}
	// One record per new reason, one when the counts are flushed.
	if got := records.Load(); got > garbageKinds+1 {
		t.Errorf("%d log records for %d refusals, want at most %d", got, n, garbageKinds+1)
	}
	t.Logf("%d refusals in %d log records; reasons:\n  %s", n, records.Load(), h.summary())
}

type recordCounter struct {
	*countingHandler
	n *atomic.Int64
}

func (r recordCounter) Handle(ctx context.Context, rec slog.Record) error {
	r.n.Add(1)
	return r.countingHandler.Handle(ctx, rec)
}

// Completed handshakes that the application does not Accept are bounded by
// AcceptBacklog; the rest end within the handshake timeout instead of
// waiting without bound.
func TestAvailabilityAcceptBacklog(t *testing.T) {
	checkNoGoroutineLeak(t)
	const backlog, timeout, dials = 8, 2 * time.Second, 24
	ps := newTestPeers(t, "server", "client")
	ps["server"].cfg.AcceptBacklog = backlog
	ps["server"].cfg.HandshakeTimeout = timeout
	ps["server"].cfg.Logger = slog.New(slog.DiscardHandler)
	ps["client"].cfg.Logger = slog.New(slog.DiscardHandler)
	ln, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns []net.Conn
	for range dials {
		c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	time.Sleep(timeout + time.Second)
	var stillOpen atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); isTimeout(err) {
				stillOpen.Add(1)
			}
		}()
	}
	wg.Wait()
	open := int(stillOpen.Load())
	if open > backlog {
		t.Errorf("%d completed connections still held for Accept, backlog %d", open, backlog)
	}
	// The application catches up and the listener serves new callers.
	for range open {
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	got.Close()
	t.Logf("%d dials, %d held for Accept (backlog %d), the rest closed after the %v timeout", dials, open, backlog, timeout)
}

// A wrong key on either side is reported to the initiator as ErrRefused,
// with both fingerprints, over TCP; an XK refusal arrives before Dial returns.
func TestAvailabilityRefusedIsExplained(t *testing.T) {
	for _, pattern := range []Pattern{KK, XK} {
		t.Run(pattern.String(), func(t *testing.T) {
			ps := newTestPeers(t, "server", "client")
			stranger := newTestPeers(t, "stranger")["stranger"]
			stranger.cfg.Keyring.Add(Peer{Name: "server", PublicKey: ps["server"].key.PublicKey()})
			stranger.cfg.Patterns = []Pattern{pattern}
			ps["server"].cfg.Patterns = []Pattern{pattern}
			ps["server"].cfg.Logger = slog.New(slog.DiscardHandler)
			ln := listenServing(t, ps["server"].cfg, func(c net.Conn) { io.Copy(io.Discard, c) })
			_, err := (&Dialer{Config: stranger.cfg, Peer: "server"}).Dial("tcp", ln.Addr().String())
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("Dial: %v, want ErrRefused", err)
			}
			mustContain(t, err.Error(), stranger.key.PublicKey().Fingerprint(), ps["server"].key.PublicKey().Fingerprint())
			t.Log(err)
		})
	}
}
