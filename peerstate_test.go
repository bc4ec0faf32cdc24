package noisetor

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

// peerState returns the state of name in cfg.
func peerState(t *testing.T, cfg *Config, name string) PeerState {
	t.Helper()
	for _, st := range cfg.PeerStates() {
		if st.Name == name {
			return st
		}
	}
	t.Fatalf("PeerStates has no %s: %+v", name, cfg.PeerStates())
	return PeerState{}
}

// eventually polls cond for up to 5 seconds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// PeerStates and Refusals over real sockets: a completed handshake in each
// direction, a dial that fails, an outsider refused by the Listener, the
// connection counts back to 0 after Close, and a removed peer's record kept.
func TestPeerStates(t *testing.T) {
	peers := newTestPeers(t, "server", "client", "idle")
	srv, cl := peers["server"], peers["client"]
	out := newTestPeers(t, "server")["server"] // a key the server's keyring lacks
	out.cfg.Keyring, _ = NewKeyring(Peer{Name: "server", PublicKey: srv.key.PublicKey()})

	if st := peerState(t, srv.cfg, "client"); st.Connections != 0 || !st.LastHandshake.Time.IsZero() || st.Handshakes != (HandshakeCounts{}) || !st.InKeyring {
		t.Fatalf("fresh state: %+v", st)
	}

	accepted := make(chan net.Conn, 4)
	done := make(chan struct{})
	defer close(done)
	ln := listenServing(t, srv.cfg, func(c net.Conn) { accepted <- c; <-done })
	d := &Dialer{Config: cl.cfg, Peer: "server"}
	before := time.Now()
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc := <-accepted

	st := peerState(t, cl.cfg, "server")
	if st.Connections != 1 || st.Handshakes != (HandshakeCounts{OutboundOK: 1}) {
		t.Errorf("client's view of server: %+v", st)
	}
	if h := st.LastHandshake; !h.Outbound || h.Pattern != KK || h.CipherSuite != ChaChaPoly || h.Time.Before(before) || h.Err != nil || h.Addr != ln.Addr().String() {
		t.Errorf("client's last handshake: %+v", h)
	}
	st = peerState(t, srv.cfg, "client")
	if st.Connections != 1 || st.Handshakes != (HandshakeCounts{InboundOK: 1}) || st.LastHandshake.Outbound || st.LastHandshake.Time.Before(before) {
		t.Errorf("server's view of client: %+v", st)
	}
	if st := peerState(t, srv.cfg, "idle"); st.Connections != 0 || st.Handshakes != (HandshakeCounts{}) {
		t.Errorf("idle peer: %+v", st)
	}

	// A failed dial is the peer's last failure, and says why.
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	if _, err := d.Dial("tcp", deadAddr); err == nil {
		t.Fatal("dialed a closed port")
	}
	st = peerState(t, cl.cfg, "server")
	if st.Handshakes != (HandshakeCounts{OutboundOK: 1, OutboundFailed: 1}) || !errors.Is(st.LastFailure.Err, syscall.ECONNREFUSED) ||
		!st.LastFailure.Outbound || st.LastFailure.Addr != deadAddr || st.LastHandshake.Addr != ln.Addr().String() {
		t.Errorf("after a failed dial: %+v", st)
	}

	// An outsider is no peer's failure: a refusal, by reason.
	if _, err := (&Dialer{Config: out.cfg, Peer: "server"}).Dial("tcp", ln.Addr().String()); err == nil {
		t.Fatal("outsider got in")
	}
	eventually(t, "the refusal", func() bool { return srv.cfg.Refusals()["preamble did not verify"] == 1 })
	if r := srv.cfg.Refusals(); len(r) != 1 {
		t.Errorf("refusals: %v", r)
	}
	for _, st := range srv.cfg.PeerStates() {
		if st.Handshakes.InboundFailed != 0 || !st.LastFailure.Time.IsZero() {
			t.Errorf("the outsider was attributed to %s: %+v", st.Name, st)
		}
	}
	if len(srv.cfg.PeerStates()) != 3 {
		t.Errorf("server lists %d peers, want its 3", len(srv.cfg.PeerStates()))
	}

	// Close: both counts back to 0, and the records stay.
	c.Close()
	sc.Close()
	eventually(t, "connections back to 0", func() bool {
		return peerState(t, cl.cfg, "server").Connections == 0 && peerState(t, srv.cfg, "client").Connections == 0
	})
	if st := peerState(t, srv.cfg, "client"); st.Handshakes.InboundOK != 1 || st.LastHandshake.Time.IsZero() {
		t.Errorf("after Close: %+v", st)
	}

	// A second connection, then the peer leaves the keyring: its connection
	// is revoked and its record kept, marked out of the keyring.
	c, err = d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc = <-accepted
	defer sc.Close()
	if st := peerState(t, srv.cfg, "client"); st.Connections != 1 || st.Handshakes.InboundOK != 2 {
		t.Errorf("second connection: %+v", st)
	}
	if _, err := srv.cfg.Keyring.Remove("client"); err != nil {
		t.Fatal(err)
	}
	states := srv.cfg.PeerStates()
	if last := states[len(states)-1]; last.Name != "client" || last.InKeyring || last.Connections != 0 || last.Handshakes.InboundOK != 2 {
		t.Errorf("removed peer: %+v", states)
	}
	if states[0].Name != "idle" || states[1].Name != "server" {
		t.Errorf("order: %+v", states)
	}
}

// A bare Server (no Listener) counts an outsider as a refusal too, and
// records the failure of an authenticated client against its peer.
func TestPeerStatesServerRefusal(t *testing.T) {
	peers := newTestPeers(t, "server", "client")
	srv := peers["server"]
	out := newTestPeers(t, "server")["server"]
	out.cfg.Keyring, _ = NewKeyring(Peer{Name: "server", PublicKey: srv.key.PublicKey()})
	a, b := tcpPair(t)
	errc := make(chan error, 1)
	go func() { errc <- Server(b, srv.cfg).HandshakeContext(context.Background()) }()
	if err := Client(a, out.cfg, "server").Handshake(); err == nil {
		t.Fatal("outsider got in")
	}
	if err := <-errc; err == nil {
		t.Fatal("server accepted the outsider")
	}
	if r := srv.cfg.Refusals(); r["preamble did not verify"] != 1 {
		t.Errorf("refusals %v", r)
	}
	if st := peerState(t, out.cfg, "server"); st.Handshakes != (HandshakeCounts{OutboundFailed: 1}) || st.LastFailure.Err == nil {
		t.Errorf("outsider's view of the server: %+v", st)
	}
}
