package noisetor

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Availability of the relay under attack (issue 10): members reach each
// other through the sync server over links as slow as Tor circuits while a
// member, or the sync server itself, does its worst.

// relayTorDelay is the one-way latency of the members' links in these tests:
// that of a Tor circuit.
const relayTorDelay = 200 * time.Millisecond

// relaySlowClient is a RelayClient for name whose link to the sync server
// has Tor-like latency.
func (n *relayTestNet) relaySlowClient(t *testing.T, name string) *RelayClient {
	rc := n.client(name)
	rc.Address = delayProxy(t, n.addr, "", relayTorDelay)
	return rc
}

// relayForgedPreamble is the best KK preamble for responder that a party
// without claimed's private key can build "from" claimed: under wire
// version 2 the hint and tag need the pair key of claimed and responder, so
// it can only guess them (in version 1 anyone holding the public keys could
// compute the tag).
func relayForgedPreamble(responder, claimed PublicKey) []byte {
	pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
	rand.Read(pre.salt[:])
	raw := pre.marshal()
	rand.Read(raw[24:])
	return raw
}

// relayMembersGetIn has name dial peer through its slow link attempts
// times while an attack runs, echoing a message each time, and fails the
// test for every attempt that does not get through.
func relayMembersGetIn(t *testing.T, rc *RelayClient, peer string, attempts int) {
	t.Helper()
	for i := range attempts {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		start := time.Now()
		c, err := rc.Dial(ctx, peer)
		if err == nil {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			msg := fmt.Sprintf("attempt %d", i)
			var got []byte
			if _, err = io.WriteString(c, msg); err == nil {
				got = make([]byte, len(msg))
				_, err = io.ReadFull(c, got)
			}
			if err == nil && string(got) != msg {
				err = fmt.Errorf("echo %q, want %q", got, msg)
			}
			c.Close()
		}
		cancel()
		if err != nil {
			t.Errorf("member attempt %d of %d failed after %v: %v", i+1, attempts, time.Since(start).Round(time.Millisecond), err)
		} else {
			t.Logf("member attempt %d: in after %v", i+1, time.Since(start).Round(time.Millisecond))
		}
	}
}

// A member opens outer connections to the sync server and never says what
// they are for. It keeps only its own small share of them, each for a short
// time, while the other members keep getting in.
func TestRelayIdleConnectionsPerPeer(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "*", To: "tower"}}}, "wallet", "tower", "mallory")
	tl, err := n.relaySlowClient(t, "tower").Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	serveAll(t, tl, relayEcho)

	const flood = 200
	type result struct {
		busy     bool          // refused at once with "ERR busy"
		heldFor  time.Duration // how long the server kept it otherwise
		lastLine string
	}
	results := make(chan result, flood)
	var attackers sync.WaitGroup
	stop := make(chan struct{})
	var opened atomic.Int32
	for range 8 {
		attackers.Add(1)
		go func() {
			defer attackers.Done()
			d := &Dialer{Config: n.peers["mallory"].cfg, Peer: "sync"}
			for opened.Add(1) <= flood {
				c, err := d.DialContext(context.Background(), "tcp", n.addr)
				if err != nil {
					t.Errorf("mallory's handshake: %v", err)
					return
				}
				attackers.Add(1)
				go func() {
					defer attackers.Done()
					defer c.Close()
					start := time.Now()
					c.SetReadDeadline(start.Add(25 * time.Second))
					line, err := readRelayLine(c)
					r := result{lastLine: line}
					if err == nil && strings.HasPrefix(line, "ERR busy ") {
						r.busy = true
					} else {
						readUntilClosed(c, start.Add(25*time.Second))
						r.heldFor = time.Since(start)
					}
					select {
					case results <- r:
					case <-stop:
					}
				}()
			}
		}()
	}
	relayMembersGetIn(t, n.relaySlowClient(t, "wallet"), "tower", 4)

	busy, held := 0, []time.Duration{}
	deadline := time.After(30 * time.Second)
	for range flood {
		select {
		case r := <-results:
			if r.busy {
				busy++
				mustContain(t, r.lastLine, "mallory has 16 connections without a request already")
			} else {
				held = append(held, r.heldFor)
			}
		case <-deadline:
			t.Fatalf("mallory's connections still open after 30s: %d refused, %d ended", busy, len(held))
		}
	}
	close(stop)
	attackers.Wait()
	t.Logf("mallory's %d idle connections: %d refused at once (busy), %d held for %v", flood, busy, len(held), held)
	if busy < flood-defaultRelayMaxIdlePerPeer {
		t.Errorf("the sync server refused only %d of mallory's %d idle connections: it held more than its share of %d", busy, flood, defaultRelayMaxIdlePerPeer)
	}
	if longest := slices.Max(append(held, 0)); longest > defaultRelayRequestTimeout+5*time.Second {
		t.Errorf("the sync server held an idle connection for %v", longest)
	}
	mustContain(t, n.peers["sync"].logs.String(), "op=request from=mallory outcome=busy")
}

