package noisetor

import (
	"context"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"
)

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
	c.state.record(c.Keyring, a)
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

// logAttempt logs the handshake of c. A Listener only counts the failures of
// callers that proved no keyring key: anyone can cause those, as fast as it
// can connect, and one record each would let it fill the disk.
func (c *Conn) logAttempt(d time.Duration, err error) {
	if err != nil && !c.isClient && !c.authenticated {
		c.cfg.state.refuse(c.refusalReason())
		if c.guard != nil {
			c.guard.refusals.add(c.refusalReason())
			return
		}
	}
	addr := c.addr
	if addr == "" && c.conn.RemoteAddr() != nil {
		addr = c.conn.RemoteAddr().String()
	}
	c.cfg.logAttempt(attempt{outbound: c.isClient, addr: addr, peer: c.state.Peer.Name,
		pattern: c.state.Pattern, cipher: c.state.CipherSuite, duration: d, err: err})
}

// refusalReason names, in a few fixed words, why an unauthenticated caller
// was refused; the words are the keys of the aggregate record.
func (c *Conn) refusalReason() string {
	if r := c.dropReason.Load(); r != nil {
		return *r
	}
	if c.refusal != "" {
		return c.refusal
	}
	return "closed or timed out before proving a key"
}

const refusalLogMessage = "noisetor: refused callers that proved no keyring key"

// refusalLogInterval is how often a Listener logs its counts of refused
// unauthenticated callers.
const refusalLogInterval = time.Minute

// refusalLog counts refusals by reason and logs the counts as one Warn
// record per interval. A reason not seen yet in the interval is logged at
// once, so an operator sees an attack (or a misconfigured peer) start; the
// records per interval are bounded by the few fixed reasons.
type refusalLog struct {
	logger   *slog.Logger
	interval time.Duration

	mu     sync.Mutex
	counts map[string]int
	seen   map[string]bool // reasons logged in this interval
	timer  *time.Timer     // armed while the interval runs
	since  time.Time
}

func newRefusalLog(logger *slog.Logger, interval time.Duration) *refusalLog {
	return &refusalLog{logger: logger, interval: interval, counts: make(map[string]int), seen: make(map[string]bool)}
}

func (r *refusalLog) add(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts[reason]++
	if r.seen[reason] {
		return
	}
	r.seen[reason] = true
	r.writeLocked()
	if r.timer == nil {
		r.timer = time.AfterFunc(r.interval, r.tick)
	}
}

// tick writes what accumulated in the interval, and keeps the timer armed
// while refusals keep coming.
func (r *refusalLog) tick() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.timer == nil {
		return // flushed meanwhile
	}
	clear(r.seen)
	if len(r.counts) == 0 {
		r.timer = nil
		return
	}
	r.writeLocked()
	r.timer.Reset(r.interval)
}

// flush writes what is held back and stops the timer.
func (r *refusalLog) flush() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
	clear(r.seen)
	if len(r.counts) > 0 {
		r.writeLocked()
	}
}

func (r *refusalLog) writeLocked() {
	now := time.Now()
	total := 0
	attrs := []slog.Attr{}
	for _, reason := range slices.Sorted(maps.Keys(r.counts)) {
		n := r.counts[reason]
		total += n
		attrs = append(attrs, slog.Int(reason, n))
	}
	head := []slog.Attr{slog.Int("refused", total)}
	if !r.since.IsZero() {
		head = append(head, slog.Duration("interval", now.Sub(r.since).Round(time.Second)))
	}
	r.logger.LogAttrs(context.Background(), slog.LevelWarn, refusalLogMessage,
		append(head, slog.Attr{Key: "reasons", Value: slog.GroupValue(attrs...)})...)
	clear(r.counts)
	r.since = now
}
