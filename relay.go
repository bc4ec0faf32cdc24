package noisetor

// Mediation (WIRE.md §12, Relay). Wallets and watchtowers do not reach each
// other directly: a sync server, the RelayServer, relays their streams. Each
// relayed stream carries an ordinary end-to-end noisetor handshake between
// the two ends, each checking the other's key against its own keyring, so
// the sync server moves ciphertext it can neither read nor alter undetected.
//
// Every stream through the sync server is a whole outer noisetor connection
// of its own, spliced byte for byte to another: no multiplexing, so a slow
// session never holds up another.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Relay control protocol constants; WIRE.md §12 is the specification.
const (
	relayMaxLine  = 256 // bytes of a control line, LF included
	relayTokenLen = 16  // random bytes of an ACCEPT token, hex on the wire

	// Codes of an "ERR <code> <text>" reply.
	relayCodeDenied       = "denied"
	relayCodeOffline      = "offline"
	relayCodeNoAnswer     = "no-answer"
	relayCodeUnknownPeer  = "unknown-peer"
	relayCodeBusy         = "busy"
	relayCodeBadRequest   = "bad-request"
	relayCodeBadToken     = "bad-token"
	relayCodeShuttingDown = "shutting-down"

	defaultRelayAcceptTimeout = 20 * time.Second
	defaultRelayPingInterval  = 30 * time.Second
	defaultRelayMaxSessions   = 1024
	defaultRelayMaxPerPeer    = 64

	// relayWriteTimeout bounds writing one control line.
	relayWriteTimeout = 10 * time.Second

	relayBackoffMin = 500 * time.Millisecond
	relayBackoffMax = time.Minute

	relayCopyBuffer = 32 << 10

	// relayLinger bounds the read of pending data when a relayed stream is
	// closed (see relayStream.Close).
	relayLinger = 20 * time.Millisecond
)

// Errors of relayed connections. A *RelayError wraps one of them (or
// ErrUnknownPeer), so match with errors.Is.
var (
	// ErrRelayDenied: the sync server's policy does not let this peer reach
	// the requested one.
	ErrRelayDenied = errors.New("noisetor: relay: not allowed by the sync server's policy")
	// ErrPeerOffline: the requested peer is not registered with the sync
	// server, or did not answer in time.
	ErrPeerOffline = errors.New("noisetor: relay: peer is offline")
	// ErrRelayBusy: the sync server is at one of its limits, for this peer
	// (RelayServer.MaxSessionsPerPeer, MaxIdlePerPeer) or in all
	// (MaxSessions). Retry later, or open fewer sessions at once.
	ErrRelayBusy = errors.New("noisetor: relay: the sync server is busy")
	// ErrRelayServerClosed is returned by RelayServer.Serve after Close.
	ErrRelayServerClosed = errors.New("noisetor: relay server closed")
	// errRelayProtocol: a control line broke the relay protocol.
	errRelayProtocol = errors.New("noisetor: relay protocol error")
)

// A RelayError is a refusal from the sync server: the "ERR <code> <text>"
// reply of the relay protocol. It wraps ErrRelayDenied (code "denied"),
// ErrPeerOffline ("offline", "no-answer"), ErrUnknownPeer ("unknown-peer")
// or ErrRelayBusy ("busy").
type RelayError struct {
	// Server is the keyring name of the sync server that refused.
	Server string
	// Peer is the peer asked for; empty for a refused registration.
	Peer string
	// Code is the machine-readable reason, e.g. "denied" or "offline".
	Code string
	// Text is the sync server's explanation. It comes from the sync server,
	// so treat it as untrusted display text.
	Text string
}

// Error describes the refusal, e.g. "noisetor: relay sync to tower: offline:
// tower is not registered with the sync server".
func (e *RelayError) Error() string {
	msg := "noisetor: relay " + e.Server
	if e.Peer != "" {
		msg += " to " + e.Peer
	}
	msg += ": " + e.Code
	if e.Text != "" {
		msg += ": " + e.Text
	}
	return msg
}

