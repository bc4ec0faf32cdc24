package noisetor

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// relayTestNet is a sync server on 127.0.0.1 and the peers around it. Every
// peer's keyring lists every other peer, the sync server included: the
// realistic worst case, since the sync server could then try to pass itself
// off as a wallet to a watchtower.
type relayTestNet struct {
	peers map[string]*testPeer
	srv   *RelayServer
	addr  string
}

type relayTestOpts struct {
	rules    RelayRules
	patterns []Pattern
	tweak    func(*RelayServer)
}

func newRelayTestNet(t *testing.T, o relayTestOpts, names ...string) *relayTestNet {
	t.Helper()
	n := &relayTestNet{peers: newTestPeers(t, append([]string{"sync"}, names...)...)}
	for _, p := range n.peers {
		p.cfg.Patterns = o.patterns
	}
	n.startServer(t, "127.0.0.1:0", o)
	return n
}

func (n *relayTestNet) startServer(t *testing.T, addr string, o relayTestOpts) {
	t.Helper()
	ln, err := Listen("tcp", addr, n.peers["sync"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := &RelayServer{Config: n.peers["sync"].cfg, Allow: o.rules.Allow, AcceptTimeout: 2 * time.Second}
	if o.tweak != nil {
		o.tweak(srv)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	n.srv, n.addr = srv, ln.Addr().String()
	t.Cleanup(func() {
		srv.Close()
		if err := <-errc; !errors.Is(err, ErrRelayServerClosed) {
			t.Errorf("Serve returned %v, want ErrRelayServerClosed", err)
		}
	})
}

func (n *relayTestNet) client(name string) *RelayClient {
	return &RelayClient{Config: n.peers[name].cfg, Server: "sync", Address: n.addr}
}

// tower registers name with the sync server and serves relayed connections.
func (n *relayTestNet) tower(t *testing.T, name string, handle func(c net.Conn)) net.Listener {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := n.client(name).Listen(ctx)
	if err != nil {
		t.Fatalf("%s: Listen: %v", name, err)
	}
	serveAll(t, l, handle)
	return l
}

func relayEcho(c net.Conn) {
	io.Copy(c, c)
}

func relayWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func relayCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// relayRaw opens an outer connection to the sync server as peer name, for
// speaking the control protocol by hand.
func (n *relayTestNet) relayRaw(t *testing.T, name string) *Conn {
	t.Helper()
	d := &Dialer{Config: n.peers[name].cfg, Peer: "sync"}
	c, err := d.DialContext(relayCtx(t), "tcp", n.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c.(*Conn)
}

// checkNoSecrets fails if a private key of any peer appears in the logs.
func (n *relayTestNet) checkNoSecrets(t *testing.T) {
	t.Helper()
	for _, p := range n.peers {
		secret := string(p.key.MarshalPrivateText())
		secret = strings.TrimSpace(secret)
		for _, q := range n.peers {
			if strings.Contains(q.logs.String(), secret) {
				t.Errorf("%s's log holds %s's private key", q.name, p.name)
			}
		}
	}
}

func TestRelayEndToEnd(t *testing.T) {
	for _, pat := range []Pattern{KK, XK} {
		t.Run(pat.String(), func(t *testing.T) {
			checkNoGoroutineLeak(t)
			n := newRelayTestNet(t, relayTestOpts{
				rules:    RelayRules{{From: "wallet", To: "tower"}},
				patterns: []Pattern{pat, KK},
			}, "wallet", "tower")

			towerSide := make(chan ConnectionState, 1)
			towerOuter := make(chan ConnectionState, 1)
			n.tower(t, "tower", func(c net.Conn) {
				nc := c.(*Conn)
				towerSide <- nc.ConnectionState()
				towerOuter <- nc.NetConn().(*relayStream).Conn.ConnectionState()
				msg, err := io.ReadAll(c) // until the wallet's CloseWrite
				if err != nil {
					t.Errorf("tower read: %v", err)
					return
				}
				c.Write(append([]byte("reply:"), msg...))
			})

			start := time.Now()
			c, err := n.client("wallet").Dial(relayCtx(t), "tower")
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			t.Logf("relayed dial (outer handshake, CONNECT, dial-back, inner handshake): %v", time.Since(start))
			defer c.Close()

			ws := c.ConnectionState()
			ts := <-towerSide
			if !ws.HandshakeComplete || !ws.Initiator || ws.Peer.Name != "tower" || ws.Peer.PublicKey != n.peers["tower"].key.PublicKey() || ws.Pattern != pat {
				t.Errorf("wallet side state: %+v", ws)
			}
			if !ts.HandshakeComplete || ts.Initiator || ts.Peer.Name != "wallet" || ts.Peer.PublicKey != n.peers["wallet"].key.PublicKey() || ts.Pattern != pat {
				t.Errorf("tower side state: %+v", ts)
			}
			if len(ws.HandshakeHash) != 32 || !bytes.Equal(ws.HandshakeHash, ts.HandshakeHash) {
				t.Errorf("handshake hashes differ: %x vs %x", ws.HandshakeHash, ts.HandshakeHash)
			}
			// The outer sessions (with the sync server) are different ones.
			if wo := c.NetConn().(*relayStream).Conn.ConnectionState(); bytes.Equal(wo.HandshakeHash, ws.HandshakeHash) || wo.Peer.Name != "sync" {
				t.Errorf("wallet's outer session: %+v", wo)
			}
			if to := <-towerOuter; bytes.Equal(to.HandshakeHash, ts.HandshakeHash) || to.Peer.Name != "sync" {
				t.Errorf("tower's outer session: %+v", to)
			}
			if p, ok := PeerOf(c); !ok || p.Name != "tower" {
				t.Errorf("PeerOf(wallet conn) = %v, %v", p, ok)
			}
			if p, ok := PeerOf(c.NetConn()); !ok || p.Name != "sync" {
				t.Errorf("PeerOf(wallet conn's NetConn) = %v, %v; want the sync server", p, ok)
			}
			if got := c.RemoteAddr().String(); got != "relay:sync" {
				t.Errorf("RemoteAddr = %q", got)
			}

			// CloseWrite ends the wallet's direction end to end (the inner close
			// record); the reply still comes back.
			msg := bytes.Repeat([]byte("co-sign this transaction "), 10000)
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("wallet read: %v\nSYNC:\n%s\nTOWER:\n%s", err, n.peers["sync"].logs, n.peers["tower"].logs)
			}
			if !bytes.Equal(got, append([]byte("reply:"), msg...)) {
				t.Fatalf("wallet got %d bytes, want %d", len(got), len(msg)+6)
			}
			c.Close()

			sync := n.peers["sync"].logs
			relayWaitFor(t, "the session-end log line", func() bool {
				return strings.Contains(sync.String(), "op=session from=wallet to=tower outcome=closed")
			})
			mustContain(t, sync.String(), "op=register from=tower outcome=ok", "op=connect from=wallet to=tower outcome=ok")
			mustContain(t, n.peers["wallet"].logs.String(), "op=connect server=sync peer=tower outcome=ok")
			mustContain(t, n.peers["tower"].logs.String(), "op=register server=sync outcome=ok", "op=accept server=sync outcome=ok",
				"direction=in addr=relay:sync pattern="+pat.String())
			n.checkNoSecrets(t)
		})
	}
}

func TestRelayHTTP(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}}, "wallet", "tower")
	l, err := n.client("tower").Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	type peerKey struct{}
	hs := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello %s", r.Context().Value(peerKey{}))
		}),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			p, _ := PeerOf(c)
			return context.WithValue(ctx, peerKey{}, p.Name)
		},
	}
	done := make(chan struct{})
	go func() { defer close(done); hs.Serve(l) }()
	defer func() { hs.Close(); <-done }()

	tr := &http.Transport{DialContext: n.client("wallet").DialContext}
	defer tr.CloseIdleConnections()
	for i := 0; i < 3; i++ { // the second and third reuse the connection
		resp, err := (&http.Client{Transport: tr}).Get("http://tower/status")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "hello wallet" {
			t.Fatalf("body %q", body)
		}
	}
	if got := strings.Count(n.peers["sync"].logs.String(), "op=connect from=wallet to=tower outcome=ok"); got != 1 {
		t.Errorf("%d relayed connections, want 1 (keep-alive)", got)
	}
}

