package noisetor

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"time"
)

// Listen creates a TCP (or other stream) listener on addr and wraps it with
// NewListener.
func Listen(network, addr string, cfg *Config) (net.Listener, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	inner, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	return NewListener(inner, cfg), nil
}

// NewListener returns a listener whose Accept yields only connections whose
// handshake has completed with a keyring peer, as *Conn.
//
// Handshakes run in their own goroutines, so a slow or hostile caller never
// holds up Accept. Each is bounded by Config.HandshakeTimeout; at most
// Config.MaxPendingHandshakes wait at once (past that the oldest is dropped),
// and at most Config.MaxConcurrentDH are past the preamble check, doing DH.
// A failed handshake is logged and never returned from Accept, so servers
// such as http.Serve keep serving. Errors of the underlying listener other
// than its closing (out of file descriptors, say) are logged and retried with
// backoff; Accept returns an error only once the listener is closed.
func NewListener(inner net.Listener, cfg *Config) net.Listener {
	ctx, cancel := context.WithCancel(context.Background())
	maxDH := cfg.MaxConcurrentDH
	if maxDH <= 0 {
		maxDH = 4 * runtime.GOMAXPROCS(0)
	}
	l := &listener{
		inner:   inner,
		cfg:     cfg,
		ctx:     ctx,
		cancel:  cancel,
		ready:   make(chan *Conn),
		done:    make(chan struct{}),
		dhSlots: make(chan struct{}, maxDH),
		pending: list.New(),
		replay:  newReplayCache(replayCacheSize),
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l
}

type listener struct {
	inner   net.Listener
	cfg     *Config
	ctx     context.Context
	cancel  context.CancelFunc
	ready   chan *Conn
	done    chan struct{}
	dhSlots chan struct{}
	replay  *replayCache
	wg      sync.WaitGroup

	mu      sync.Mutex
	pending *list.List // of *Conn, oldest first
	err     error      // from the inner listener
	closed  bool
}

func (l *listener) acceptLoop() {
	defer l.wg.Done()
	defer close(l.done)
	var backoff time.Duration
	for {
		raw, err := l.inner.Accept()
		if err != nil {
			l.mu.Lock()
			closed := l.closed
			l.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				l.mu.Lock()
				l.err = err
				l.mu.Unlock()
				return
			}
			// Anything else (out of file descriptors, a network hiccup) may
			// pass: keep serving rather than take the service down.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.cfg.logger().Warn("noisetor: accept failed; retrying", "err", err.Error(), "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.ctx.Done():
			}
			continue
		}
		backoff = 0
		c := Server(raw, l.cfg)
		c.replay = l.replay
		c.dhGate = l.acquireDH
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			raw.Close()
			return
		}
		max := l.cfg.MaxPendingHandshakes
		if max <= 0 {
			max = defaultMaxPendingHandshakes
		}
		if l.pending.Len() >= max {
			// Drop the oldest: a flood of stalled callers cannot keep a
			// real peer out, it only shortens everyone's patience.
			oldest := l.pending.Remove(l.pending.Front()).(*Conn)
			oldest.drop("too many pending handshakes; this was the oldest")
		}
		elem := l.pending.PushBack(c)
		l.mu.Unlock()
		l.wg.Add(1)
		go l.handshake(c, elem)
	}
}

func (l *listener) handshake(c *Conn, elem *list.Element) {
	defer l.wg.Done()
	err := c.HandshakeContext(l.ctx)
	l.mu.Lock()
	l.pending.Remove(elem) // no-op if it was evicted
	l.mu.Unlock()
	if err != nil {
		return // logged by HandshakeContext; the connection is closed
	}
	select {
	case l.ready <- c:
	case <-l.ctx.Done():
		c.Close()
	}
}

// drop closes a connection whose handshake is still running, recording why
// for its log line.
func (c *Conn) drop(reason string) {
	c.dropReason.Store(&reason)
	c.conn.Close()
}

