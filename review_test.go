package noisetor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Review tests for wire version 2 and the listener's admission control
// (issue 10). Each states a property WIRE.md or the issue claims; a failure
// is a finding of the review, not a flake.

// WIRE.md §3 must let an implementer lay out the 48 bytes: the table's
// offsets are contiguous and end at 48, and the tag formula covers exactly
// the bytes before the tag (the vectors of §3.4 put the tag at offset 32).
func TestReviewSpecPreambleLayout(t *testing.T) {
	doc, err := os.ReadFile("WIRE.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(doc)
	sec := text[strings.Index(text, "## 3. Preamble"):strings.Index(text, "### 3.1")]
	row := regexp.MustCompile(`(?m)^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|`)
	next := 0
	tagAt := -1
	for _, m := range row.FindAllStringSubmatch(sec, -1) {
		off, _ := strconv.Atoi(m[1])
		size, _ := strconv.Atoi(m[2])
		if off != next {
			t.Errorf("WIRE.md §3: field %q at offset %d, but the previous field ends at %d", m[3], off, next)
		}
		if m[3] == "tag" {
			tagAt = off
		}
		next = off + size
	}
	if next != preambleLen {
		t.Errorf("WIRE.md §3: the fields end at offset %d, the preamble is %d bytes", next, preambleLen)
	}
	if tagAt != preambleLen-preambleTag {
		t.Errorf("WIRE.md §3: tag at offset %d; the vectors and the code put it at %d", tagAt, preambleLen-preambleTag)
	}
	want := fmt.Sprintf("preamble[0:%d]", preambleLen-preambleTag)
	for _, m := range regexp.MustCompile(`preamble\[0:\d+\]`).FindAllString(text, -1) {
		if m != want {
			t.Errorf("WIRE.md says the tag covers %s; the code and the vectors cover %s", m, want)
		}
	}
}

// flakyKey is a StaticKey whose first fail DH calls fail as a token does
// when its session drops; afterwards it works.
type flakyKey struct {
	*PrivateKey
	fail atomic.Int64
}

func (k *flakyKey) DH(peer PublicKey) ([]byte, error) {
	if k.fail.Add(-1) >= 0 {
		return nil, errors.New("token: CKR_DEVICE_ERROR")
	}
	return k.PrivateKey.DH(peer)
}

// A token that fails once while the listener derives its pair keys must not
// keep members out for good: "no index is better than a partial one"
// (pairkeys.go), and the next preamble should retry the derivation.
func TestReviewIndexRecoversFromTokenFailure(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "server", "client")
	key := &flakyKey{PrivateKey: ps["server"].key}
	key.fail.Store(1)
	ps["server"].cfg.StaticKey = key
	ps["server"].cfg.Logger = slog.New(slog.DiscardHandler)
	ps["client"].cfg.Logger = slog.New(slog.DiscardHandler)
	ln := listenServing(t, ps["server"].cfg, nil)
	// Let the warm-up derivation hit the failure.
	for deadline := time.Now().Add(5 * time.Second); key.fail.Load() >= 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	var last error
	for i := range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).DialContext(ctx, "tcp", ln.Addr().String())
		cancel()
		if err == nil {
			c.Close()
			t.Logf("member in at attempt %d after the token recovered", i+1)
			return
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("the token failed once during the pair-key derivation and recovered; the member is still refused: %v", last)
}

// A responder that restarts (or a second listener of the same key with
// another Config, or a member that has made more than 4096 connections in
// its windows) has no record of the salts of preambles still inside their
// hint windows. Whoever recorded them, the sync server for relayed
// sessions, replays them: each costs the responder static DH and holds one
// of the member's handshake turns until the handshake timeout, so the
// member is kept out (WIRE.md §3.3: "Replays are dropped before any DH").
// 128 replays (8 running, 120 waiting) keep it out for one handshake
// timeout (60 s by default); the next 128 for the next.
func TestReviewReplayAfterRestartLocksMemberOut(t *testing.T) {
	checkNoGoroutineLeak(t)
	// The flights the member sent in the last minutes, as recorded on the
	// way by the sync server (preamble and message 1, exactly as sent).
	before := newAbuseServer(t, func(c *Config) { c.HandshakeTimeout = 10 * time.Second })
	server := before.key.PublicKey()
	n := (1 + maxWaitingTurns) * defaultMaxHandshakesPerPeer
	var flights [][]byte
	for range n {
		f := genuineFlight(t, before.client, server, KK)
		flights = append(flights, f)
		c, err := net.Dial("tcp", before.addr) // the member's own connection
		if err != nil {
			t.Fatal(err)
		}
		c.Write(f[:preambleLen])
		c.Close()
	}

	// The responder restarts: same key and keyring, a fresh Config.
	s := newAbuseServer(t, func(c *Config) {
		c.HandshakeTimeout = 10 * time.Second
		c.StaticKey = &countingKey{PrivateKey: before.key.PrivateKey}
		c.Keyring = before.cfg.Keyring
	})
	s.client = before.client
	for _, f := range flights {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(f) // and stall: the replayer cannot send the confirm record
	}
	time.Sleep(500 * time.Millisecond)
	// A restart forgets the salts (WIRE.md §3.3): each replay may cost its
	// handshake's two static DH, no more.
	dh := s.cfg.StaticKey.(*countingKey).dh.Load()
	if limit := int64(len(s.cfg.Keyring.Peers()) + 2*n); dh > limit {
		t.Errorf("%d replayed preambles cost the restarted responder %d static DH, more than %d", n, dh, limit)
	}
	// The handshakes they start cannot keep the member out: its connection
	// takes the turn of one that has run for turnMinAge.
	ctx, cancel := context.WithTimeout(context.Background(), turnMinAge+10*time.Second)
	defer cancel()
	c, err := (&Dialer{Config: s.client, Peer: "server"}).DialContext(ctx, "tcp", s.addr)
	if err != nil {
		t.Errorf("the member is kept out by %d replays of its own recorded preambles: %v", n, err)
		return
	}
	c.Close()
}