// A wallet that the sync server lets through but the watchtower does not
// list floods the watchtower with relayed sessions, each carrying a
// preamble forged from public keys in the name of a wallet the watchtower
// does list, then stalls. On wire version 1 each such session held a DH
// slot of the watchtower's relay listener for the whole handshake timeout,
// and eight locked every wallet out. The watchtower now ignores requests
// the sync server announces as from a peer it does not list, before
// opening any connection.
func TestRelayUnlistedWalletFlood(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{
		rules: RelayRules{{From: "*", To: "tower"}},
		tweak: func(s *RelayServer) { s.MaxSessionsPerPeer = 200 },
	}, "wallet", "tower", "mallory")
	// The watchtower lists the sync server and the wallet, not mallory.
	towerRing, err := NewKeyring(
		Peer{Name: "sync", PublicKey: n.peers["sync"].key.PublicKey()},
		Peer{Name: "wallet", PublicKey: n.peers["wallet"].key.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	n.peers["tower"].cfg.Keyring = towerRing
	tower := n.relaySlowClient(t, "tower")
	tl, err := tower.Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	serveAll(t, tl, relayEcho)

	relayed, refused, stop := relayFloodForged(t, n, "mallory", "tower", "wallet", 48)
	time.Sleep(time.Second) // let the flood build up
	relayMembersGetIn(t, n.relaySlowClient(t, "wallet"), "tower", 5)
	stop()
	t.Logf("mallory's sessions: %d relayed, %d refused", relayed.Load(), refused.Load())
	if relayed.Load() != 0 {
		t.Errorf("the watchtower accepted %d relayed sessions from a wallet it does not list", relayed.Load())
	}
	tl.Close()
	logs := n.peers["tower"].logs.String()
	if f := strings.Count(logs, "direction=in addr=relay:sync"); f != 5 {
		t.Errorf("the watchtower ran %d end-to-end handshakes, want the wallet's 5:\n%s", f, logs)
	}
	mustContain(t, logs, `msg="noisetor: relay refusals" op=accept server=sync outcome=refused`, "reasons.requester_not_in_keyring=")
	if r := strings.Count(logs, "requester_not_in_keyring"); r > 2 {
		t.Errorf("%d log records for ignored requests, want one aggregate", r)
	}
}

// A malicious sync server floods the watchtower with INCOMING lines,
// announcing them as from a listed wallet, from peers the watchtower does
// not know and from itself, and never answers the accept connections. The
// watchtower opens at most its bounded share of connections, per announced
// requester and in all, and logs aggregates, not a record per line.
func TestRelayIncomingFlood(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newEvilNet(t, func(e *evilRelay, w *Conn, target Peer) { w.Close() }, relayEcho)
	e := n.evil
	// Count the watchtower's accept connections the evil relay holds.
	var maxHeld atomic.Int32
	e.mu.Lock()
	ctrl := e.ctrl["tower"]
	e.mu.Unlock()
	outsider, _ := GenerateKey(X25519, nil)
	walletKey := n.peers["wallet"].key.PublicKey()
	syncKey := n.peers["sync"].key.PublicKey()
	const flood = 3000
	relayRecords := func() int { return strings.Count(n.peers["tower"].logs.String(), `msg="noisetor: relay`) }
	before := relayRecords()
	e.mu.Lock()
	base := len(e.conns)
	e.mu.Unlock()
	go func() {
		for i := range flood {
			token := make([]byte, 16)
			rand.Read(token)
			key := walletKey
			switch i % 3 {
			case 1:
				key = outsider.PublicKey()
			case 2:
				key = syncKey
			}
			if _, err := fmt.Fprintf(ctrl, "INCOMING %x %s\n", token, key); err != nil {
				return
			}
		}
	}()
	// The evil relay's handler keeps unknown ACCEPTs open without an answer;
	// count them through its connection list.
	for range 40 {
		time.Sleep(50 * time.Millisecond)
		e.mu.Lock()
		h := int32(len(e.conns) - base)
		e.mu.Unlock()
		if h > maxHeld.Load() {
			maxHeld.Store(h)
		}
	}
	tl := n.towerLn["tower"].(*relayListener)
	relayWaitFor(t, "the watchtower to read every INCOMING", func() bool {
		tl.refusals.mu.Lock()
		defer tl.refusals.mu.Unlock()
		return tl.refusals.total == flood-int(maxHeld.Load())
	})
	t.Logf("accept connections the watchtower opened: %d", maxHeld.Load())
	if m := maxHeld.Load(); m > defaultRelayMaxPendingPerPeer {
		t.Errorf("the watchtower opened %d accept connections for one announced requester, want at most %d", m, defaultRelayMaxPendingPerPeer)
	}
	if m := maxHeld.Load(); m == 0 {
		t.Error("the watchtower opened no accept connection at all")
	}
	e.mu.Lock()
	registers := e.registers
	e.mu.Unlock()
	if registers != 2 { // tower and tower2, once each
		t.Errorf("%d registrations: the watchtower lost its control connection", registers)
	}
	start := time.Now()
	n.towerLn["tower"].Close()
	t.Logf("closing the listener took %v", time.Since(start))
	logs := n.peers["tower"].logs.String()
	records := relayRecords() - before
	t.Logf("%d log records for %d INCOMING lines", records, flood)
	if records > 20 {
		t.Errorf("%d log records for %d INCOMING lines: the sync server can fill the watchtower's disk", records, flood)
	}
	// Each reason is logged at once when new, then in the aggregates.
	sum := func(reason string) (n int) {
		for _, m := range regexp.MustCompile(`reasons\.`+reason+`=(\d+)`).FindAllStringSubmatch(logs, -1) {
			k, _ := strconv.Atoi(m[1])
			n += k
		}
		return n
	}
	if a, b := sum("requester_not_in_keyring"), sum("requester_is_sync_server"); a != 1000 || b != 1000 {
		t.Errorf("logged %d requests from outside the keyring and %d in the sync server's name, want 1000 each", a, b)
	}
	mustContain(t, logs, "reasons.requester_share_full=")
}

// A plain http.Client with 100 requests in parallel through the relay: past
// the sync server's sessions per peer the requests fail with an error that
// matches ErrRelayBusy; bounding the transport's connections below the limit
// makes them all succeed.
func TestRelayHTTPParallelBusy(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{
		rules: RelayRules{{From: "wallet", To: "tower"}},
		tweak: func(s *RelayServer) { s.MaxSessionsPerPeer = 8 },
	}, "wallet", "tower")
	l, err := n.client("tower").Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release // hold every request, so that each needs its own session
		io.WriteString(w, "ok")
	})}
	done := make(chan struct{})
	go func() { defer close(done); hs.Serve(l) }()
	defer func() { hs.Close(); <-done }()

	run := func(tr *http.Transport, parallel int, hold bool) (ok, busy int, other []error) {
		defer tr.CloseIdleConnections()
		var mu sync.Mutex
		var wg sync.WaitGroup
		for range parallel {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Get("http://tower/")
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					ok++
				case errors.Is(err, ErrRelayBusy):
					busy++
				default:
					other = append(other, err)
				}
			}()
		}
		if hold {
			// Let the requests pile up, then answer them all.
			relayWaitFor(t, "the requests to be in flight or refused", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return busy+len(other) >= parallel-8
			})
			time.Sleep(200 * time.Millisecond)
			close(release)
		}
		wg.Wait()
		return ok, busy, other
	}
	ok, busy, other := run(&http.Transport{DialContext: n.client("wallet").DialContext}, 100, true)
	t.Logf("unbounded transport: %d ok, %d busy, %d other", ok, busy, len(other))
	if busy == 0 || len(other) != 0 || ok+busy != 100 {
		t.Errorf("unbounded transport: %d ok, %d busy (ErrRelayBusy), other errors %v", ok, busy, other)
	}
	ok, busy, other = run(&http.Transport{DialContext: n.client("wallet").DialContext, MaxConnsPerHost: 6}, 100, false)
	t.Logf("transport with MaxConnsPerHost 6: %d ok, %d busy, %d other", ok, busy, len(other))
	if ok != 100 {
		t.Errorf("bounded transport: %d ok, %d busy, other errors %v", ok, busy, other)
	}
}