func TestRelayPolicy(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}}, "wallet", "wallet2", "tower", "tower2")
	n.tower(t, "tower", relayEcho)
	n.tower(t, "tower2", relayEcho)

	c, err := n.client("wallet").Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatalf("allowed dial: %v", err)
	}
	c.Close()

	for _, tc := range []struct{ from, to string }{{"wallet2", "tower"}, {"wallet", "tower2"}} {
		start := time.Now()
		_, err := n.client(tc.from).Dial(relayCtx(t), tc.to)
		var re *RelayError
		if !errors.Is(err, ErrRelayDenied) || !errors.As(err, &re) || re.Code != "denied" {
			t.Fatalf("%s -> %s: err = %v, want a denied RelayError", tc.from, tc.to, err)
		}
		t.Logf("%s -> %s refused in %v: %v", tc.from, tc.to, time.Since(start), err)
		mustContain(t, err.Error(), "policy does not allow "+tc.from+" to reach "+tc.to)
		mustContain(t, n.peers["sync"].logs.String(),
			fmt.Sprintf(`op=connect from=%s to=%s outcome=denied reason="policy does not allow %s to reach %s"`, tc.from, tc.to, tc.from, tc.to))
		mustContain(t, n.peers[tc.from].logs.String(), "op=connect server=sync peer="+tc.to+" outcome=denied")
	}
	// A denied request never reaches the watchtower.
	if s := n.peers["tower2"].logs.String(); strings.Contains(s, "op=accept") {
		t.Errorf("tower2 was asked to accept a denied connection:\n%s", s)
	}
	if got := strings.Count(n.peers["tower"].logs.String(), "op=accept"); got != 1 {
		t.Errorf("tower accepted %d connections, want 1", got)
	}

	// No policy at all denies everything.
	n2 := newRelayTestNet(t, relayTestOpts{tweak: func(s *RelayServer) { s.Allow = nil }}, "wallet", "tower")
	n2.tower(t, "tower", relayEcho)
	if _, err := n2.client("wallet").Dial(relayCtx(t), "tower"); !errors.Is(err, ErrRelayDenied) {
		t.Fatalf("nil Allow: err = %v, want ErrRelayDenied", err)
	}
	mustContain(t, n2.peers["sync"].logs.String(), "relay server has no policy")
}