// An XK caller refused because the responder accepts only KK (the default
// of noisetor serve since this change) is told that its key is not listed,
// its key for the responder is wrong, or the clocks differ, none of which
// is the cause; the parameters are not mentioned.
func TestReviewRefusedNamesParameters(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	ps["server"].cfg.Logger = slog.New(slog.DiscardHandler)
	ps["client"].cfg.Logger = slog.New(slog.DiscardHandler)
	ps["client"].cfg.Patterns = []Pattern{XK}
	ln, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", ln.Addr().String())
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("Dial: %v, want ErrRefused", err)
	}
	if !strings.Contains(err.Error(), "pattern") {
		t.Errorf("refused for its pattern, the caller reads: %v", err)
	}
}

// The same without a restart: a member that has made thousands of
// connections within its hint windows (an HTTP client, or a member whose
// connections the sync server keeps cutting so that it redials) must not
// have its salts evicted from its replay cache while their preambles are
// still accepted, or whoever recorded them could replay them.
func TestReviewReplayPastPeerCacheLocksMemberOut(t *testing.T) {
	checkNoGoroutineLeak(t)
	s := newAbuseServer(t, func(c *Config) { c.HandshakeTimeout = 10 * time.Second })
	server := s.key.PublicKey()
	n := (1 + maxWaitingTurns) * defaultMaxHandshakesPerPeer
	send := func(b []byte) {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(b)
		c.Close()
	}
	var recorded [][]byte
	for range n {
		f := genuineFlight(t, s.client, server, KK)
		recorded = append(recorded, f)
		send(f[:preambleLen]) // the member's own connection, as recorded on the way
	}
	for range peerReplayCacheSize - n - 1 {
		send(genuineFlight(t, s.client, server, KK)[:preambleLen]) // its later ones, short of the cache's size
	}
	dhBefore := s.key.dh.Load()
	// Wait for the listener to finish with them.
	l := s.ln.(*listener)
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		l.mu.Lock()
		idle := len(l.admission.turns) == 0 && l.admission.count == 0
		l.mu.Unlock()
		if idle {
			break
		}
	}
	for _, f := range recorded {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(f)
	}
	time.Sleep(500 * time.Millisecond)
	if dh := s.key.dh.Load() - dhBefore; dh != 0 {
		t.Errorf("%d replays of preambles still in their windows cost %d static DH", n, dh)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := (&Dialer{Config: s.client, Peer: "server"}).DialContext(ctx, "tcp", s.addr)
	if err != nil {
		t.Errorf("the member is kept out by %d replays of preambles it sent minutes ago: %v", n, err)
		return
	}
	c.Close()
}

// Through the relay, a party that the watchtower does not list but the sync
// server lets CONNECT (any wallet of the sync server's) makes the watchtower
// open and authenticate one outer connection to the sync server per
// request, two static DH of the watchtower's key (on its token) each,
// before the inner preamble is refused. WIRE.md §12.9 says a party without
// a pair key cannot make a watchtower compute a DH; issue 10 asks for the
// same rules on the relay.
func TestReviewRelayStrangerForcesDialBackDH(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "*", To: "tower"}}}, "wallet", "stranger", "tower")
	tower := n.peers["tower"]
	ring, err := NewKeyring(Peer{Name: "sync", PublicKey: n.peers["sync"].key.PublicKey()},
		Peer{Name: "wallet", PublicKey: n.peers["wallet"].key.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	key := &countingKey{PrivateKey: tower.key}
	tower.cfg.Keyring, tower.cfg.StaticKey = ring, key
	n.tower(t, "tower", relayEcho)
	c, err := n.client("wallet").Dial(relayCtx(t), "tower") // warm up: pair keys, registration
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	time.Sleep(100 * time.Millisecond)
	before := key.dh.Load()
	const tries = 20
	for range tries {
		if c, err := n.client("stranger").Dial(relayCtx(t), "tower"); err == nil {
			c.Close()
			t.Fatal("a stranger got through")
		}
	}
	if got := key.dh.Load() - before; got != 0 {
		t.Errorf("%d relayed requests from a party the watchtower does not list cost it %d static DH", tries, got)
	}
}