// Unwrap returns the sentinel error matching e.Code, if any.
func (e *RelayError) Unwrap() error {
	switch e.Code {
	case relayCodeDenied:
		return ErrRelayDenied
	case relayCodeOffline, relayCodeNoAnswer:
		return ErrPeerOffline
	case relayCodeUnknownPeer:
		return ErrUnknownPeer
	case relayCodeBusy:
		return ErrRelayBusy
	}
	return nil
}

// readRelayLine reads one control line, one byte at a time so that nothing
// after the LF is consumed: after "OK" the same stream carries relayed bytes.
func readRelayLine(r io.Reader) (string, error) {
	var b [relayMaxLine]byte
	for n := 0; n < len(b); n++ {
		if _, err := io.ReadFull(r, b[n:n+1]); err != nil {
			if n > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return "", err
		}
		if b[n] == '\n' {
			line := b[:n]
			for _, c := range line {
				if c < 0x20 || c > 0x7e {
					return "", fmt.Errorf("%w: control line holds a byte outside printable ASCII", errRelayProtocol)
				}
			}
			return string(line), nil
		}
	}
	return "", fmt.Errorf("%w: control line longer than %d bytes", errRelayProtocol, relayMaxLine)
}

func writeRelayLine(w io.Writer, line string) error {
	_, err := io.WriteString(w, line+"\n")
	return err
}

func validRelayToken(s string) bool {
	if len(s) != 2*relayTokenLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// relayErrText makes s fit an ERR line: printable ASCII, bounded length.
func relayErrText(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '?'
		}
	}
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}

// parseRelayErr parses an "ERR <code> [<text>]" line.
func parseRelayErr(line string) (code, text string, ok bool) {
	rest, ok := strings.CutPrefix(line, "ERR ")
	if !ok {
		return "", "", false
	}
	code, text, _ = strings.Cut(rest, " ")
	return code, text, code != ""
}

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
	// and the release of its relayGate slot.
	requester Peer
	release   func()
}

// announcedInitiator is the key the sync server said the stream is from: the
// server handshake refuses, at the preamble and before any DH, a KK preamble
// that proves another key (the sync server's own pair key, say).
func (s *relayStream) announcedInitiator() PublicKey { return s.requester.PublicKey }

// setupDone frees the stream's relayGate slot, if it holds one.
func (s *relayStream) setupDone() {
	if s.release != nil {
		s.release()
	}
}

func (s *relayStream) RemoteAddr() net.Addr { return s.addr }

// CloseWrite does nothing: the inner connection's close record ends its
// direction, and the outer connection stays whole until Close. A half-close
// of the outer one would end a Tor stream in both directions (Tor streams
// have no half-close), losing the peer's reply.
func (s *relayStream) CloseWrite() error { return nil }

// Close reads and discards, for at most relayLinger, what the peer has
// already sent, and then closes the outer connection. A TCP socket closed
// with unread data (typically the peer's close record) sends a reset
// instead of a FIN, and tor, seeing the reset, drops the data we wrote just
// before it, our own close records included: the peer would see a
// truncation instead of a clean close.
func (s *relayStream) Close() error {
	s.setupDone()
	s.Conn.SetReadDeadline(time.Now().Add(relayLinger))
	io.Copy(io.Discard, s.Conn)
	return s.Conn.Close()
}

// NetConn returns the outer connection, so PeerOf(inner.NetConn()) is the
// sync server.
func (s *relayStream) NetConn() net.Conn { return s.Conn }

// relayDeadline bounds the I/O on c by ctx (or, if ctx has no deadline, by
// fallback from now), also cutting it short when ctx is cancelled. The
// returned stop clears the deadlines.
func relayDeadline(ctx context.Context, c *Conn, fallback time.Duration) (stop func()) {
	deadline := time.Now().Add(fallback)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.SetDeadline(deadline)
	var mu sync.Mutex
	stopped := false
	stopAfter := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if !stopped {
			c.SetDeadline(time.Unix(1, 0))
		}
	})
	return func() {
		stopAfter()
		mu.Lock()
		stopped = true
		mu.Unlock()
		c.SetDeadline(time.Time{})
	}
}

