package noisetor

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A RelayServer is the sync server: it relays streams between keyring peers,
// typically from wallet clients to watchtowers. A watchtower registers with
// it (RelayClient.Listen); a wallet asks it for a stream to a registered peer
// (RelayClient.Dial); the RelayServer checks its policy, has the watchtower
// open a fresh connection for the stream and splices the two. The two ends
// then run their own noisetor handshake through the stream, so the sync
// server learns who talks to whom, when and how much, but not what.
//
// Every relay decision about an authenticated peer is logged to
// Config.Logger, one record each: operation, from, to, outcome and reason,
// by keyring name (never key material). Refusals of connections nobody
// authenticated are logged as a periodic aggregate, counts by reason.
type RelayServer struct {
	// Config is the sync server's noisetor configuration: its static key,
	// and a keyring listing every wallet and watchtower it serves. Required.
	Config *Config

	// Allow decides whether peer from may reach peer to. Nil denies every
	// request. RelayRules.Allow is a ready-made allow list.
	Allow func(from, to Peer) bool

	// AcceptTimeout bounds how long a request waits for the target peer to
	// answer before the requester gets a "no-answer" error. Default: 20s,
	// room for the target to open a new connection over Tor.
	AcceptTimeout time.Duration

	// PingInterval is how often the sync server pings a registered peer; a
	// peer that sends nothing for 2.5 intervals is unregistered.
	// Default: 30s.
	PingInterval time.Duration

	// MaxSessions bounds the relayed sessions, established or being set up.
	// Past it requests get a "busy" error. Default: 1024.
	MaxSessions int

	// MaxSessionsPerPeer bounds the sessions one requester has at once, so
	// that one peer, authenticated or not misbehaving on purpose, cannot take
	// all of MaxSessions. Past it its requests get a "busy" error.
	// Default: 64.
	MaxSessionsPerPeer int

	// MaxIdlePerPeer bounds the outer connections of one peer that have not
	// yet sent their first control line, so that a member can hold only its
	// own share of the server's connections, never keep others out. Past it
	// a new connection of that peer gets a "busy" error. An honest peer
	// sends the line right after its handshake. Default: 16.
	MaxIdlePerPeer int

	// RequestTimeout bounds the wait for the first control line of an outer
	// connection. Default: 10s.
	RequestTimeout time.Duration

	mu        sync.Mutex
	done      chan struct{}
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*Conn]struct{}
	// registered is by keyring name, not key: a peer that registers with
	// its next key during a rotation must stay reachable once the
	// rotation is finished (keyring rotate --finish makes that key the
	// entry's key).
	registered map[string]*relayRegistration
	pending    map[string]*relayPending
	sessions   int
	perPeer    map[string]int // sessions by requester's keyring name
	idle       relayIdle
	unauth     *refusalLog // refusals of connections nobody authenticated
	wg         sync.WaitGroup
	nextID     atomic.Uint64
}

// relayRegistration is one registered peer's control connection.
type relayRegistration struct {
	peer  Peer
	key   PublicKey // the key its handshake proved: peer.PublicKey, or its next key
	since time.Time
	conn  *Conn
	mu    sync.Mutex // serialises writes
	once  sync.Once
	done  chan struct{}
}

// current reports whether the keyring still accepts the key reg proved for
// its peer. One that it does not is being revoked (liveConns): requests are
// not routed to it, and it replaces no other registration.
func (s *RelayServer) current(reg *relayRegistration) bool {
	return s.Config.Keyring.stillAccepts(reg.peer.Name, reg.key, s.Config.now())
}

func (r *relayRegistration) send(line string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conn.SetWriteDeadline(time.Now().Add(relayWriteTimeout))
	return writeRelayLine(r.conn, line)
}

func (r *relayRegistration) kill() {
	r.once.Do(func() {
		close(r.done)
		r.conn.NetConn().Close()
	})
}

// relayPending is a request waiting for the target's ACCEPT connection.
type relayPending struct {
	to string     // the target's keyring name: only it may ACCEPT
	ch chan *Conn // buffered: the ACCEPT side never blocks
}

func (s *RelayServer) initLocked() {
	if s.done == nil {
		s.unauth = newRefusalLog(s.Config.logger, relayRefusalsMessage, true, slog.String("outcome", "refused"))
		s.done = make(chan struct{})
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*Conn]struct{})
		s.registered = make(map[string]*relayRegistration)
		s.pending = make(map[string]*relayPending)
	}
}