func TestRelayRules(t *testing.T) {
	for _, tc := range []struct {
		pat, name string
		want      bool
	}{
		{"*", "anything", true},
		{"wallet-*", "wallet-1", true},
		{"wallet-*", "wallet-", true},
		{"wallet-*", "wallet", false},
		{"wallet-*", "xwallet-1", false},
		{"*-tower", "eu-tower", true},
		{"*-tower", "eu-tower2", false},
		{"w?", "w1", true},
		{"w?", "w12", false},
		{"a*b*c", "abc", true},
		{"a*b*c", "axxbyyc", true},
		{"a*b*c", "axxbyy", false},
		{"tower", "tower", true},
		{"tower", "tower2", false},
	} {
		if got := relayMatch(tc.pat, tc.name); got != tc.want {
			t.Errorf("relayMatch(%q, %q) = %v", tc.pat, tc.name, got)
		}
	}
	rules := RelayRules{{From: "wallet-*", To: "tower-eu"}, {From: "ops", To: "*"}}
	p := func(name string) Peer { return Peer{Name: name} }
	for _, tc := range []struct {
		from, to string
		want     bool
	}{
		{"wallet-1", "tower-eu", true},
		{"wallet-1", "tower-us", false},
		{"ops", "tower-us", true},
		{"tower-eu", "wallet-1", false},
	} {
		if got := rules.Allow(p(tc.from), p(tc.to)); got != tc.want {
			t.Errorf("Allow(%s, %s) = %v", tc.from, tc.to, got)
		}
	}
	peers := newTestPeers(t, "wallet-1", "tower-eu", "ops")
	kr := peers["ops"].cfg.Keyring
	if err := rules.Check(kr); err != nil {
		t.Errorf("Check: %v", err)
	}
	if err := (RelayRules{{From: "walet-*", To: "tower-eu"}}).Check(kr); err == nil || !strings.Contains(err.Error(), `"walet-*" matches no peer`) {
		t.Errorf("typo: %v", err)
	}
	if err := (RelayRules{{From: "Wallet[1]", To: "tower-eu"}}).Check(kr); err == nil {
		t.Error("bad pattern accepted")
	}
}