func (l *listener) acquireDH(ctx context.Context) (func(), error) {
	select {
	case l.dhSlots <- struct{}{}:
		return func() { <-l.dhSlots }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Accept waits for and returns the next authenticated connection.
func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ready:
		return c, nil
	case <-l.done:
	case <-l.ctx.Done():
	}
	// Hand out connections that completed before the inner listener failed.
	select {
	case c := <-l.ready:
		return c, nil
	default:
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.err == nil {
		return nil, net.ErrClosed
	}
	return nil, fmt.Errorf("noisetor: accept: %w", l.err)
}

// Close closes the underlying listener and every connection still in its
// handshake, and waits for the listener's goroutines to exit. Connections
// already returned by Accept stay open.
func (l *listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	l.closed = true
	for e := l.pending.Front(); e != nil; e = e.Next() {
		e.Value.(*Conn).drop("listener closed")
	}
	l.mu.Unlock()
	l.cancel()
	err := l.inner.Close()
	l.wg.Wait()
	return err
}

func (l *listener) Addr() net.Addr { return l.inner.Addr() }

// replayCacheSize bounds the preamble salts a listener remembers. An exact
// replay within that window is dropped before any DH; an older one costs one
// handshake's DH and still yields no session (WIRE.md §6.2).
const replayCacheSize = 1 << 16

// replayCache remembers recent preamble salts, evicting the oldest.
type replayCache struct {
	mu    sync.Mutex
	seen  map[[preambleSalt]byte]struct{}
	order [][preambleSalt]byte // ring
	next  int
}

func newReplayCache(size int) *replayCache {
	return &replayCache{seen: make(map[[preambleSalt]byte]struct{}), order: make([][preambleSalt]byte, 0, size)}
}

// add reports whether salt is new, and remembers it.
func (r *replayCache) add(salt [preambleSalt]byte) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.seen[salt]; ok {
		return false
	}
	if len(r.order) < cap(r.order) {
		r.order = append(r.order, salt)
	} else {
		delete(r.seen, r.order[r.next])
		r.order[r.next] = salt
		r.next = (r.next + 1) % len(r.order)
	}
	r.seen[salt] = struct{}{}
	return true
}

// An attempt is one connection attempt, for the log.
type attempt struct {
	outbound bool
	addr     string
	peer     string // keyring name, when known
	pattern  Pattern
	cipher   CipherSuite
	duration time.Duration
	err      error
}

// logAttempt writes the one log record of a connection attempt. It records
// only public facts: never a key other than a public one, never a secret.
func (c *Config) logAttempt(a attempt) {
	dir := "in"
	if a.outbound {
		dir = "out"
	}
	attrs := []slog.Attr{
		slog.String("direction", dir),
		slog.String("addr", a.addr),
		slog.String("pattern", a.pattern.String()),
		slog.String("cipher", a.cipher.String()),
		slog.Duration("duration", a.duration),
	}
	if a.peer != "" {
		attrs = append(attrs, slog.String("peer", a.peer))
	}
	if a.err == nil {
		c.logger().LogAttrs(context.Background(), slog.LevelInfo, "noisetor: handshake", append(attrs, slog.String("outcome", "ok"))...)
		return
	}
	attrs = append(attrs, slog.String("outcome", "failed"), slog.String("reason", a.err.Error()))
	c.logger().LogAttrs(context.Background(), slog.LevelWarn, "noisetor: handshake", attrs...)
}

// logAttempt logs the handshake of c.
func (c *Conn) logAttempt(d time.Duration, err error) {
	addr := c.addr
	if addr == "" && c.conn.RemoteAddr() != nil {
		addr = c.conn.RemoteAddr().String()
	}
	c.cfg.logAttempt(attempt{outbound: c.isClient, addr: addr, peer: c.state.Peer.Name,
		pattern: c.state.Pattern, cipher: c.state.CipherSuite, duration: d, err: err})
}