func (s *RelayServer) acceptTimeout() time.Duration {
	return orDefault(s.AcceptTimeout, defaultRelayAcceptTimeout)
}
func (s *RelayServer) pingInterval() time.Duration {
	return orDefault(s.PingInterval, defaultRelayPingInterval)
}
func (s *RelayServer) maxSessions() int { return orDefault(s.MaxSessions, defaultRelayMaxSessions) }
func (s *RelayServer) maxSessionsPerPeer() int {
	return orDefault(s.MaxSessionsPerPeer, defaultRelayMaxPerPeer)
}
func (s *RelayServer) maxIdlePerPeer() int {
	return orDefault(s.MaxIdlePerPeer, defaultRelayMaxIdlePerPeer)
}
func (s *RelayServer) requestTimeout() time.Duration {
	return orDefault(s.RequestTimeout, defaultRelayRequestTimeout)
}

// ListenAndServe listens on the TCP address addr with Listen and serves. It
// always returns an error: ErrRelayServerClosed after Close.
func (s *RelayServer) ListenAndServe(network, addr string) error {
	l, err := Listen(network, addr, s.Config)
	if err != nil {
		return err
	}
	return s.Serve(l)
}

// Serve accepts connections on l and serves each. l must yield authenticated
// noisetor connections, as the listeners of Listen and NewListener do; a
// plain TCP listener will not do. Serve closes l when it returns, and always
// returns an error: ErrRelayServerClosed after Close.
func (s *RelayServer) Serve(l net.Listener) error {
	if err := s.Config.check(); err != nil {
		l.Close()
		return err
	}
	s.mu.Lock()
	s.initLocked()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrRelayServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	log := s.Config.logger()
	if s.Allow == nil {
		log.Warn("noisetor: relay server has no policy: every request will be denied", slog.String("addr", l.Addr().String()))
	}
	log.Info("noisetor: relay server serving", slog.String("addr", l.Addr().String()), slog.Int("peers", s.Config.Keyring.Len()))
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrRelayServerClosed
			}
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return ErrRelayServerClosed
		}
		s.wg.Add(1) // under mu: Close's Wait cannot have begun
		s.mu.Unlock()
		go s.handle(c)
	}
}

// Close stops the server: it closes its listeners, every registration and
// every relayed session (whose ends then see a truncated stream, not a clean
// close), and waits for its goroutines to exit.
func (s *RelayServer) Close() error {
	s.mu.Lock()
	s.initLocked()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.done)
	var ls []net.Listener
	for l := range s.listeners {
		ls = append(ls, l)
	}
	var cs []*Conn
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	for _, c := range cs {
		c.NetConn().Close()
	}
	s.wg.Wait()
	s.unauth.close()
	return nil
}

// RelayStatus is a snapshot of a RelayServer, for operators (package
// monitor shows it).
type RelayStatus struct {
	// Registered lists the peers registered now (reachable through the
	// sync server), in name order.
	Registered []RelayRegistered
	// Sessions counts the relayed sessions open or being set up.
	Sessions int
}

// RelayRegistered is one registered peer: its keyring name and when its
// current registration began.
type RelayRegistered struct {
	Peer  string
	Since time.Time
}

// Status returns a snapshot of the registrations and sessions.
func (s *RelayServer) Status() RelayStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := RelayStatus{Sessions: s.sessions}
	for name, reg := range s.registered {
		if s.current(reg) {
			st.Registered = append(st.Registered, RelayRegistered{Peer: name, Since: reg.since})
		}
	}
	slices.SortFunc(st.Registered, func(a, b RelayRegistered) int { return strings.Compare(a.Peer, b.Peer) })
	return st
}

