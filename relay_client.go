package noisetor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	// relayBackoffMin and relayBackoffMax bound the wait of a relay listener
	// before it registers again.
	relayBackoffMin = 500 * time.Millisecond
	relayBackoffMax = time.Minute

	// relayLinger bounds the read of pending data when a relayed stream is
	// closed (see relayStream.Close).
	relayLinger = 20 * time.Millisecond
)

// A RelayClient reaches peers through a sync server (a RelayServer): a wallet
// dials a watchtower with Dial, a watchtower accepts relayed connections
// from the Listener of Listen. The connections it returns are end-to-end
// noisetor connections with the peer, authenticated against Config.Keyring:
// the sync server only carries their ciphertext. Their CloseWrite sends the
// end-to-end close record but keeps the connection to the sync server whole
// (a Tor stream cannot be half-closed); Close ends both.
//
// Every relayed connection is a session of its own at the sync server, and
// the sync server bounds the sessions of one peer (RelayServer.MaxSessionsPerPeer,
// 64 by default, established or being set up); past it Dial fails with an
// error matching ErrRelayBusy. An http.Client over DialContext opens one
// session per request in flight, so bound its parallelism below the limit,
// e.g. with http.Transport.MaxConnsPerHost.
type RelayClient struct {
	// Config is this machine's noisetor configuration. Its keyring must list
	// the sync server and the peers to reach or to accept; it is used both
	// for the connections to the sync server and for the end-to-end ones,
	// except that the connections to the sync server always use KK (its
	// Patterns choose the end-to-end pattern). Required.
	Config *Config

	// Server is the keyring name of the sync server. Required.
	Server string

	// Address is the sync server's "host:port" (an onion address over Tor).
	// Empty means the Address of its keyring entry.
	Address string

	// NetDialer dials the connections to the sync server; over Tor, the
	// SOCKS5 dialer. Nil means a zero net.Dialer.
	NetDialer ContextDialer

	// MaxPending and MaxPendingPerPeer bound the relayed connections the
	// listener of Listen sets up at once, in all and per requester: from the
	// sync server's INCOMING line through the accept connection and the
	// end-to-end handshake until Accept returns the connection; and the
	// listener starts at most as many setups per 4 seconds, in all and per
	// requester (a sync server that refuses each accept at once cannot make
	// it handshake faster). Requests past these are ignored (the requester
	// gets "no-answer"). The
	// requester is the peer the sync server names; a request naming a peer
	// that is not in Config.Keyring, or the sync server itself, is ignored
	// before any connection is opened. So a wallet that the sync server lets
	// through but this keyring does not list costs nothing, and one that it
	// lists fills only its own share. Defaults: 256 and 64 (the sync
	// server's default sessions per requester).
	MaxPending        int
	MaxPendingPerPeer int
}

func (rc *RelayClient) check() (server Peer, addr string, err error) {
	if err := rc.Config.check(); err != nil {
		return Peer{}, "", err
	}
	if rc.Server == "" {
		return Peer{}, "", errors.New("noisetor: RelayClient.Server is not set")
	}
	server, ok := rc.Config.Keyring.ByName(rc.Server)
	if !ok {
		return Peer{}, "", fmt.Errorf("%w: the sync server %q is not in the keyring", ErrUnknownPeer, rc.Server)
	}
	addr = rc.Address
	if addr == "" {
		addr = server.Address
	}
	if addr == "" {
		return Peer{}, "", fmt.Errorf("noisetor: no address for the sync server %q: set RelayClient.Address or addr= in its keyring entry", rc.Server)
	}
	return server, addr, nil
}

// logDecision writes the one log record of a relay decision.
func (rc *RelayClient) logDecision(level slog.Level, op, peer, outcome, reason string, start time.Time) {
	about := []slog.Attr{slog.String("op", op), slog.String("server", rc.Server)}
	if peer != "" {
		about = append(about, slog.String("peer", peer))
	}
	logOutcome(rc.Config.logger(), level, relayLogMessage, about, outcome, reason, slog.Duration("duration", time.Since(start)))
}