// relayFloodForged has attacker keep sessions open to target through the
// sync server, from the given number of goroutines: each sends, once
// relayed, a preamble forged in victim's name and stalls. stop ends the
// flood and waits for it.
func relayFloodForged(t *testing.T, n *relayTestNet, attacker, target, victim string, parallel int) (relayed, refused *atomic.Int32, stop func()) {
	relayed, refused = new(atomic.Int32), new(atomic.Int32)
	targetKey := n.peers[target].key.PublicKey()
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := &Dialer{Config: n.peers[attacker].cfg, Peer: "sync"}
			for {
				select {
				case <-done:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := d.DialContext(ctx, "tcp", n.addr)
				cancel()
				if err != nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				oc := c.(*Conn)
				oc.SetDeadline(time.Now().Add(10 * time.Second))
				writeRelayLine(oc, "CONNECT "+targetKey.String())
				line, err := readRelayLine(oc)
				if err == nil && line == "OK" {
					relayed.Add(1)
					oc.SetDeadline(time.Time{})
					if victim == attacker {
						// Its own genuine preamble and message 1, then a stall.
						oc.Write(genuineFlight(t, n.peers[attacker].cfg, targetKey, KK))
					} else {
						oc.Write(relayForgedPreamble(targetKey, n.peers[victim].key.PublicKey()))
					}
					select { // stall, as long as the test runs
					case <-done:
					case <-time.After(60 * time.Second):
					}
				} else {
					refused.Add(1)
				}
				oc.Close()
			}
		}()
	}
	return relayed, refused, func() { close(done); wg.Wait() }
}

