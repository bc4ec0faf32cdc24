package noisetor

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// rotationClock is a Config.Time that a test moves.
type rotationClock struct{ t atomic.Int64 }

func (c *rotationClock) now() time.Time  { return time.Unix(0, c.t.Load()) }
func (c *rotationClock) set(t time.Time) { c.t.Store(t.UnixNano()) }
func newRotationClock(t time.Time) *rotationClock {
	c := new(rotationClock)
	c.set(t)
	return c
}

// rotationSetup is a watchtower rotating from old to next, and a wallet whose
// keyring lists it with both keys.
type rotationSetup struct {
	old, next, wallet *PrivateKey
	now               func() time.Time // Config.Time
	walletCfg         *Config          // the wallet: lists tower with old, next= next
}

func newRotationSetup(t *testing.T, until time.Time, now func() time.Time) *rotationSetup {
	t.Helper()
	s := &rotationSetup{now: now}
	for _, k := range []**PrivateKey{&s.old, &s.next, &s.wallet} {
		var err error
		if *k, err = GenerateKey(X25519, nil); err != nil {
			t.Fatal(err)
		}
	}
	ring, err := NewKeyring(Peer{Name: "tower", PublicKey: s.old.PublicKey(), NextKey: s.next.PublicKey(), OverlapUntil: until})
	if err != nil {
		t.Fatal(err)
	}
	s.walletCfg = &Config{StaticKey: s.wallet, Keyring: ring, Time: now, Patterns: []Pattern{KK, XK}}
	return s
}

// tower returns the tower's Config: with only the old key (not yet moved),
// or with the next key and the old one as PreviousStaticKey (moved).
func (s *rotationSetup) tower(moved bool) *Config {
	ring, _ := NewKeyring(Peer{Name: "wallet", PublicKey: s.wallet.PublicKey()})
	cfg := &Config{StaticKey: s.old, Keyring: ring, Time: s.now, Patterns: []Pattern{KK, XK}}
	if moved {
		cfg.StaticKey, cfg.PreviousStaticKey = s.next, s.old
	}
	return cfg
}

// echoServer answers each connection by echoing it.
func echoServer(t *testing.T, cfg *Config) string {
	ln := listenServing(t, cfg, func(c net.Conn) { io.Copy(c, c) })
	return ln.Addr().String()
}

