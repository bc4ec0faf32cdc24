package noisetor

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// Found by an attack review of key rotation and revocation.

// A wallet that has moved to its next key dials a tower through the sync
// server during the overlap, KK: the relayed preamble proves the next key,
// which the sync server announced (it used to be compared with the old one).
func TestKeyRotationRequesterThroughRelay(t *testing.T) {
	until := time.Now().Add(24 * time.Hour).Truncate(time.Second)
	peers := newTestPeers(t, "sync", "wallet", "tower")
	next := mustKey(t)
	w := peers["wallet"]
	listRotation(t, Peer{Name: "wallet", PublicKey: w.key.PublicKey(), NextKey: next.PublicKey(), OverlapUntil: until},
		peers["sync"].cfg, peers["tower"].cfg)
	w.cfg.StaticKey, w.cfg.PreviousStaticKey = next, w.key
	for _, p := range peers {
		p.cfg.Patterns = []Pattern{KK}
	}
	n := &relayTestNet{peers: peers}
	n.startServer(t, "127.0.0.1:0", relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}})
	n.tower(t, "tower", relayEcho)
	c, err := n.client("wallet").Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatalf("rotated wallet through relay (KK): %v\ntower log:\n%s", err, peers["tower"].logs.String())
	}
	c.Close()
}

// A session with the old key established before the rotation line is
// added is cut when the overlap ends.
func TestKeyRotationStartedAfterSession(t *testing.T) {
	s := newRotationSetup(t, time.Now().Add(time.Hour), nil)
	// wallet keyring starts without rotation
	plain, _ := NewKeyring(Peer{Name: "tower", PublicKey: s.old.PublicKey()})
	s.walletCfg.Keyring.Update(plain)
	walletSide := echoServer(t, s.walletCfg)
	oldConn := session(t, s.tower(false), walletSide)
	until := s.endOverlapSoon()
	if c, err := roundTrip(s.tower(false), "wallet", walletSide, KK); err == nil {
		c.Close()
		t.Error("old key opens a new session")
	}
	expectSessionEnded(t, oldConn, "old-key session established before the rotation was added", until)
}

// expectSessionEnded checks that c, an echoed session, no longer works
// (some time after end).
func expectSessionEnded(t *testing.T, c net.Conn, what string, end time.Time) {
	t.Helper()
	if _, err := c.Write([]byte("ping")); err != nil {
		return // cut
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 4)); err == nil {
		t.Errorf("%s still works %v after the overlap ended", what, time.Since(end))
	}
}

// An overlap brought forward (the old key leaked) cuts old-key sessions at
// the new end.
func TestKeyRotationShortened(t *testing.T) {
	s := newRotationSetup(t, time.Now().Add(time.Hour), nil)
	walletSide := echoServer(t, s.walletCfg)
	oldConn := session(t, s.tower(false), walletSide)
	until := s.endOverlapSoon()
	expectSessionEnded(t, oldConn, "old-key session, its overlap shortened,", until)
}

// A peer removed while its handshake is in flight: after the responder's
// keyring check, before the session is tracked. The initiator holds back
// its second write (KK: the confirm record, after message 2 has arrived, so
// the responder is past its preamble check; XK: message 3 and the confirm,
// checked against the keyring when they arrive).
type slowConfirm struct {
	net.Conn
	n       int
	reached chan struct{} // closed when the second write is held
	delay   chan struct{}
}

func (s *slowConfirm) Write(b []byte) (int, error) {
	s.n++
	if s.n == 2 {
		close(s.reached)
		<-s.delay
	}
	return s.Conn.Write(b)
}

func TestKeyringRemoveDuringHandshake(t *testing.T) {
	for _, pattern := range []Pattern{KK, XK} {
		t.Run(pattern.String(), func(t *testing.T) {
			peers := newTestPeers(t, "wallet", "tower")
			tw, wa := peers["tower"], peers["wallet"]
			tw.cfg.Patterns, wa.cfg.Patterns = []Pattern{pattern}, []Pattern{pattern}
			// an earlier, unrelated connection so that the watcher is registered
			got := make(chan net.Conn, 4)
			ln := listenServing(t, tw.cfg, func(c net.Conn) { got <- c; io.Copy(c, c) })
			first, err := roundTrip(wa.cfg, "tower", ln.Addr().String(), pattern)
			if err != nil {
				t.Fatal(err)
			}
			defer first.Close()
			<-got
			raw, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			sc := &slowConfirm{Conn: raw, reached: make(chan struct{}), delay: make(chan struct{})}
			done := make(chan error, 1)
			var cc *Conn
			go func() {
				cc = Client(sc, wa.cfg, "tower")
				done <- cc.HandshakeContext(context.Background())
			}()
			select {
			case <-sc.reached:
			case <-time.After(10 * time.Second):
				t.Fatal("the initiator never got to its second write")
			}
			if _, err := tw.cfg.Keyring.Remove("wallet"); err != nil {
				t.Fatal(err)
			}
			close(sc.delay)
			if err := <-done; err != nil {
				t.Logf("handshake failed after Remove: %v (good)", err)
				return
			}
			select {
			case <-got:
			case <-time.After(3 * time.Second):
				t.Logf("responder refused (good)")
				return
			}
			cc.Write([]byte("ping"))
			cc.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 4)
			if _, err := io.ReadFull(cc, buf); err == nil {
				t.Errorf("%v: removed peer holds a working session established concurrently with Remove", pattern)
			} else if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Logf("read err %v", err)
			}
		})
	}
}