// A wallet that the watchtower does list floods it the same way. It gets
// only its own share of the watchtower's relayed connections being set up
// (MaxPendingPerPeer, small here), so it cannot take what the other
// wallets need, whatever each of its sessions costs the watchtower.
func TestRelayListedWalletShare(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{
		rules: RelayRules{{From: "*", To: "tower"}},
		tweak: func(s *RelayServer) { s.MaxSessionsPerPeer = 200 },
	}, "wallet", "tower", "mallory")
	tower := n.relaySlowClient(t, "tower")
	tower.MaxPendingPerPeer = 3
	tl, err := tower.Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	serveAll(t, tl, relayEcho)
	relayed, refused, stop := relayFloodForged(t, n, "mallory", "tower", "mallory", 48)
	time.Sleep(time.Second)
	relayMembersGetIn(t, n.relaySlowClient(t, "wallet"), "tower", 5)
	// Each relayed session of mallory's holds its slot until its handshake
	// times out, far longer than this test: until stop, none can follow.
	r := relayed.Load()
	stop()
	t.Logf("mallory's sessions: %d relayed, %d refused", r, refused.Load())
	if r > 3 {
		t.Errorf("the watchtower took %d of mallory's sessions at once, want at most its share of 3", r)
		for _, line := range strings.Split(n.peers["tower"].logs.String(), "\n") {
			if strings.Contains(line, "outcome=failed") {
				t.Log(line)
			}
		}
	}
	tl.Close()
	mustContain(t, n.peers["tower"].logs.String(), "reasons.requester_share_full=")
}