// session opens a KK session from the tower (cfg) to the wallet's echo
// server at addr, checked by a round trip, closed when the test ends.
func session(t *testing.T, cfg *Config, addr string) *Conn {
	t.Helper()
	c, err := roundTrip(cfg, "wallet", addr, KK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// endOverlapSoon gives the wallet's entry for the tower a rotation whose
// overlap ends within 2 s, waits until 2 s after that end, and returns it.
func (s *rotationSetup) endOverlapSoon() time.Time {
	until := time.Now().Add(2 * time.Second).Truncate(time.Second) // keyrings keep whole seconds
	rot, _ := NewKeyring(Peer{Name: "tower", PublicKey: s.old.PublicKey(), NextKey: s.next.PublicKey(), OverlapUntil: until})
	s.walletCfg.Keyring.Update(rot)
	time.Sleep(time.Until(until) + 2*time.Second)
	return until
}

// roundTrip dials addr as cfg's peer name, sends a line and reads it back.
func roundTrip(cfg *Config, peer, addr string, pattern Pattern) (*Conn, error) {
	cfg = cfg.Clone()
	cfg.Patterns = []Pattern{pattern}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := (&Dialer{Config: cfg, Peer: peer}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	conn := c.(*Conn)
	if _, err := conn.Write([]byte("ping")); err != nil {
		conn.Close()
		return nil, err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || !bytes.Equal(buf, []byte("ping")) {
		conn.Close()
		return nil, errors.Join(errors.New("echo failed"), err)
	}
	return conn, nil
}

// During the overlap, a peer listed as "tower <old> next=<new> until=T" is
// reached and accepted with either key, whichever of them the tower has
// moved to; after T only the new key works, both ways.
func TestKeyRotationOverlap(t *testing.T) {
	until := time.Now().Add(24 * time.Hour).Truncate(time.Second)
	clock := newRotationClock(until.Add(-time.Hour))
	s := newRotationSetup(t, until, clock.now)
	notMoved, moved := echoServer(t, s.tower(false)), echoServer(t, s.tower(true))

	// The wallet's keyring as the tower's keyring sees it, for the tower
	// dialing the wallet.
	walletSide := echoServer(t, s.walletCfg)

	for _, pattern := range []Pattern{KK, XK} {
		t.Run(pattern.String(), func(t *testing.T) {
			clock.set(until.Add(-time.Hour))
			// Before T: the wallet addresses the tower with the old key,
			// which both tower configurations answer.
			for name, addr := range map[string]string{"not moved": notMoved, "moved": moved} {
				c, err := roundTrip(s.walletCfg, "tower", addr, pattern)
				if err != nil {
					t.Fatalf("before the end of the overlap, dialing the tower (%s): %v", name, err)
				}
				if st := c.ConnectionState(); st.PeerKey != s.old.PublicKey() || st.Peer.Name != "tower" {
					t.Errorf("dialer's state: peer %q key %v, want tower with the old key", st.Peer.Name, st.PeerKey)
				}
				c.Close()
			}
			// Before T, the tower authenticates to the wallet with either key.
			for name, cfg := range map[string]*Config{"old key": s.tower(false), "new key": s.tower(true)} {
				c, err := roundTrip(cfg, "wallet", walletSide, pattern)
				if err != nil {
					t.Fatalf("before the end of the overlap, the tower with its %s: %v", name, err)
				}
				c.Close()
			}

			// From T: the wallet addresses the tower with the new key; the
			// tower that has not moved cannot answer, and the old key is
			// refused as an initiator.
			clock.set(until)
			c, err := roundTrip(s.walletCfg, "tower", moved, pattern)
			if err != nil {
				t.Fatalf("after the overlap, dialing the moved tower: %v", err)
			}
			if st := c.ConnectionState(); st.PeerKey != s.next.PublicKey() {
				t.Errorf("after the overlap the dialer proved %v, want the next key", st.PeerKey)
			}
			c.Close()
			if c, err := roundTrip(s.walletCfg, "tower", notMoved, pattern); err == nil {
				c.Close()
				t.Error("after the overlap, a tower holding only the old key was accepted")
			}
			if c, err := roundTrip(s.tower(false), "wallet", walletSide, pattern); err == nil {
				c.Close()
				t.Error("after the overlap, the old key was accepted as an initiator")
			}
			if c, err := roundTrip(s.tower(true), "wallet", walletSide, pattern); err != nil {
				t.Errorf("after the overlap, the new key as an initiator: %v", err)
			} else {
				c.Close()
			}
		})
	}
}

// A session authenticated with the old key ends when the overlap does, on
// both sides; one with the new key goes on.
func TestKeyRotationEndsOldSessions(t *testing.T) {
	until := time.Now().Add(2 * time.Second).Truncate(time.Second) // keyrings keep whole seconds
	s := newRotationSetup(t, until, nil)
	towerOld, towerNew := s.tower(false), s.tower(true)
	walletSide := echoServer(t, s.walletCfg)

	oldConn := session(t, towerOld, walletSide)
	newConn := session(t, towerNew, walletSide)

	oldConn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := oldConn.Read(make([]byte, 1))
	ended := time.Now()
	if err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("the old-key session ended with %v, want a cut (no clean close)", err)
	}
	if ended.Before(until) || ended.After(until.Add(time.Second)) {
		t.Errorf("the old-key session ended %v after the overlap's end, want within a second", ended.Sub(until))
	}
	if _, err := newConn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	newConn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(newConn, buf); err != nil {
		t.Errorf("the new-key session after the overlap: %v", err)
	}
}

func TestKeyringRotationSyntax(t *testing.T) {
	a, _ := GenerateKey(X25519, nil)
	b, _ := GenerateKey(X25519, nil)
	p256, _ := GenerateKey(P256, nil)
	line := "tower " + a.PublicKey().String() + " next=" + b.PublicKey().String() + " until=2026-12-08T01:00:00+01:00\n"
	k, err := ParseKeyring(strings.NewReader(line))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := k.ByName("tower")
	if p.NextKey != b.PublicKey() || !p.OverlapUntil.Equal(time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("parsed %+v", p)
	}
	if q, ok := k.ByKey(b.PublicKey()); !ok || q.Name != "tower" {
		t.Error("ByKey does not find the next key")
	}
	var out bytes.Buffer
	k.WriteTo(&out)
	want := "tower " + a.PublicKey().String() + " next=" + b.PublicKey().String() + " until=2026-12-08T00:00:00Z\n"
	if !strings.HasSuffix(out.String(), want) {
		t.Errorf("canonical form:\n%s\nwant a line %q", out.String(), want)
	}
	if k2, err := ParseKeyring(&out); err != nil || k2.Fingerprint() != k.Fingerprint() {
		t.Errorf("round trip: %v", err)
	}

	other := "other " + b.PublicKey().String() + "\n"
	for name, text := range map[string]string{
		"next without until": "tower " + a.PublicKey().String() + " next=" + b.PublicKey().String() + "\n",
		"until without next": "tower " + a.PublicKey().String() + " until=2026-12-08T00:00:00Z\n",
		"next is current":    "tower " + a.PublicKey().String() + " next=" + a.PublicKey().String() + " until=2026-12-08T00:00:00Z\n",
		"curve change":       "tower " + a.PublicKey().String() + " next=" + p256.PublicKey().String() + " until=2026-12-08T00:00:00Z\n",
		"bad time":           "tower " + a.PublicKey().String() + " next=" + b.PublicKey().String() + " until=2026-12-08\n",
		"next twice":         "tower " + a.PublicKey().String() + " next=" + b.PublicKey().String() + " next=" + b.PublicKey().String() + " until=2026-12-08T00:00:00Z\n",
		"next is another's":  other + line,
		"another has next":   line + other,
	} {
		_, err := ParseKeyring(strings.NewReader(text))
		var ke *KeyringError
		if !errors.As(err, &ke) || ke.Line == 0 {
			t.Errorf("%s: got %v, want a *KeyringError naming the line", name, err)
		}
	}
}

// Ending a rotation early in the keyring (the entry now holds only the new
// key) ends the old key's sessions at once and keeps the new key's.
func TestKeyRotationFinishedByUpdate(t *testing.T) {
	s := newRotationSetup(t, time.Now().Add(time.Hour), nil)
	walletSide := echoServer(t, s.walletCfg)
	oldConn := session(t, s.tower(false), walletSide)
	newConn := session(t, s.tower(true), walletSide)

	done, _ := NewKeyring(Peer{Name: "tower", PublicKey: s.next.PublicKey()})
	start := time.Now()
	if ch := s.walletCfg.Keyring.Update(done); len(ch.Removed) != 1 || len(ch.Added) != 1 {
		t.Fatalf("change %v", ch)
	}
	oldConn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := oldConn.Read(make([]byte, 1)); err == nil || errors.Is(err, io.EOF) || time.Since(start) > time.Second {
		t.Errorf("old-key session: %v after %v, want a cut within a second", err, time.Since(start))
	}
	if _, err := newConn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	newConn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(newConn, make([]byte, 4)); err != nil {
		t.Errorf("the new-key session after the update: %v", err)
	}
	if c, err := roundTrip(s.tower(false), "wallet", walletSide, KK); err == nil {
		c.Close()
		t.Error("the old key still opens sessions after the rotation was finished")
	}
}

// Through the sync server: a watchtower that has moved to its next key is
// registered and reached during the overlap (the wallet still addresses its
// old key), after it (the next key), and once the keyrings finish the
// rotation while it stays registered (found by the demo: the sync server
// kept registrations by the entry's key, and lost this one).
func TestKeyRotationThroughRelay(t *testing.T) {
	until := time.Now().Add(24 * time.Hour).Truncate(time.Second)
	clock := newRotationClock(until.Add(-time.Hour))
	peers := newTestPeers(t, "sync", "wallet", "tower")
	next := mustKey(t)
	tower := peers["tower"]
	peers["sync"].cfg.Time, peers["wallet"].cfg.Time = clock.now, clock.now
	listRotation(t, Peer{Name: "tower", PublicKey: tower.key.PublicKey(), NextKey: next.PublicKey(), OverlapUntil: until},
		peers["sync"].cfg, peers["wallet"].cfg)
	tower.cfg.StaticKey, tower.cfg.PreviousStaticKey, tower.cfg.Time = next, tower.key, clock.now

	n := &relayTestNet{peers: peers}
	n.startServer(t, "127.0.0.1:0", relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}})
	n.tower(t, "tower", relayEcho)
	// The last phase finishes the rotation in the sync server's and the
	// wallet's keyrings (keyring rotate --finish) while the tower stays
	// registered from before: the sync server must still find its
	// registration, made when the entry's key was the old one.
	for _, phase := range []struct {
		name   string
		at     time.Time
		key    PublicKey
		finish bool
	}{
		{"during the overlap", until.Add(-time.Hour), tower.key.PublicKey(), false},
		{"after the overlap", until.Add(time.Hour), next.PublicKey(), false},
		{"after the rotation is finished", until.Add(time.Hour), next.PublicKey(), true},
	} {
		clock.set(phase.at)
		if phase.finish {
			listRotation(t, Peer{Name: "tower", PublicKey: next.PublicKey()}, peers["sync"].cfg, peers["wallet"].cfg)
		}
		c, err := n.client("wallet").Dial(relayCtx(t), "tower")
		if err != nil {
			t.Fatalf("%s: Dial: %v", phase.name, err)
		}
		if got := c.ConnectionState().PeerKey; got != phase.key {
			t.Errorf("%s: the wallet reached the tower's key %v, want %v", phase.name, got, phase.key)
		}
		c.Write([]byte("ping"))
		buf := make([]byte, 4)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			t.Errorf("%s: echo: %q, %v", phase.name, buf, err)
		}
		c.Close()
	}
}