// track records c so that Close can cut it; false once closed.
func (s *RelayServer) track(c *Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

// drop closes c and forgets it.
func (s *RelayServer) drop(c *Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// logDecision writes the one log record of a relay decision.
func (s *RelayServer) logDecision(level slog.Level, op string, from, to string, outcome, reason string, start time.Time, extra ...slog.Attr) {
	about := []slog.Attr{slog.String("op", op), slog.String("from", from)}
	if to != "" {
		about = append(about, slog.String("to", to))
	}
	logOutcome(s.Config.logger(), level, relayLogMessage, about, outcome, reason,
		append([]slog.Attr{slog.Duration("duration", time.Since(start))}, extra...)...)
}

// refuse answers a request with an ERR line, logs the decision and closes c.
func (s *RelayServer) refuse(c *Conn, op string, from, to, code, text string, start time.Time, extra ...slog.Attr) {
	s.logDecision(slog.LevelWarn, op, from, to, code, text, start, extra...)
	c.SetWriteDeadline(time.Now().Add(relayWriteTimeout))
	writeRelayLine(c, "ERR "+code+" "+relayErrText(text))
	s.drop(c)
}

func (s *RelayServer) handle(c net.Conn) {
	defer s.wg.Done()
	start := time.Now()
	oc, ok := c.(*Conn)
	var from Peer
	if ok {
		from, ok = PeerOf(oc)
	}
	if !ok {
		// Served from a plain listener by mistake: every scanner would write
		// a record, so these are counted, not logged one by one.
		s.unauth.add("not_a_noisetor_connection",
			"the relay server got a connection that is not an authenticated noisetor connection: serve a listener from Listen or NewListener")
		c.Close()
		return
	}
	if !s.track(oc) {
		oc.NetConn().Close()
		return
	}
	// Until its first line, a connection is only a cost to us: bound how
	// many of them one peer holds, and for how long.
	if !s.idle.enter(from.Name, s.maxIdlePerPeer()) {
		s.refuse(oc, "request", from.Name, "", relayCodeBusy,
			fmt.Sprintf("%s has %d connections without a request already", from.Name, s.maxIdlePerPeer()), start)
		return
	}
	oc.SetDeadline(time.Now().Add(s.requestTimeout()))
	line, err := readRelayLine(oc)
	s.idle.leave(from.Name)
	if err != nil {
		s.logDecision(slog.LevelWarn, "request", from.Name, "", "failed", "reading the request: "+err.Error(), start)
		s.drop(oc)
		return
	}
	verb, arg, _ := strings.Cut(line, " ")
	switch {
	case line == "REGISTER":
		s.register(oc, from, start)
	case verb == "CONNECT" && arg != "":
		s.connect(oc, from, arg, start)
	case verb == "ACCEPT" && arg != "":
		s.accept(oc, from, arg, start)
	default:
		s.refuse(oc, "request", from.Name, "", relayCodeBadRequest, "unknown request (this sync server speaks REGISTER, CONNECT, ACCEPT)", start)
	}
}

func (s *RelayServer) register(c *Conn, from Peer, start time.Time) {
	reg := &relayRegistration{peer: from, key: c.ConnectionState().PeerKey, since: time.Now(), conn: c, done: make(chan struct{})}
	s.mu.Lock()
	// The keyring may have changed since the handshake: a key revoked or
	// replaced in between (its connection is being cut) must not replace
	// the registration of the entry's current key.
	if !s.current(reg) {
		s.mu.Unlock()
		s.refuse(c, "register", from.Name, "", relayCodeUnknownPeer, "the key this registration proved left the keyring after its handshake", start)
		return
	}
	old := s.registered[from.Name]
	s.registered[from.Name] = reg
	s.mu.Unlock()
	if old != nil {
		// The newest registration wins: after a silent network failure the
		// peer reconnects before we notice that the old link is dead.
		old.kill()
		s.logDecision(slog.LevelInfo, "register", from.Name, "", "replaced", "a newer registration from the same peer replaces the old one", start)
	}
	interval := s.pingInterval()
	c.SetReadDeadline(time.Time{})
	if err := reg.send("OK " + strconv.FormatInt(interval.Milliseconds(), 10)); err != nil {
		s.unregister(reg, "writing the reply: "+err.Error(), start)
		return
	}
	s.logDecision(slog.LevelInfo, "register", from.Name, "", "ok", "", start)

	s.wg.Add(1)
	go s.pinger(reg, interval)
	reason := s.readControl(reg, interval)
	s.unregister(reg, reason, start)
}

func (s *RelayServer) unregister(reg *relayRegistration, reason string, start time.Time) {
	s.mu.Lock()
	if s.registered[reg.peer.Name] == reg {
		delete(s.registered, reg.peer.Name)
	}
	s.mu.Unlock()
	reg.kill()
	s.drop(reg.conn)
	s.logDecision(slog.LevelInfo, "unregister", reg.peer.Name, "", "done", reason, start)
}

// readControl reads a registered peer's control connection until it fails,
// and returns why.
func (s *RelayServer) readControl(reg *relayRegistration, interval time.Duration) string {
	silence := 5 * interval / 2
	for {
		reg.conn.SetReadDeadline(time.Now().Add(silence))
		line, err := readRelayLine(reg.conn)
		select {
		case <-reg.done:
			return "replaced by a newer registration"
		case <-s.done:
			return "relay server closing"
		default:
		}
		switch {
		case err == nil && line == "PONG":
			continue
		case err == nil:
			return "protocol error: unexpected control line from the peer"
		case isTimeout(err):
			return fmt.Sprintf("no PONG within %v: link presumed dead", silence)
		case errors.Is(err, io.EOF):
			return "peer closed the control connection"
		}
		return "control connection failed: " + err.Error()
	}
}

func (s *RelayServer) pinger(reg *relayRegistration, interval time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-reg.done:
			return
		case <-s.done:
			return
		case <-t.C:
			if err := reg.send("PING"); err != nil {
				reg.kill()
				return
			}
		}
	}
}