func TestRelayOfflinePeer(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{
		rules: RelayRules{{From: "wallet", To: "*"}},
		tweak: func(s *RelayServer) { s.AcceptTimeout = time.Second },
	}, "wallet", "tower", "mute", "gone")
	wallet := n.client("wallet")

	check := func(peer, code string, max time.Duration) {
		t.Helper()
		start := time.Now()
		_, err := wallet.Dial(relayCtx(t), peer)
		d := time.Since(start)
		var re *RelayError
		if !errors.Is(err, ErrPeerOffline) || !errors.As(err, &re) || re.Code != code {
			t.Fatalf("%s: err = %v, want ErrPeerOffline with code %s", peer, err, code)
		}
		if d > max {
			t.Errorf("%s: error took %v, want under %v", peer, d, max)
		}
		t.Logf("%s: %v after %v", peer, err, d)
	}

	// Never registered.
	check("tower", "offline", 2*time.Second)
	mustContain(t, n.peers["sync"].logs.String(), `op=connect from=wallet to=tower outcome=offline reason="tower is not registered with the sync server"`)

	// Registered, but never answers INCOMING: a hand-written watchtower.
	mute := n.relayRaw(t, "mute")
	if err := writeRelayLine(mute, "REGISTER"); err != nil {
		t.Fatal(err)
	}
	if line, err := readRelayLine(mute); err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("REGISTER reply %q, %v", line, err)
	}
	check("mute", "no-answer", 2*time.Second)
	if line, err := readRelayLine(mute); err != nil || !strings.HasPrefix(line, "INCOMING ") ||
		!validRelayToken(line[9:9+2*relayTokenLen]) || line[9+2*relayTokenLen:] != " "+n.peers["wallet"].key.PublicKey().String() {
		t.Errorf("mute got %q, %v; want INCOMING <token> <wallet's key>", line, err)
	}
	mustContain(t, n.peers["sync"].logs.String(), "op=connect from=wallet to=mute outcome=no-answer")

	// Registered, then gone: the registration ends with the connection.
	l, err := n.client("gone").Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	relayWaitFor(t, "the unregister", func() bool {
		return strings.Contains(n.peers["sync"].logs.String(), `op=unregister from=gone outcome=done reason="peer closed the control connection"`)
	})
	check("gone", "offline", 2*time.Second)

	// The target is in the wallet's keyring but not in the sync server's.
	stranger, err := GenerateKey(X25519, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.peers["wallet"].cfg.Keyring.Add(Peer{Name: "stranger", PublicKey: stranger.PublicKey()}); err != nil {
		t.Fatal(err)
	}
	_, err = wallet.Dial(relayCtx(t), "stranger")
	var re *RelayError
	if !errors.Is(err, ErrUnknownPeer) || !errors.As(err, &re) || re.Code != "unknown-peer" {
		t.Fatalf("stranger: err = %v", err)
	}

	// The sync server itself unreachable.
	dead := &RelayClient{Config: n.peers["wallet"].cfg, Server: "sync", Address: "127.0.0.1:1"}
	start := time.Now()
	if _, err := dead.Dial(relayCtx(t), "tower"); err == nil || !strings.Contains(err.Error(), `reaching the sync server "sync"`) {
		t.Fatalf("dead sync server: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("dead sync server: error took %v", d)
	}
}

// TestRelayProtocolByHand speaks the control protocol as WIRE.md §12
// writes it, with a hand-written watchtower.
func TestRelayProtocolByHand(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}}, "wallet", "tower", "other")

	for _, tc := range []struct{ send, want string }{
		{"HELLO", "ERR bad-request "},
		{"REGISTER now", "ERR bad-request "},
		{"CONNECT not-a-key", "ERR bad-request CONNECT needs the target's public key"},
		{"ACCEPT 0123", "ERR bad-request "},
		{"ACCEPT " + strings.Repeat("0", 32), "ERR bad-token unknown or expired token"},
	} {
		c := n.relayRaw(t, "other")
		writeRelayLine(c, tc.send)
		line, err := readRelayLine(c)
		if err != nil || !strings.HasPrefix(line, tc.want) {
			t.Errorf("%q: reply %q, %v; want %q", tc.send, line, err, tc.want)
		}
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("%q: after the ERR line, read %v; want a clean close", tc.send, err)
		}
	}
	// An over-long line is dropped without a reply.
	c := n.relayRaw(t, "other")
	c.Write(bytes.Repeat([]byte("A"), 300))
	if _, err := readRelayLine(c); err == nil {
		t.Error("over-long line answered")
	}

	// A watchtower by hand: REGISTER, read INCOMING, ACCEPT, then run the
	// end-to-end handshake as a plain noisetor Server.
	ctrl := n.relayRaw(t, "tower")
	writeRelayLine(ctrl, "REGISTER")
	if line, _ := readRelayLine(ctrl); line != "OK 30000" {
		t.Fatalf("REGISTER reply %q, want OK 30000 (the default ping interval in ms)", line)
	}
	type dialResult struct {
		c   *Conn
		err error
	}
	dialed := make(chan dialResult, 1)
	go func() {
		c, err := n.client("wallet").Dial(relayCtx(t), "tower")
		dialed <- dialResult{c, err}
	}()
	line, err := readRelayLine(ctrl)
	token, ok := strings.CutPrefix(line, "INCOMING ")
	token, requester, ok2 := strings.Cut(token, " ")
	if err != nil || !ok || !ok2 || requester != n.peers["wallet"].key.PublicKey().String() {
		t.Fatalf("control line %q, %v; want INCOMING <token> <wallet's key>", line, err)
	}
	// A token is good only for the peer it was sent to.
	thief := n.relayRaw(t, "other")
	writeRelayLine(thief, "ACCEPT "+token)
	if line, _ := readRelayLine(thief); !strings.HasPrefix(line, "ERR bad-token") {
		t.Errorf("token presented by another peer: %q", line)
	}
	acc := n.relayRaw(t, "tower")
	writeRelayLine(acc, "ACCEPT "+token)
	if line, _ := readRelayLine(acc); line != "OK" {
		t.Fatalf("ACCEPT reply %q", line)
	}
	acc.SetDeadline(time.Time{})
	inner := Server(acc, n.peers["tower"].cfg)
	if err := inner.HandshakeContext(relayCtx(t)); err != nil {
		t.Fatalf("hand-made watchtower handshake: %v", err)
	}
	r := <-dialed
	if r.err != nil {
		t.Fatalf("wallet Dial: %v", r.err)
	}
	defer r.c.Close()
	if p, _ := PeerOf(inner); p.Name != "wallet" {
		t.Errorf("hand-made watchtower sees %q", p.Name)
	}
	go r.c.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(inner, buf); err != nil || string(buf) != "ping" {
		t.Errorf("read %q, %v", buf, err)
	}
	inner.Close()
	// The token is spent.
	again := n.relayRaw(t, "tower")
	writeRelayLine(again, "ACCEPT "+token)
	if line, _ := readRelayLine(again); !strings.HasPrefix(line, "ERR bad-token") {
		t.Errorf("spent token: %q", line)
	}

	// A second registration of the same peer replaces the first.
	ctrl2 := n.relayRaw(t, "tower")
	writeRelayLine(ctrl2, "REGISTER")
	if line, _ := readRelayLine(ctrl2); line != "OK 30000" {
		t.Fatalf("second REGISTER reply %q", line)
	}
	if _, err := readRelayLine(ctrl); err == nil {
		t.Error("first registration still open")
	}
	mustContain(t, n.peers["sync"].logs.String(), "op=register from=tower outcome=replaced")
}