// dialServer opens one outer connection to the sync server.
func (rc *RelayClient) dialServer(ctx context.Context, addr string) (*Conn, error) {
	// KK to the sync server whatever Config.Patterns says (it is for the
	// end-to-end handshake): both sides list each other, and a sync server
	// that accepted XK would compute a DH for anyone who knows its key.
	d := &Dialer{Config: rc.Config, NetDialer: rc.NetDialer, Peer: rc.Server, pattern: KK}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &contextError{fmt.Sprintf("relay: reaching the sync server %q", rc.Server), err}
	}
	return c.(*Conn), nil
}

// request sends one control line on c and reads the reply. A refusal comes
// back as a *RelayError.
func (rc *RelayClient) request(ctx context.Context, c *Conn, line, peer string) (reply string, err error) {
	stop := relayDeadline(ctx, c, rc.Config.handshakeTimeout()+defaultRelayAcceptTimeout)
	defer stop()
	if err = writeRelayLine(c, line); err == nil {
		reply, err = readRelayLine(c)
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return "", fmt.Errorf("noisetor: relay %s: no reply to %s: %w", rc.Server, strings.Fields(line)[0], err)
	}
	if code, text, ok := parseRelayErr(reply); ok {
		return "", &RelayError{Server: rc.Server, Peer: peer, Code: code, Text: text}
	}
	return reply, nil
}

// Dial opens an end-to-end noisetor connection to the keyring peer named
// peer through the sync server, and completes its handshake: the returned
// *Conn is authenticated to peer's key in Config.Keyring, whatever the sync
// server does. ctx bounds the whole setup. A refusal by the sync server is a
// *RelayError matching ErrRelayDenied, ErrPeerOffline, ErrUnknownPeer or
// ErrRelayBusy.
func (rc *RelayClient) Dial(ctx context.Context, peer string) (*Conn, error) {
	start := time.Now()
	_, addr, err := rc.check()
	if err != nil {
		return nil, err
	}
	p, ok := rc.Config.Keyring.ByName(peer)
	if !ok {
		return nil, fmt.Errorf("%w: no peer named %q", ErrUnknownPeer, peer)
	}
	if peer == rc.Server {
		return nil, fmt.Errorf("noisetor: relay: %q is the sync server itself: dial it directly", peer)
	}
	outer, err := rc.dialServer(ctx, addr)
	if err != nil {
		rc.logDecision(slog.LevelWarn, "connect", peer, "failed", err.Error(), start)
		return nil, err
	}
	// The key we address the peer with (its next key once a rotation's
	// overlap is over): the sync server finds its entry by either key.
	reply, err := rc.request(ctx, outer, "CONNECT "+p.DialKey(rc.Config.now()).String(), peer)
	if err == nil && reply != "OK" {
		err = fmt.Errorf("%w: unexpected reply to CONNECT", errRelayProtocol)
	}
	if err != nil {
		outer.Close()
		var re *RelayError
		outcome := "failed"
		if errors.As(err, &re) {
			outcome = re.Code
		}
		rc.logDecision(slog.LevelWarn, "connect", peer, outcome, err.Error(), start)
		return nil, err
	}
	inner := Client(&relayStream{Conn: outer, addr: relayAddr(rc.Server)}, rc.Config, peer)
	inner.addr = relayAddr(rc.Server).String()
	if err := inner.HandshakeContext(ctx); err != nil {
		// Logged by the handshake; the relay part succeeded.
		return nil, err
	}
	rc.logDecision(slog.LevelInfo, "connect", peer, "ok", "", start)
	return inner, nil
}

// DialContext is Dial for http.Transport.DialContext and the like: addr is a
// keyring peer's Address, or "<peer name>:<port>" (the port is ignored), so
// that http://watchtower/ reaches the peer named watchtower. network is
// ignored.
func (rc *RelayClient) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	name := addr
	if p, ok := rc.Config.Keyring.ByAddress(addr); ok {
		name = p.Name
	} else if host, _, err := net.SplitHostPort(addr); err == nil {
		name = host
	}
	c, err := rc.Dial(ctx, name)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Listen registers this machine with the sync server and returns a listener