// A relaySession is a CONNECT request from its reservation on.
type relaySession struct {
	c        *Conn // the requester's connection
	from, to Peer
	start    time.Time
	reg      *relayRegistration // the target's registration; nil if it has none
	token    string             // of the ACCEPT the target is asked for
	pending  *relayPending
	id       slog.Attr // "session", once the target is asked
}

// connect serves a CONNECT in three steps: reserve a session, wait for the
// target's ACCEPT connection, splice the two.
func (s *RelayServer) connect(c *Conn, from Peer, arg string, start time.Time) {
	rs := s.reserveSession(c, from, arg, start)
	if rs == nil {
		return
	}
	defer s.releaseSession(rs)
	tc := s.waitTarget(rs)
	if tc == nil {
		return
	}
	s.splice(rs, tc)
}

// reserveSession checks a CONNECT against the keyring, the policy and the
// session limits and, if it passes, takes a session for the requester and,
// if the target is registered, a token for its ACCEPT. Otherwise it refuses
// the request and returns nil.
func (s *RelayServer) reserveSession(c *Conn, from Peer, arg string, start time.Time) *relaySession {
	key, err := ParsePublicKey(arg)
	if err != nil {
		s.refuse(c, "connect", from.Name, "", relayCodeBadRequest, "CONNECT needs the target's public key", start)
		return nil
	}
	to, ok := s.Config.Keyring.ByKey(key)
	if !ok {
		s.refuse(c, "connect", from.Name, "key:"+key.Fingerprint(), relayCodeUnknownPeer,
			"no peer of the sync server's keyring has the target's key (fingerprint "+key.Fingerprint()+"): check the key the requester holds for it", start)
		return nil
	}
	if s.Allow == nil || !s.Allow(from, to) {
		s.refuse(c, "connect", from.Name, to.Name, relayCodeDenied,
			fmt.Sprintf("policy does not allow %s to reach %s", from.Name, to.Name), start)
		return nil
	}
	s.mu.Lock()
	if s.sessions >= s.maxSessions() {
		s.mu.Unlock()
		s.refuse(c, "connect", from.Name, to.Name, relayCodeBusy, fmt.Sprintf("%d sessions already", s.maxSessions()), start)
		return nil
	}
	if s.perPeer[from.Name] >= s.maxSessionsPerPeer() {
		s.mu.Unlock()
		s.refuse(c, "connect", from.Name, to.Name, relayCodeBusy, fmt.Sprintf("%s has %d sessions already", from.Name, s.maxSessionsPerPeer()), start)
		return nil
	}
	if s.perPeer == nil {
		s.perPeer = make(map[string]int)
	}
	s.sessions++
	s.perPeer[from.Name]++
	rs := &relaySession{c: c, from: from, to: to, start: start}
	if reg := s.registered[to.Name]; reg != nil && s.current(reg) {
		rs.reg = reg
		rs.token = newRelayToken()
		rs.pending = &relayPending{to: to.Name, ch: make(chan *Conn, 1)}
		s.pending[rs.token] = rs.pending
	}
	s.mu.Unlock()
	return rs
}

// releaseSession gives back the session of rs.
func (s *RelayServer) releaseSession(rs *relaySession) {
	s.mu.Lock()
	s.sessions--
	if s.perPeer[rs.from.Name]--; s.perPeer[rs.from.Name] == 0 {
		delete(s.perPeer, rs.from.Name)
	}
	s.mu.Unlock()
}

// waitTarget asks the target for an ACCEPT connection (INCOMING) and waits
// for it for AcceptTimeout. If the target is not registered or does not
// answer, it refuses the request and returns nil.
func (s *RelayServer) waitTarget(rs *relaySession) *Conn {
	c, from, to, start := rs.c, rs.from, rs.to, rs.start
	if rs.reg == nil {
		s.refuse(c, "connect", from.Name, to.Name, relayCodeOffline, to.Name+" is not registered with the sync server", start)
		return nil
	}
	rs.id = slog.Uint64("session", s.nextID.Add(1))

	var tc *Conn
	if err := rs.reg.send("INCOMING " + rs.token + " " + c.ConnectionState().PeerKey.String()); err != nil {
		rs.reg.kill()
	} else {
		timer := time.NewTimer(s.acceptTimeout())
		select {
		case tc = <-rs.pending.ch:
		case <-timer.C:
		case <-s.done:
		}
		timer.Stop()
	}
	if tc == nil {
		s.mu.Lock()
		if s.pending[rs.token] == rs.pending {
			delete(s.pending, rs.token)
		} else {
			tc = <-rs.pending.ch // the ACCEPT won the race
		}
		s.mu.Unlock()
	}
	if tc == nil {
		select {
		case <-s.done:
			s.refuse(c, "connect", from.Name, to.Name, relayCodeShuttingDown, "the sync server is shutting down", start, rs.id)
		default:
			s.refuse(c, "connect", from.Name, to.Name, relayCodeNoAnswer,
				fmt.Sprintf("%s is registered but did not answer within %v: it does not list the requester's key, or it is at its limits, or it is slow", to.Name, s.acceptTimeout()), start, rs.id)
		}
		return nil
	}
	return tc
}