// The limits leave honest bursts alone: a wallet on a slow link opens 60
// sessions at once (within the sync server's 64 per peer) and every one gets
// through, with the default limits at the sync server and the watchtower.
func TestRelayHonestBurst(t *testing.T) {
	checkNoGoroutineLeak(t)
	n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "wallet", To: "tower"}},
		tweak: func(s *RelayServer) { s.AcceptTimeout = 20 * time.Second }}, "wallet", "tower")
	tl, err := n.relaySlowClient(t, "tower").Listen(relayCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	serveAll(t, tl, relayEcho)
	wallet := n.relaySlowClient(t, "wallet")
	const burst = 60
	var wg sync.WaitGroup
	errs := make(chan error, burst)
	conns := make(chan net.Conn, burst)
	start := time.Now()
	for i := range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
			defer cancel()
			c, err := wallet.Dial(ctx, "tower")
			if err != nil {
				errs <- fmt.Errorf("session %d: %w", i, err)
				return
			}
			conns <- c
			c.SetDeadline(time.Now().Add(20 * time.Second))
			msg := fmt.Sprintf("session %d", i)
			got := make([]byte, len(msg))
			if _, err := io.WriteString(c, msg); err != nil {
				errs <- err
			} else if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
				errs <- fmt.Errorf("session %d: echo %q, %v", i, got, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	close(conns)
	t.Logf("%d sessions at once in %v", burst, time.Since(start).Round(time.Millisecond))
	for err := range errs {
		t.Error(err)
	}
	for c := range conns {
		c.Close()
	}
}

// A malicious sync server sends INCOMING lines as fast as the watchtower
// reads them and refuses every accept connection at once, to make the
// watchtower spend handshakes (static-key DH, on a token maybe) as fast as
// it can. The watchtower starts at most its pending limits' worth of accept
// connections per setup window, per announced requester and in all (small
// limits here, so that the bound is well below what the machine could do).
func TestRelayIncomingChurn(t *testing.T) {
	checkNoGoroutineLeak(t)
	const maxPending, maxPerPeer = 8, 4
	n := newEvilNet(t, func(e *evilRelay, w *Conn, target Peer) { w.Close() }, relayEcho,
		func(rc *RelayClient) { rc.MaxPending, rc.MaxPendingPerPeer = maxPending, maxPerPeer })
	e := n.evil
	e.refuseUnknownAccepts.Store(true)
	e.mu.Lock()
	ctrl := e.ctrl["tower"]
	e.mu.Unlock()
	keys := []PublicKey{n.peers["wallet"].key.PublicKey(), n.peers["tower2"].key.PublicKey(), n.peers["tower"].key.PublicKey()}
	stop := make(chan struct{})
	flooded := make(chan struct{})
	go func() {
		defer close(flooded)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			token := make([]byte, 16)
			rand.Read(token)
			if _, err := fmt.Fprintf(ctrl, "INCOMING %x %s\n", token, keys[i%len(keys)]); err != nil {
				return
			}
		}
	}()
	const run = 3 * time.Second
	start := time.Now()
	time.Sleep(run)
	close(stop)
	// The watchtower reads on through what is buffered: stop it, then count.
	n.towerLn["tower"].Close()
	elapsed := time.Since(start)
	<-flooded
	got := int(e.acceptLines.Load())
	// Per window: MaxPending in all, MaxPendingPerPeer for each of the three
	// announced requesters; the bucket starts full.
	windows := 1 + elapsed.Seconds()/relaySetupWindow.Seconds()
	bound := int(min(float64(len(keys)*maxPerPeer), maxPending) * windows)
	t.Logf("accept connections in %v: %d (bound %d)", elapsed.Round(time.Millisecond), got, bound)
	if got > bound+2 {
		t.Errorf("the watchtower opened %d accept connections in %v, want at most about %d", got, elapsed, bound)
	}
	if got == 0 {
		t.Error("the watchtower opened no accept connection at all")
	}
	logs := n.peers["tower"].logs.String()
	mustContain(t, logs, "reasons.accept_refused=")
	if !strings.Contains(logs, "reasons.requester_rate=") && !strings.Contains(logs, "reasons.total_rate=") {
		t.Error("no request was refused for its rate")
	}
}

// The sync server announces a wallet's request as another peer's, charging
// it to that peer's share: the watchtower refuses the connection at the
// inner preamble, which proves who is really calling, before any DH.
func TestRelayAnnouncedRequesterMismatch(t *testing.T) {
	checkNoGoroutineLeak(t)
	var n *evilNet
	n = newEvilNet(t, func(e *evilRelay, w *Conn, target Peer) {
		tc := e.incomingFrom(target.Name, n.peers["tower2"].key.PublicKey())
		io.WriteString(w, "OK\n")
		evilSplice(w, tc, func(bool, int, []byte) {})
	}, relayEcho)
	c, err := n.wallet().Dial(relayCtx(t), "tower")
	if err == nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "hello")
		_, err = io.ReadFull(c, make([]byte, 5))
		c.Close()
	}
	if err == nil {
		t.Fatal("the wallet's session went through under another peer's name")
	}
	relayWaitFor(t, "the refusal", func() bool {
		return strings.Contains(n.peers["tower"].logs.String(), `"reasons.preamble did not verify"=1`)
	})
	if a := n.accepted["tower"].Load(); a != 0 {
		t.Errorf("the watchtower accepted %d connections", a)
	}
}