// whose Accept yields relayed connections from keyring peers, as *Conn whose
// end-to-end handshake has completed. ctx bounds the first registration
// only; afterwards the listener keeps the registration up, reconnecting with
// backoff when the link to the sync server fails, until Close.
//
// Accept never returns a connection from the sync server itself (a relayed
// stream is always meant to reach another peer), nor one whose peer is not
// the requester the sync server announced. The listener's limits are
// RelayClient.MaxPending and MaxPendingPerPeer.
func (rc *RelayClient) Listen(ctx context.Context) (net.Listener, error) {
	start := time.Now()
	_, addr, err := rc.check()
	if err != nil {
		return nil, err
	}
	ctrl, interval, err := rc.register(ctx, addr)
	if err != nil {
		rc.logDecision(slog.LevelWarn, "register", "", "failed", err.Error(), start)
		return nil, err
	}
	rc.logDecision(slog.LevelInfo, "register", "", "ok", "", start)
	lctx, cancel := context.WithCancel(context.Background())
	feed := &relayFeed{ch: make(chan net.Conn), done: make(chan struct{}), addr: relayAddr(rc.Server)}
	l := &relayListener{
		rc:     rc,
		addr:   addr,
		ctx:    lctx,
		cancel: cancel,
		feed:   feed,
		nl:     NewListener(feed, rc.Config),
		gate:   relayGate{max: orDefault(rc.MaxPending, defaultRelayMaxPending), perPeerMax: orDefault(rc.MaxPendingPerPeer, defaultRelayMaxPendingPerPeer)},
		refusals: newRefusalLog(rc.Config.logger, relayRefusalsMessage, true,
			slog.String("op", "accept"), slog.String("server", rc.Server), slog.String("outcome", "refused")),
		ctrl: ctrl,
	}
	l.wg.Add(1)
	go l.run(ctrl, interval)
	return l, nil
}

// register opens a control connection and registers on it.
func (rc *RelayClient) register(ctx context.Context, addr string) (*Conn, time.Duration, error) {
	c, err := rc.dialServer(ctx, addr)
	if err != nil {
		return nil, 0, err
	}
	reply, err := rc.request(ctx, c, "REGISTER", "")
	if err != nil {
		c.Close()
		return nil, 0, err
	}
	ms, ok := strings.CutPrefix(reply, "OK ")
	n, perr := strconv.ParseInt(ms, 10, 64)
	if !ok || perr != nil || n < 1 || n > 24*3600*1000 {
		c.Close()
		return nil, 0, fmt.Errorf("%w: unexpected reply to REGISTER", errRelayProtocol)
	}
	return c, time.Duration(n) * time.Millisecond, nil
}

// relayListener is the listener of RelayClient.Listen.
type relayListener struct {
	rc     *RelayClient
	addr   string
	ctx    context.Context
	cancel context.CancelFunc
	feed   *relayFeed
	nl     net.Listener // NewListener(feed): runs the end-to-end handshakes
	gate   relayGate
	// refusals counts the requests ignored before any connection is opened
	// and the accept connections that failed: the sync server can cause any
	// number of them, so they are logged as aggregates.
	refusals *refusalLog
	wg       sync.WaitGroup

	mu     sync.Mutex
	ctrl   *Conn
	closed bool
}

// run serves the control connection and re-registers whenever it fails.
func (l *relayListener) run(ctrl *Conn, interval time.Duration) {
	defer l.wg.Done()
	backoff := relayBackoffMin
	for {
		registered := time.Now()
		reason := l.serveControl(ctrl, interval)
		if l.ctx.Err() != nil {
			return
		}
		l.rc.logDecision(slog.LevelWarn, "register", "", "lost", reason, registered)
		if time.Since(registered) > relayBackoffMax {
			backoff = relayBackoffMin
		}
		for {
			wait := backoff/2 + mrand.N(backoff/2+1)
			t := time.NewTimer(wait)
			select {
			case <-l.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, relayBackoffMax)
			start := time.Now()
			var err error
			ctrl, interval, err = l.rc.register(l.ctx, l.addr)
			if err == nil {
				l.rc.logDecision(slog.LevelInfo, "register", "", "ok", "re-registered", start)
				break
			}
			if l.ctx.Err() != nil {
				return
			}
			l.rc.logDecision(slog.LevelWarn, "register", "", "failed", err.Error()+"; retrying", start)
		}
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			ctrl.Close()
			return
		}
		l.ctrl = ctrl
		l.mu.Unlock()
	}
}