func TestRelayPing(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{
		rules: RelayRules{{From: "wallet", To: "*"}},
		tweak: func(s *RelayServer) { s.PingInterval = 100 * time.Millisecond },
	}, "wallet", "tower", "deaf")
	n.tower(t, "tower", relayEcho)

	// A watchtower that never answers PING is dropped after 2.5 intervals.
	deaf := n.relayRaw(t, "deaf")
	writeRelayLine(deaf, "REGISTER")
	if line, _ := readRelayLine(deaf); line != "OK 100" {
		t.Fatalf("REGISTER reply %q", line)
	}
	pings := 0
	for {
		line, err := readRelayLine(deaf)
		if err != nil {
			break
		}
		if line != "PING" {
			t.Fatalf("deaf got %q", line)
		}
		pings++
	}
	if pings < 2 {
		t.Errorf("%d PINGs before the drop", pings)
	}
	relayWaitFor(t, "the unregister log line", func() bool {
		return strings.Contains(n.peers["sync"].logs.String(), `op=unregister from=deaf outcome=done reason="no PONG within 250ms: link presumed dead"`)
	})
	if _, err := n.client("wallet").Dial(relayCtx(t), "deaf"); !errors.Is(err, ErrPeerOffline) {
		t.Errorf("deaf: %v", err)
	}

	// The RelayClient answers, so it stays registered.
	time.Sleep(time.Second)
	c, err := n.client("wallet").Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatalf("tower after 10 ping intervals: %v", err)
	}
	c.Close()
	if s := n.peers["tower"].logs.String(); strings.Contains(s, "outcome=lost") {
		t.Errorf("tower lost its registration:\n%s", s)
	}
}