// A RelayRule lets every peer whose keyring name matches From reach every
// peer whose name matches To through a RelayServer. A pattern is a name, or
// a name with '*' (any run of characters) and '?' (one character) wildcards:
// "*" matches every peer, "wallet-*" every name starting with "wallet-".
type RelayRule struct {
	From, To string
}

// RelayRules is an allow list: a connection is allowed if any rule matches
// it, and denied otherwise. Its Allow method is a RelayServer.Allow policy.
type RelayRules []RelayRule

// Allow reports whether some rule lets from reach to.
func (r RelayRules) Allow(from, to Peer) bool {
	for _, rule := range r {
		if relayMatch(rule.From, from.Name) && relayMatch(rule.To, to.Name) {
			return true
		}
	}
	return false
}

// Check reports a rule with a malformed pattern, or with a pattern that
// matches no peer of kr: most likely a typo that would silently deny.
func (r RelayRules) Check(kr *Keyring) error {
	peers := kr.Peers()
	for _, rule := range r {
		for _, pat := range []string{rule.From, rule.To} {
			if err := checkRelayPattern(pat); err != nil {
				return fmt.Errorf("noisetor: relay rule %q -> %q: %v", rule.From, rule.To, err)
			}
			found := false
			for _, p := range peers {
				if relayMatch(pat, p.Name) {
					found = true
					break
				}
			}
			if !found {
				return fmt.Errorf("noisetor: relay rule %s -> %s: %q matches no peer of the keyring", rule.From, rule.To, pat)
			}
		}
	}
	return nil
}

// checkRelayPattern reports a malformed pattern, without quoting it (the
// caller adds context).
func checkRelayPattern(pat string) error {
	if pat == "" || len(pat) > maxNameLen {
		return fmt.Errorf("a pattern must be 1 to %d characters", maxNameLen)
	}
	for i := 0; i < len(pat); i++ {
		c := pat[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-' || c == '*' || c == '?') {
			return errors.New("use peer-name characters (a-z, 0-9, '.', '_', '-') and the wildcards '*' and '?'")
		}
	}
	return nil
}

// relayMatch matches name against a pattern of literal characters, '*' and
// '?'.
func relayMatch(pat, name string) bool {
	// Iterative glob match with single-star backtracking.
	p, n, star, mark := 0, 0, -1, 0
	for n < len(name) {
		switch {
		case p < len(pat) && (pat[p] == '?' || pat[p] == name[n]):
			p++
			n++
		case p < len(pat) && pat[p] == '*':
			star, mark = p, n
			p++
		case star >= 0:
			p = star + 1
			mark++
			n = mark
		default:
			return false
		}
	}
	for p < len(pat) && pat[p] == '*' {
		p++
	}
	return p == len(pat)
}

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

	mu         sync.Mutex
	done       chan struct{}
	closed     bool
	listeners  map[net.Listener]struct{}
	conns      map[*Conn]struct{}
	registered map[PublicKey]*relayRegistration
	pending    map[string]*relayPending
	sessions   int
	perPeer    map[PublicKey]int // sessions by requester
	idle       relayIdle
	unauth     relayTally // refusals of connections nobody authenticated
	wg         sync.WaitGroup
	nextID     atomic.Uint64
}

// relayRegistration is one registered peer's control connection.
type relayRegistration struct {
	peer Peer
	conn *Conn
	mu   sync.Mutex // serialises writes
	once sync.Once
	done chan struct{}
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
	to PublicKey
	ch chan *Conn // buffered: the ACCEPT side never blocks
}

func (s *RelayServer) initLocked() {
	if s.done == nil {
		s.unauth = relayTally{logger: s.Config.logger, interval: relayTallyInterval}
		s.done = make(chan struct{})
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*Conn]struct{})
		s.registered = make(map[PublicKey]*relayRegistration)
		s.pending = make(map[string]*relayPending)
	}
}