// serveControl answers PINGs and INCOMINGs on c until it fails, and returns
// why.
func (l *relayListener) serveControl(c *Conn, interval time.Duration) string {
	defer c.Close() // a clean close, also on Close: the sync server logs an orderly unregister
	silence := 3 * interval
	for {
		// Under mu, so that Close's wake-up deadline cannot be overwritten.
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return "listener closed"
		}
		c.SetReadDeadline(time.Now().Add(silence))
		l.mu.Unlock()
		line, err := readRelayLine(c)
		if err != nil {
			switch {
			case l.ctx.Err() != nil:
				return "listener closed"
			case isTimeout(err):
				return fmt.Sprintf("nothing from the sync server for %v", silence)
			}
			return "control connection failed: " + err.Error()
		}
		if line == "PING" {
			c.SetWriteDeadline(time.Now().Add(relayWriteTimeout))
			if err := writeRelayLine(c, "PONG"); err != nil {
				return "control connection failed: " + err.Error()
			}
			continue
		}
		rest, ok := strings.CutPrefix(line, "INCOMING ")
		token, keyText, ok2 := strings.Cut(rest, " ")
		var requester PublicKey
		if ok && ok2 && validRelayToken(token) {
			requester, err = ParsePublicKey(keyText)
		}
		if !ok || !ok2 || !validRelayToken(token) || err != nil {
			return "protocol error: unexpected control line from the sync server"
		}
		l.dialBack(token, requester)
	}
}

// dialBack opens the ACCEPT connection for one INCOMING from requester,
// unless the request is to be ignored: nothing the sync server sends makes
// us open more connections than the relayGate allows, nor any for a
// requester we would refuse anyway.
func (l *relayListener) dialBack(token string, requester PublicKey) {
	from, ok := l.rc.Config.Keyring.ByKey(requester)
	switch {
	case !ok:
		l.refusals.add("requester_not_in_keyring",
			"ignored a request from a peer that is not in our keyring (fingerprint "+requester.Fingerprint()+")")
		return
	case from.Name == l.rc.Server:
		// By name, not by a key kept from Listen: the sync server's
		// entry may have rotated (or replaced) its key since.
		l.refusals.add("requester_is_sync_server", "ignored a request that the sync server announced as its own")
		return
	}
	if reason := l.gate.enter(requester); reason != "" {
		l.refusals.add(reason, fmt.Sprintf("ignored a request from %s: %s", from.Name, l.gate.explain(reason)))
		return
	}
	release := l.gate.leaver(requester)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		start := time.Now()
		ctx, cancel := context.WithTimeout(l.ctx, l.rc.Config.handshakeTimeout())
		defer cancel()
		c, err := l.rc.dialServer(ctx, l.addr)
		if err == nil {
			var reply string
			reply, err = l.rc.request(ctx, c, "ACCEPT "+token, "")
			if err == nil && reply != "OK" {
				err = fmt.Errorf("%w: unexpected reply to ACCEPT", errRelayProtocol)
			}
			if err != nil {
				c.Close()
			}
		}
		if err != nil {
			release()
			if l.ctx.Err() == nil {
				reason := "accept_failed"
				var re *RelayError
				if errors.As(err, &re) {
					reason = "accept_refused"
				}
				l.refusals.add(reason, fmt.Sprintf("accept connection for a request from %s: %v", from.Name, err))
			}
			return
		}
		l.rc.logDecision(slog.LevelInfo, "accept", "", "ok", "", start) // the peer is known once authenticated, in the handshake record
		rs := &relayStream{Conn: c, addr: relayAddr(l.rc.Server), requester: from, requesterKey: requester, release: release}
		if !l.feed.push(rs) {
			rs.Close()
		}
	}()
}

// Accept waits for and returns the next relayed connection, authenticated
// end to end.
func (l *relayListener) Accept() (net.Conn, error) {
	for {
		c, err := l.nl.Accept()
		if err != nil {
			return nil, err
		}
		rs, _ := c.(*Conn).NetConn().(*relayStream)
		rs.setupDone() // set up: from here on the application holds it
		p, _ := PeerOf(c)
		if p.Name == l.rc.Server {
			// The sync server is in our keyring, so it can complete a
			// handshake with its own key. It is no end-to-end peer, and
			// an application that trusts "any keyring peer" must not
			// take it for one.
			l.rc.logDecision(slog.LevelWarn, "accept", p.Name, "refused",
				"the sync server itself completed the end-to-end handshake: a relayed connection must come from another peer", time.Now())
			c.Close()
			continue
		}
		if c.(*Conn).ConnectionState().PeerKey != rs.requesterKey {
			// The sync server announced the request as another peer's
			// (and so charged it to that peer's share): it misbehaves.
			l.rc.logDecision(slog.LevelWarn, "accept", p.Name, "refused",
				fmt.Sprintf("the sync server announced this connection as from %s", rs.requester.Name), time.Now())
			c.Close()
			continue
		}
		return c, nil
	}
}

