package noisetor

import (
	"context"
	"errors"
	"fmt"
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
// holds up Accept. Nobody who cannot prove a keyring key can keep a member
// out (WIRE.md §7):
//   - a caller that has not sent a valid preamble gets PreambleTimeout to do
//     so, and a place among MaxPendingHandshakes; when they are full, the
//     oldest connection of the remote address holding the most is dropped;
//   - a keyring peer runs at most MaxHandshakesPerPeer handshakes at once;
//   - a DH slot (MaxConcurrentDH) is held only while a DH is computed;
//   - at most AcceptBacklog completed connections wait for Accept.
//
// Each handshake is bounded by Config.HandshakeTimeout. A failed handshake is
// never returned from Accept, so servers such as http.Serve keep serving; it
// is logged, those of callers that proved no key as counts once a minute.
// Errors of the underlying listener other than its closing (out of file
// descriptors, say) are logged and retried with backoff; Accept returns an
// error only once the listener is closed.
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
		ready:   make(chan *Conn, cfg.acceptBacklog()),
		done:    make(chan struct{}),
		dhSlots: make(chan struct{}, maxDH),
		admission: admission{
			max:      cfg.maxPendingHandshakes(),
			bySource: make(map[string][]*Conn),
			turns:    make(map[PublicKey]*peerTurns),
		},
		refusals: newRefusalLog(cfg.logger, refusalLogMessage, true),
	}
	if cfg.StaticKey != nil {
		// Derive every peer's pair key now (one DH each, maybe on a token)
		// rather than in the first caller's handshake.
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			cfg.keys().findKK(cfg.Keyring, &preamble{}, make([]byte, preambleLen), cfg.now())
		}()
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l
}

type listener struct {
	inner    net.Listener
	cfg      *Config
	ctx      context.Context
	cancel   context.CancelFunc
	ready    chan *Conn // the accept backlog
	done     chan struct{}
	dhSlots  chan struct{}
	refusals *refusalLog
	wg       sync.WaitGroup

	mu        sync.Mutex
	admission admission
	err       error // from the inner listener
	closed    bool
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
		c.guard = l
		ctx, cancel := context.WithCancel(l.ctx)
		c.cancelHandshake.Store(&cancel)
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			cancel()
			raw.Close()
			return
		}
		l.admission.enter(c, l.cfg.preambleTimeout())
		l.mu.Unlock()
		l.wg.Add(1)
		go l.handshake(ctx, c)
	}
}

func (l *listener) handshake(ctx context.Context, c *Conn) {
	defer l.wg.Done()
	defer func() {
		// An established connection keeps neither its handshake's context
		// nor (admission.leave) its preamble timer: 10,000 connections
		// would hold megabytes of them.
		(*c.cancelHandshake.Swap(nil))()
	}()
	err := c.HandshakeContext(ctx)
	if err == nil {
		err = l.queue(ctx, c)
	}
	l.mu.Lock()
	l.admission.leave(c)
	l.mu.Unlock()
	if err != nil {
		c.Close()
	}
}

// queue puts a completed connection in the accept backlog, waiting for room
// until the end of its handshake time. Until then it keeps its peer's turn,
// so a peer whose connections are not accepted slows down only itself.
func (l *listener) queue(ctx context.Context, c *Conn) error {
	select {
	case l.ready <- c:
		return nil
	default:
	}
	t := time.NewTimer(time.Until(c.handshakeStart.Add(l.cfg.handshakeTimeout())))
	defer t.Stop()
	select {
	case l.ready <- c:
		return nil
	case <-t.C:
		l.cfg.logger().Warn("noisetor: accept backlog full; closing a completed connection",
			"peer", c.state.Peer.Name, "backlog", cap(l.ready))
		return errors.New("accept backlog full")
	case <-ctx.Done():
		return ctx.Err()
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
// handshake or in the accept backlog, and waits for the listener's goroutines
// to exit. Connections already returned by Accept stay open.
func (l *listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	l.closed = true
	l.admission.dropAll("listener closed")
	l.mu.Unlock()
	l.cancel()
	err := l.inner.Close()
	l.wg.Wait()
	for {
		select {
		case c := <-l.ready:
			c.Close()
			continue
		default:
		}
		break
	}
	l.refusals.flush()
	return err
}

func (l *listener) Addr() net.Addr { return l.inner.Addr() }