func TestRelayReconnect(t *testing.T) {
	checkNoGoroutineLeak(t)
	o := relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}}
	n := newRelayTestNet(t, o, "wallet", "tower")
	n.tower(t, "tower", relayEcho)
	wallet := n.client("wallet")
	c, err := wallet.Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatal(err)
	}
	// Restarting the sync server cuts live sessions (a truncation, not a
	// clean close) and the watchtower's registration; it re-registers.
	n.srv.Close()
	if _, err := c.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Errorf("session cut by the restart: read %v, want a truncation error", err)
	}
	c.Close()
	restart := time.Now()
	n.startServer(t, n.addr, o)
	relayWaitFor(t, "a relayed dial after the restart", func() bool {
		c, err := wallet.Dial(relayCtx(t), "tower")
		if err != nil {
			if !errors.Is(err, ErrPeerOffline) {
				t.Fatalf("dial after restart: %v", err)
			}
			return false
		}
		c.Close()
		return true
	})
	t.Logf("watchtower reachable again %v after the sync server restarted", time.Since(restart))
	mustContain(t, n.peers["tower"].logs.String(), "op=register server=sync outcome=lost", `outcome=ok reason=re-registered`)
}

// TestRelayManySessions runs 50 relayed sessions at once, one of which the
// watchtower stops reading: it must not hold up the 49 others.
func TestRelayManySessions(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}}}, "wallet", "tower")
	release := make(chan struct{})
	var slowGot atomic.Int64
	n.tower(t, "tower", func(c net.Conn) {
		kind := make([]byte, 1)
		if _, err := io.ReadFull(c, kind); err != nil {
			return
		}
		if kind[0] == 'S' {
			<-release // a stalled consumer
			m, _ := io.Copy(io.Discard, c)
			slowGot.Store(m)
			c.Write([]byte("done"))
			return
		}
		io.Copy(c, c)
	})
	wallet := n.client("wallet")

	const slowSize = 32 << 20
	slow, err := wallet.Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slowDone := make(chan error, 1)
	go func() {
		_, err := slow.Write(append([]byte{'S'}, make([]byte, slowSize)...))
		if err == nil {
			err = slow.CloseWrite()
		}
		slowDone <- err
	}()
	time.Sleep(200 * time.Millisecond) // let it fill the buffers on its path

	const fast = 49
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, fast)
	for i := 0; i < fast; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := wallet.Dial(ctx, "tower")
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			msg := make([]byte, 64<<10)
			rand.Read(msg)
			go func() {
				c.Write(append([]byte{'F'}, msg...))
				c.CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("session %d: echo differs", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	elapsed := time.Since(start)
	t.Logf("%d concurrent relayed sessions (dial + 64 KiB echo each) done in %v while one session stalled", fast, elapsed)
	select {
	case err := <-slowDone:
		t.Fatalf("the stalled session's %d MiB write finished early (%v): the test did not stall it", slowSize>>20, err)
	default:
	}

	close(release)
	if err := <-slowDone; err != nil {
		t.Fatalf("stalled session after release: %v", err)
	}
	slow.SetReadDeadline(time.Now().Add(30 * time.Second))
	if got, err := io.ReadAll(slow); err != nil || string(got) != "done" {
		t.Fatalf("stalled session reply %q, %v", got, err)
	}
	if got := slowGot.Load(); got != slowSize {
		t.Errorf("stalled session delivered %d bytes, want %d", got, slowSize)
	}
	slow.Close()
	relayWaitFor(t, "50 session-end log lines", func() bool {
		return strings.Count(n.peers["sync"].logs.String(), "op=session from=wallet to=tower") == fast+1
	})
	for _, line := range strings.Split(n.peers["sync"].logs.String(), "\n") {
		if strings.Contains(line, "op=session") && !strings.Contains(line, "outcome=closed") {
			t.Errorf("session did not end cleanly: %s", line)
		}
	}
}

// TestRelayOverTor runs the mediation over Tor: the sync server is an onion
// service with client authorization, and the wallet and the watchtower reach
// it through Tor's SOCKS port, as in production.
func TestRelayOverTor(t *testing.T) {
	srvTor, cliTor := torPair(t)
	peers := newTestPeers(t, "sync", "wallet", "tower")
	walletAuth, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	towerAuth, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	// The sync server's keyring carries each peer's client-authorization key.
	syncRing, err := NewKeyring(
		Peer{Name: "wallet", PublicKey: peers["wallet"].key.PublicKey(), ClientAuth: walletAuth.PublicKey()},
		Peer{Name: "tower", PublicKey: peers["tower"].key.PublicKey(), ClientAuth: towerAuth.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	peers["sync"].cfg.Keyring = syncRing
	onionKey, err := GenerateOnionKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	ol, err := srvTor.ListenOnion(ctx, &OnionConfig{Key: onionKey, Port: 7400, Keyring: syncRing})
	if err != nil {
		t.Fatal(err)
	}
	defer ol.Close()
	published := time.Since(start)
	srv := &RelayServer{Config: peers["sync"].cfg, Allow: RelayRules{{From: "wallet", To: "tower"}}.Allow}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(NewListener(ol, peers["sync"].cfg)) }()
	defer func() { srv.Close(); <-served }()

	addr := ol.Addr().String()
	tower := &RelayClient{Config: peers["tower"].cfg, Server: "sync", Address: addr,
		NetDialer: &TorDialer{Tor: cliTor, ClientAuth: towerAuth}}
	start = time.Now()
	l, err := tower.Listen(ctx)
	if err != nil {
		t.Fatalf("watchtower registration over Tor: %v", err)
	}
	registered := time.Since(start)
	// The handler replies without reading to the end: the wallet's close
	// record is still unread when it closes (see relayStream.Close).
	serveAll(t, l, func(c net.Conn) {
		p, _ := PeerOf(c)
		line := make([]byte, 5)
		if _, err := io.ReadFull(c, line); err == nil {
			fmt.Fprintf(c, "%s from %s", line, p.Name)
		}
	})

	wallet := &RelayClient{Config: peers["wallet"].cfg, Server: "sync", Address: addr,
		NetDialer: &TorDialer{Tor: cliTor, ClientAuth: walletAuth}}
	var dials []time.Duration
	for i := 0; i < 3; i++ {
		start := time.Now()
		c, err := wallet.Dial(ctx, "tower")
		if err != nil {
			t.Fatalf("relayed dial %d over Tor: %v", i, err)
		}
		d := time.Since(start)
		io.WriteString(c, "hello")
		c.CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "hello from wallet" {
			t.Fatalf("reply %q, %v\nSYNC:\n%s\nTOWER:\n%s\nWALLET:\n%s", got, err, peers["sync"].logs, peers["tower"].logs, peers["wallet"].logs)
		}
		if p, _ := PeerOf(c); p.Name != "tower" {
			t.Errorf("wallet's peer %q", p.Name)
		}
		dials = append(dials, d)
	}
	torRecord(t, "relay over onion: sync server published %v; watchtower registered %v; relayed dial (CONNECT, dial-back, inner KK) first %v, then %v, %v",
		published.Round(time.Millisecond), registered.Round(time.Millisecond),
		dials[0].Round(time.Millisecond), dials[1].Round(time.Millisecond), dials[2].Round(time.Millisecond))

	// The offline error stays fast over Tor.
	l.Close()
	relayWaitFor(t, "the unregister", func() bool {
		return strings.Contains(peers["sync"].logs.String(), "op=unregister from=tower")
	})
	start = time.Now()
	if _, err := wallet.Dial(ctx, "tower"); !errors.Is(err, ErrPeerOffline) {
		t.Fatalf("offline watchtower over Tor: %v", err)
	}
	torRecord(t, "relay over onion: offline watchtower reported in %v", time.Since(start).Round(time.Millisecond))
}

// One requester cannot take every session of the sync server.
func TestRelaySessionsPerPeer(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{
		rules: RelayRules{{From: "wallet*", To: "tower"}},
		tweak: func(s *RelayServer) { s.MaxSessionsPerPeer = 2 },
	}, "wallet", "wallet2", "tower")
	n.tower(t, "tower", relayEcho)
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := 0; i < 2; i++ {
		c, err := n.client("wallet").Dial(relayCtx(t), "tower")
		if err != nil {
			t.Fatalf("session %d: %v", i+1, err)
		}
		open = append(open, c)
	}
	_, err := n.client("wallet").Dial(relayCtx(t), "tower")
	var re *RelayError
	if !errors.As(err, &re) || re.Code != "busy" || !errors.Is(err, ErrRelayBusy) {
		t.Fatalf("third session of one wallet: %v, want a busy RelayError matching ErrRelayBusy", err)
	}
	mustContain(t, err.Error(), "wallet has 2 sessions already")
	// Another wallet still gets through.
	c, err := n.client("wallet2").Dial(relayCtx(t), "tower")
	if err != nil {
		t.Fatalf("other wallet: %v", err)
	}
	c.Close()
	// Sessions that end free their slots.
	open[0].Close()
	open = open[1:]
	relayWaitFor(t, "a freed session slot", func() bool {
		c, err := n.client("wallet").Dial(relayCtx(t), "tower")
		if err != nil {
			return false
		}
		open = append(open, c)
		return true
	})
}