// splice tells the target's ACCEPT connection tc and then the requester OK,
// and splices the two until the session ends.
func (s *RelayServer) splice(rs *relaySession, tc *Conn) {
	c, from, to, start, session := rs.c, rs.from, rs.to, rs.start, rs.id
	deadline := time.Now().Add(relayWriteTimeout)
	tc.SetDeadline(deadline)
	c.SetDeadline(deadline)
	if err := writeRelayLine(tc, "OK"); err != nil {
		s.drop(tc)
		s.refuse(c, "connect", from.Name, to.Name, relayCodeNoAnswer, to.Name+"'s connection failed: "+err.Error(), start, session)
		return
	}
	if err := writeRelayLine(c, "OK"); err != nil {
		s.drop(tc)
		s.drop(c)
		s.logDecision(slog.LevelWarn, "connect", from.Name, to.Name, "failed", "requester's connection failed: "+err.Error(), start, session)
		return
	}
	tc.SetDeadline(time.Time{})
	c.SetDeadline(time.Time{})
	s.logDecision(slog.LevelInfo, "connect", from.Name, to.Name, "ok", "", start, session)

	spliced := time.Now()
	up, down, err := relaySplice(c, tc)
	outcome, reason := "closed", ""
	if err != nil {
		outcome, reason = "broken", err.Error()
	}
	s.mu.Lock()
	delete(s.conns, c)
	delete(s.conns, tc)
	s.mu.Unlock()
	s.logDecision(slog.LevelInfo, "session", from.Name, to.Name, outcome, reason, spliced, session,
		slog.Int64("bytes_to", up), slog.Int64("bytes_from", down))
}

func (s *RelayServer) accept(c *Conn, from Peer, token string, start time.Time) {
	if !validRelayToken(token) {
		s.refuse(c, "accept", from.Name, "", relayCodeBadRequest, "ACCEPT needs a 32-hex-digit token", start)
		return
	}
	s.mu.Lock()
	p := s.pending[token]
	if p == nil || p.to != from.Name {
		s.mu.Unlock()
		// A token presented by another peer than the one it went to is left
		// in place for its rightful owner.
		s.refuse(c, "accept", from.Name, "", relayCodeBadToken, "unknown or expired token", start)
		return
	}
	delete(s.pending, token)
	p.ch <- c // the waiting connect owns c from here and logs the outcome
	s.mu.Unlock()
}

func newRelayToken() string {
	var b [relayTokenLen]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// relayCopyBuffer is the buffer of each direction of a splice.
const relayCopyBuffer = 32 << 10

var relayBufPool = sync.Pool{New: func() any {
	b := make([]byte, relayCopyBuffer)
	return &b
}}

// relaySplice copies a to b and b to a until both directions end.
//
// The end of a direction (the sender's outer close record) is passed on as a
// bare TCP half-close, without an outer close record of our own: the
// end-to-end close record inside the stream is the one that counts, and a
// record after it would sit unread at the far end and turn its close into a
// reset that can destroy data still in flight the other way. A failure (a
// truncated or reset stream) cuts both connections, so the far ends see a
// truncation, never a clean close.
func relaySplice(a, b *Conn) (aToB, bToA int64, err error) {
	var errAB, errBA error
	copyOne := func(dst, src *Conn, n *int64, e *error) {
		bufp := relayBufPool.Get().(*[]byte)
		defer relayBufPool.Put(bufp)
		*n, *e = io.CopyBuffer(dst, src, *bufp)
		if *e == nil {
			if cw, ok := dst.NetConn().(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
			return
		}
		a.NetConn().Close()
		b.NetConn().Close()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		copyOne(b, a, &aToB, &errAB)
	}()
	copyOne(a, b, &bToA, &errBA)
	<-done
	a.NetConn().Close()
	b.NetConn().Close()
	return aToB, bToA, errors.Join(errAB, errBA)
}