func (s *RelayServer) acceptTimeout() time.Duration {
	if s.AcceptTimeout <= 0 {
		return defaultRelayAcceptTimeout
	}
	return s.AcceptTimeout
}

func (s *RelayServer) pingInterval() time.Duration {
	if s.PingInterval <= 0 {
		return defaultRelayPingInterval
	}
	return s.PingInterval
}

func (s *RelayServer) maxSessions() int {
	if s.MaxSessions <= 0 {
		return defaultRelayMaxSessions
	}
	return s.MaxSessions
}

func (s *RelayServer) maxSessionsPerPeer() int {
	if s.MaxSessionsPerPeer <= 0 {
		return defaultRelayMaxPerPeer
	}
	return s.MaxSessionsPerPeer
}

func (s *RelayServer) maxIdlePerPeer() int {
	if s.MaxIdlePerPeer <= 0 {
		return defaultRelayMaxIdlePerPeer
	}
	return s.MaxIdlePerPeer
}

func (s *RelayServer) requestTimeout() time.Duration {
	if s.RequestTimeout <= 0 {
		return defaultRelayRequestTimeout
	}
	return s.RequestTimeout
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
	attrs := []slog.Attr{slog.String("op", op), slog.String("from", from)}
	if to != "" {
		attrs = append(attrs, slog.String("to", to))
	}
	attrs = append(attrs, slog.String("outcome", outcome))
	if reason != "" {
		attrs = append(attrs, slog.String("reason", reason))
	}
	attrs = append(attrs, slog.Duration("duration", time.Since(start)))
	attrs = append(attrs, extra...)
	s.Config.logger().LogAttrs(context.Background(), level, "noisetor: relay", attrs...)
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
	if !s.idle.enter(from.PublicKey, s.maxIdlePerPeer()) {
		s.refuse(oc, "request", from.Name, "", relayCodeBusy,
			fmt.Sprintf("%s has %d connections without a request already", from.Name, s.maxIdlePerPeer()), start)
		return
	}
	oc.SetDeadline(time.Now().Add(s.requestTimeout()))
	line, err := readRelayLine(oc)
	s.idle.leave(from.PublicKey)
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
	reg := &relayRegistration{peer: from, conn: c, done: make(chan struct{})}
	s.mu.Lock()
	old := s.registered[from.PublicKey]
	s.registered[from.PublicKey] = reg
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
	if s.registered[reg.peer.PublicKey] == reg {
		delete(s.registered, reg.peer.PublicKey)
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

func (s *RelayServer) connect(c *Conn, from Peer, arg string, start time.Time) {
	key, err := ParsePublicKey(arg)
	if err != nil {
		s.refuse(c, "connect", from.Name, "", relayCodeBadRequest, "CONNECT needs the target's public key", start)
		return
	}
	to, ok := s.Config.Keyring.ByKey(key)
	if !ok {
		s.refuse(c, "connect", from.Name, "key:"+key.Fingerprint(), relayCodeUnknownPeer,
			"the target's key (fingerprint "+key.Fingerprint()+") is not in the sync server's keyring", start)
		return
	}
	if s.Allow == nil || !s.Allow(from, to) {
		s.refuse(c, "connect", from.Name, to.Name, relayCodeDenied,
			fmt.Sprintf("policy does not allow %s to reach %s", from.Name, to.Name), start)
		return
	}
	s.mu.Lock()
	if s.sessions >= s.maxSessions() {
		s.mu.Unlock()
		s.refuse(c, "connect", from.Name, to.Name, relayCodeBusy, fmt.Sprintf("%d sessions already", s.maxSessions()), start)
		return
	}
	if s.perPeer[from.PublicKey] >= s.maxSessionsPerPeer() {
		s.mu.Unlock()
		s.refuse(c, "connect", from.Name, to.Name, relayCodeBusy, fmt.Sprintf("%s has %d sessions already", from.Name, s.maxSessionsPerPeer()), start)
		return
	}
	if s.perPeer == nil {
		s.perPeer = make(map[PublicKey]int)
	}
	s.sessions++
	s.perPeer[from.PublicKey]++
	reg := s.registered[to.PublicKey]
	var token string
	var p *relayPending
	if reg != nil {
		token = newRelayToken()
		p = &relayPending{to: to.PublicKey, ch: make(chan *Conn, 1)}
		s.pending[token] = p
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.sessions--
		if s.perPeer[from.PublicKey]--; s.perPeer[from.PublicKey] == 0 {
			delete(s.perPeer, from.PublicKey)
		}
		s.mu.Unlock()
	}()
	if reg == nil {
		s.refuse(c, "connect", from.Name, to.Name, relayCodeOffline, to.Name+" is not registered with the sync server", start)
		return
	}
	id := s.nextID.Add(1)
	session := slog.Uint64("session", id)

	var tc *Conn
	if err := reg.send("INCOMING " + token + " " + c.ConnectionState().PeerKey.String()); err != nil {
		reg.kill()
	} else {
		timer := time.NewTimer(s.acceptTimeout())
		select {
		case tc = <-p.ch:
		case <-timer.C:
		case <-s.done:
		}
		timer.Stop()
	}
	if tc == nil {
		s.mu.Lock()
		if s.pending[token] == p {
			delete(s.pending, token)
		} else {
			tc = <-p.ch // the ACCEPT won the race
		}
		s.mu.Unlock()
	}
	if tc == nil {
		select {
		case <-s.done:
			s.refuse(c, "connect", from.Name, to.Name, relayCodeShuttingDown, "the sync server is shutting down", start, session)
		default:
			s.refuse(c, "connect", from.Name, to.Name, relayCodeNoAnswer,
				fmt.Sprintf("%s is registered but did not answer within %v", to.Name, s.acceptTimeout()), start, session)
		}
		return
	}

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
	if p == nil || p.to != from.PublicKey {
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
	// for the connections to the sync server and for the end-to-end ones.
	// Required.
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

func (rc *RelayClient) logDecision(level slog.Level, op, peer, outcome, reason string, start time.Time) {
	attrs := []slog.Attr{slog.String("op", op), slog.String("server", rc.Server)}
	if peer != "" {
		attrs = append(attrs, slog.String("peer", peer))
	}
	attrs = append(attrs, slog.String("outcome", outcome))
	if reason != "" {
		attrs = append(attrs, slog.String("reason", reason))
	}
	attrs = append(attrs, slog.Duration("duration", time.Since(start)))
	rc.Config.logger().LogAttrs(context.Background(), level, "noisetor: relay", attrs...)
}

// dialServer opens one outer connection to the sync server.
func (rc *RelayClient) dialServer(ctx context.Context, addr string) (*Conn, error) {
	d := &Dialer{Config: rc.Config, NetDialer: rc.NetDialer, Peer: rc.Server}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("noisetor: relay: reaching the sync server %q: %w", rc.Server, err)
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
	server, addr, err := rc.check()
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
		rc:        rc,
		addr:      addr,
		serverKey: server.PublicKey,
		ctx:       lctx,
		cancel:    cancel,
		feed:      feed,
		nl:        NewListener(feed, rc.Config),
		gate:      relayGate{max: orDefault(rc.MaxPending, defaultRelayMaxPending), perPeerMax: orDefault(rc.MaxPendingPerPeer, defaultRelayMaxPendingPerPeer)},
		refusals: relayTally{logger: rc.Config.logger, interval: relayTallyInterval,
			attrs: []slog.Attr{slog.String("op", "accept"), slog.String("server", rc.Server)}},
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
	rc        *RelayClient
	addr      string
	serverKey PublicKey
	ctx       context.Context
	cancel    context.CancelFunc
	feed      *relayFeed
	nl        net.Listener // NewListener(feed): runs the end-to-end handshakes
	gate      relayGate
	// refusals counts the requests ignored before any connection is opened
	// and the accept connections that failed: the sync server can cause any
	// number of them, so they are logged as aggregates.
	refusals relayTally
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
	case requester == l.serverKey:
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
		rs := &relayStream{Conn: c, addr: relayAddr(l.rc.Server), requester: from, release: release}
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
		if p.PublicKey == l.serverKey {
			// The sync server is in our keyring, so it can complete a
			// handshake with its own key. It is no end-to-end peer, and
			// an application that trusts "any keyring peer" must not
			// take it for one.
			l.rc.logDecision(slog.LevelWarn, "accept", p.Name, "refused",
				"the sync server itself completed the end-to-end handshake: a relayed connection must come from another peer", time.Now())
			c.Close()
			continue
		}
		if p.PublicKey != rs.requester.PublicKey {
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

// A RelayConfig is the configuration file of a sync server (`noisetor relay`).
// See ParseRelayConfig for the format.
type RelayConfig struct {
	// Listen is the TCP address to listen on, "host:port". Over Tor, the
	// local address the onion service forwards to.
	Listen string
	// KeyFile is the sync server's private key file (empty when the key is
	// on a token: see NewServer); KeyringFile its keyring, listing every
	// wallet and watchtower. Relative paths in a file read by
	// LoadRelayConfig are relative to the file's directory.
	KeyFile     string
	KeyringFile string
	// Rules is the allow list: which peers may reach which.
	Rules RelayRules
	// AcceptTimeout, PingInterval and MaxSessions set the RelayServer fields
	// of the same names; zero means the default.
	AcceptTimeout time.Duration
	PingInterval  time.Duration
	MaxSessions   int
	// MaxSessionsPerPeer, MaxIdlePerPeer and RequestTimeout set the
	// RelayServer fields of the same names.
	MaxSessionsPerPeer int
	MaxIdlePerPeer     int
	RequestTimeout     time.Duration

	// Where each directive was read, for errors that must not quote a value
	// (it could be a secret pasted into the wrong file).
	source               string
	keyLine, keyringLine int
}

// LoadRelayConfig reads a relay configuration file (see ParseRelayConfig).
// It refuses a file that group or others may write: its allow rules are a
// security policy. Relative key and keyring paths are made relative to the
// file's directory.
func LoadRelayConfig(path string) (*RelayConfig, error) {
	// Writing it means choosing whom the sync server relays for: checked as
	// a keyring is (WIRE.md §11.4).
	f, err := openChecked(path, trustFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c, err := parseRelayConfig(path, f)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	for _, p := range []*string{&c.KeyFile, &c.KeyringFile} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	return c, nil
}

// ParseRelayConfig reads a relay configuration: UTF-8 text, one directive
// per line, fields separated by spaces or tabs, '#' starting a comment:
//
//	listen 127.0.0.1:7400         # required: TCP address to listen on
//	key sync.key                  # private key file (unless the key is on a token)
//	keyring sync.keyring          # required: keyring file
//	allow wallet-1 watchtower-1   # at least one: <from> may reach <to>
//	allow wallet-* watchtower-*   # '*' and '?' wildcards over peer names
//	accept-timeout 20s            # optional, Go duration syntax
//	ping-interval 30s             # optional
//	max-sessions 1024             # optional
//	max-sessions-per-peer 64      # optional
//	max-idle-per-peer 16          # optional
//	request-timeout 10s           # optional
//
// Every directive but allow appears at most once. Parsing is strict: an
// unknown directive, a missing required one, or a malformed value is an
// error naming the line. Errors never quote a rejected value or an unknown
// directive: it could be a secret pasted into the wrong file. Paths may not
// contain spaces.
func ParseRelayConfig(r io.Reader) (*RelayConfig, error) {
	return parseRelayConfig("", r)
}

func parseRelayConfig(path string, r io.Reader) (*RelayConfig, error) {
	name := path
	if name == "" {
		name = "<input>"
	}
	lineErr := func(n int, format string, args ...any) error {
		return fmt.Errorf("noisetor: relay config %s:%d: %s", name, n, fmt.Sprintf(format, args...))
	}
	c := &RelayConfig{}
	seen := map[string]int{}
	sc := bufio.NewScanner(io.LimitReader(r, 1<<20))
	sc.Buffer(make([]byte, 4096), 4096)
	n := 0
	for sc.Scan() {
		n++
		var fields []string
		for _, f := range strings.FieldsFunc(sc.Text(), func(r rune) bool { return r == ' ' || r == '\t' || r == '\r' }) {
			if strings.HasPrefix(f, "#") {
				break
			}
			fields = append(fields, f)
		}
		if len(fields) == 0 {
			continue
		}
		dir, args := fields[0], fields[1:]
		if dir != "allow" {
			if first, ok := seen[dir]; ok {
				return nil, lineErr(n, "%s given twice (first on line %d)", dir, first)
			}
			seen[dir] = n
		}
		want := 1
		if dir == "allow" {
			want = 2
		}
		if !slices.Contains(relayDirectives, dir) {
			// Not quoted: a line of a pasted key or PIN lands here.
			hint := ""
			if near := relayNearestDirective(dir); near != "" {
				hint = "; did you mean " + near + "?"
			}
			return nil, lineErr(n, "unknown directive (the line's first word, not shown in case it is a secret%s; want one of %s)",
				hint, strings.Join(relayDirectives, ", "))
		}
		if len(args) != want {
			return nil, lineErr(n, "%s takes %d value(s), got %d", dir, want, len(args))
		}
		switch dir {
		case "listen":
			_, port, err := net.SplitHostPort(args[0])
			if p, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || (p == 0 && port != "0") {
				// The value is not quoted: it could be a pasted secret.
				return nil, lineErr(n, "listen: want host:port, such as 127.0.0.1:7400")
			}
			c.Listen = args[0]
		case "key":
			c.KeyFile, c.keyLine = args[0], n
		case "keyring":
			c.KeyringFile, c.keyringLine = args[0], n
		case "allow":
			rule := RelayRule{From: args[0], To: args[1]}
			for i, pat := range args {
				if err := checkRelayPattern(pat); err != nil {
					return nil, lineErr(n, "allow: the %s pattern is not valid: %v", [2]string{"first", "second"}[i], err)
				}
			}
			c.Rules = append(c.Rules, rule)
		case "accept-timeout", "ping-interval", "request-timeout":
			d, err := time.ParseDuration(args[0])
			if err != nil || d <= 0 {
				return nil, lineErr(n, "%s: want a positive duration such as 20s", dir)
			}
			switch dir {
			case "accept-timeout":
				c.AcceptTimeout = d
			case "ping-interval":
				c.PingInterval = d
			default:
				c.RequestTimeout = d
			}
		case "max-sessions", "max-sessions-per-peer", "max-idle-per-peer":
			v, err := strconv.Atoi(args[0])
			if err != nil || v <= 0 {
				return nil, lineErr(n, "%s: want a positive integer", dir)
			}
			switch dir {
			case "max-sessions":
				c.MaxSessions = v
			case "max-sessions-per-peer":
				c.MaxSessionsPerPeer = v
			default:
				c.MaxIdlePerPeer = v
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("noisetor: relay config %s:%d: %w", name, n+1, err)
	}
	for _, d := range []string{"listen", "keyring"} {
		if _, ok := seen[d]; !ok {
			return nil, fmt.Errorf("noisetor: relay config %s: missing required directive %q", name, d)
		}
	}
	if len(c.Rules) == 0 {
		return nil, fmt.Errorf("noisetor: relay config %s: no allow rules: every request would be denied", name)
	}
	c.source = name
	return c, nil
}

// relayDirectives are the directives of a relay configuration file.
var relayDirectives = []string{"listen", "key", "keyring", "allow", "accept-timeout", "ping-interval",
	"max-sessions", "max-sessions-per-peer", "max-idle-per-peer", "request-timeout"}

// relayNearestDirective returns the directive within two edits of word, if
// exactly one is: a typo's likely fix. Only for words of four or more
// letters and hyphens, as directives are, so that it says next to nothing
// about a secret (keys and PINs hold digits, or are longer).
func relayNearestDirective(word string) string {
	if len(word) < 4 || strings.ContainsFunc(word, func(r rune) bool { return !('a' <= r && r <= 'z' || r == '-') }) {
		return ""
	}
	found := ""
	for _, d := range relayDirectives {
		if editDistanceAtMost2(word, d) {
			if found != "" {
				return ""
			}
			found = d
		}
	}
	return found
}

// editDistanceAtMost2 reports whether a and b are at most two insertions,
// deletions or substitutions apart.
func editDistanceAtMost2(a, b string) bool {
	if len(a) > len(b)+2 || len(b) > len(a)+2 || len(a) > 64 {
		return false
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)] <= 2
}

// fileErr explains that the file named on line of the configuration could
// not be loaded. A name that exists is a real file name and is quoted by
// err; one that does not may be a secret pasted into the wrong place, so it
// is not.
func (c *RelayConfig) fileErr(what, path string, line int, err error) error {
	if _, serr := os.Lstat(path); serr == nil || line == 0 {
		return err
	}
	return fmt.Errorf("noisetor: relay config %s:%d: the %s it names does not exist (the name is not shown, in case it is a secret): %w",
		c.source, line, what, fs.ErrNotExist)
}

// NewServer loads the keyring (and, if key is nil, the key file) the
// configuration names, checks that every allow rule matches some keyring
// peer, and returns a RelayServer logging to logger (nil: slog.Default()).
// Pass key to use a key held elsewhere, such as a PKCS#11 token; then the
// configuration need not name a key file. Serve the result with
// ListenAndServe("tcp", c.Listen).
func (c *RelayConfig) NewServer(key StaticKey, logger *slog.Logger) (*RelayServer, error) {
	if key == nil {
		if c.KeyFile == "" {
			return nil, errors.New("noisetor: relay config names no key file, and no other key was given")
		}
		k, err := LoadPrivateKey(c.KeyFile)
		if err != nil {
			return nil, c.fileErr("key file", c.KeyFile, c.keyLine, err)
		}
		key = k
	}
	kr, err := LoadKeyring(c.KeyringFile)
	if err != nil {
		return nil, c.fileErr("keyring file", c.KeyringFile, c.keyringLine, err)
	}
	if logger == nil {
		logger = slog.Default()
	}
	if warning := relayListenWarning(c.Listen); warning != "" {
		logger.Warn("noisetor: relay config: "+warning, slog.String("config", c.source), slog.String("listen", c.Listen))
	}
	if err := c.Rules.Check(kr); err != nil {
		return nil, err
	}
	return &RelayServer{
		Config:             &Config{StaticKey: key, Keyring: kr, Logger: logger},
		Allow:              c.Rules.Allow,
		AcceptTimeout:      c.AcceptTimeout,
		PingInterval:       c.PingInterval,
		MaxSessions:        c.MaxSessions,
		MaxSessionsPerPeer: c.MaxSessionsPerPeer,
		MaxIdlePerPeer:     c.MaxIdlePerPeer,
		RequestTimeout:     c.RequestTimeout,
	}, nil
}

// relayListenWarning says why a listen address deserves a warning, if it
// does: one that other hosts can reach. Behind an onion service the
// address should be loopback, or anyone on the network bypasses Tor (and
// its client authorization) to reach the sync server.
func relayListenWarning(listen string) string {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return ""
	}
	if host == "localhost" {
		return ""
	}
	ip, err := netip.ParseAddr(host)
	switch {
	case host == "" || err == nil && ip.IsUnspecified():
		return "listen " + listen + " accepts connections on every network interface: other hosts can reach the sync server; use 127.0.0.1:<port> behind an onion service"
	case err != nil:
		return "listen " + listen + " names a host, which may resolve to an address other hosts can reach; use 127.0.0.1:<port> behind an onion service"
	case !ip.IsLoopback():
		return "listen " + listen + " is not a loopback address: other hosts can reach the sync server; use 127.0.0.1:<port> behind an onion service"
	}
	return ""
}