// Close unregisters, stops accepting, and closes the connections still being
// set up. Connections already returned by Accept stay open.
func (l *relayListener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	l.closed = true
	ctrl := l.ctrl
	l.mu.Unlock()
	l.cancel()
	if ctrl != nil {
		// Wake serveControl, which closes ctrl itself: closing it here,
		// under its read, would race with it (and a sync server that keeps
		// writing would hold our Close's drain of unread data open).
		ctrl.SetReadDeadline(time.Unix(1, 0))
	}
	err := l.nl.Close()
	l.wg.Wait()
	l.refusals.close()
	return err
}

// Addr returns the listener's address: "relay:<sync server name>".
func (l *relayListener) Addr() net.Addr { return relayAddr(l.rc.Server) }

// relayFeed is a net.Listener fed through a channel: the raw relayed streams
// go in, and NewListener runs their handshakes.
type relayFeed struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
	addr net.Addr
}

func (f *relayFeed) push(c net.Conn) bool {
	select {
	case f.ch <- c:
		return true
	case <-f.done:
		return false
	}
}

func (f *relayFeed) Accept() (net.Conn, error) {
	select {
	case c := <-f.ch:
		return c, nil
	case <-f.done:
		return nil, net.ErrClosed
	}
}

func (f *relayFeed) Close() error {
	f.once.Do(func() { close(f.done) })
	return nil
}

func (f *relayFeed) Addr() net.Addr { return f.addr }

// relayAddr is the address of a relayed connection: the sync server's name.
type relayAddr string

func (a relayAddr) Network() string { return "noisetor-relay" }
func (a relayAddr) String() string  { return "relay:" + string(a) }

// relayStream is an outer connection to the sync server that now carries a
// relayed stream: the underlying connection of an inner *Conn.
type relayStream struct {
	*Conn
	addr relayAddr

	// On a relay listener: the peer the sync server said the stream is from,
	// the key it named (during a rotation, possibly the entry's next key),
	// and the release of its relayGate slot.
	requester    Peer
	requesterKey PublicKey
	release      func()
}

// announcedInitiator is the key the sync server said the stream is from: the
// server handshake refuses, at the preamble and before any DH, a KK preamble
// that proves another key (the sync server's own pair key, say).
func (s *relayStream) announcedInitiator() PublicKey { return s.requesterKey }

// setupDone frees the stream's relayGate slot, if it holds one.
func (s *relayStream) setupDone() {
	if s.release != nil {
		s.release()
	}
}

func (s *relayStream) RemoteAddr() net.Addr { return s.addr }

// CloseWrite does nothing: the inner connection's close record ends its
// direction, and the outer connection stays whole until Close (a Tor stream
// has no half-close: see torStream).
func (s *relayStream) CloseWrite() error { return nil }

// Close reads and discards, for at most relayLinger, what the peer has
// already sent (typically its close record), and then closes the outer
// connection: with unread data the close would be a reset, and tor would
// drop our own close records (see torStream).
func (s *relayStream) Close() error {
	s.setupDone()
	s.Conn.SetReadDeadline(time.Now().Add(relayLinger))
	io.Copy(io.Discard, s.Conn)
	return s.Conn.Close()
}

// NetConn returns the outer connection, so PeerOf(inner.NetConn()) is the
// sync server.
func (s *relayStream) NetConn() net.Conn { return s.Conn }

// relayDeadline bounds the I/O on c by ctx, or fallback (boundIO); stop
// clears the deadlines.
func relayDeadline(ctx context.Context, c *Conn, fallback time.Duration) (stop func()) {
	stop, _ = boundIO(ctx, c, fallback, func() { c.SetDeadline(time.Time{}) })
	return stop
}