// listRotation replaces the entry of rotating.Name in the keyring of each
// Config with rotating, as the other machines do when a peer starts a
// rotation.
func listRotation(t *testing.T, rotating Peer, cfgs ...*Config) {
	t.Helper()
	for _, cfg := range cfgs {
		ring := new(Keyring)
		for _, p := range cfg.Keyring.Peers() {
			if p.Name == rotating.Name {
				p = rotating
			}
			if err := ring.Add(p); err != nil {
				t.Fatal(err)
			}
		}
		cfg.Keyring.Update(ring)
	}
}

// A registration whose key left the keyring between its handshake and its
// REGISTER line (a thief's, with the old key, as the rotation is finished)
// is refused, and does not displace the live registration of the entry's
// current key. The interleaving is forced by calling register on such a
// connection; over the network the window is a few microseconds.
func TestRelayRegisterAfterItsKeyLeft(t *testing.T) {
	until := time.Now().Add(time.Hour).Truncate(time.Second)
	peers := newTestPeers(t, "sync", "wallet", "tower")
	tower, next := peers["tower"], mustKey(t)
	listRotation(t, Peer{Name: "tower", PublicKey: tower.key.PublicKey(), NextKey: next.PublicKey(), OverlapUntil: until},
		peers["sync"].cfg, peers["wallet"].cfg)
	// The thief's copy of the tower's configuration, with the old key; the
	// tower itself moves to the next key.
	thief := &testPeer{name: "tower", key: tower.key, cfg: &Config{StaticKey: tower.key, Keyring: tower.cfg.Keyring, Logger: tower.cfg.Logger}}
	tower.cfg.StaticKey, tower.cfg.PreviousStaticKey = next, tower.key

	n := &relayTestNet{peers: peers}
	n.startServer(t, "127.0.0.1:0", relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}})
	n.tower(t, "tower", relayEcho)
	_, stale := handshakePair(t, thief, peers["sync"])
	from := stale.ConnectionState().Peer

	// keyring rotate --finish at the sync server and the wallet.
	listRotation(t, Peer{Name: "tower", PublicKey: next.PublicKey()}, peers["sync"].cfg, peers["wallet"].cfg)
	done := make(chan struct{})
	go func() { n.srv.register(stale, from, time.Now()); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the stale registration was taken")
	}
	c, err := n.client("wallet").Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatalf("the tower after a stale registration: %v", err)
	}
	c.Close()
	mustContain(t, peers["sync"].logs.String(), "the key this registration proved left the keyring after its handshake")
}
