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
		logOutcome(c.logger(), slog.LevelInfo, "noisetor: handshake", attrs, "ok", "")
		return
	}
	logOutcome(c.logger(), slog.LevelWarn, "noisetor: handshake", attrs, "failed", a.err.Error())
}

// logOutcome writes the one record of a decision (a handshake, a relay
// request): the attributes that say what was decided about whom, then
// outcome and, if not empty, reason, then more. Handshake records and relay
// records (RelayServer.logDecision, RelayClient.logDecision) are written
// here, so that they share outcome and reason.
func logOutcome(l *slog.Logger, level slog.Level, msg string, about []slog.Attr, outcome, reason string, more ...slog.Attr) {
	attrs := append(about, slog.String("outcome", outcome))
	if reason != "" {
		attrs = append(attrs, slog.String("reason", reason))
	}
	l.LogAttrs(context.Background(), level, msg, append(attrs, more...)...)
}

// logAttempt logs the handshake of c. A Listener only counts the failures of
// callers that proved no keyring key: anyone can cause those, as fast as it
// can connect, and one record each would let it fill the disk.
func (c *Conn) logAttempt(d time.Duration, err error) {
	if err != nil && !c.isClient && !c.authenticated {
		c.cfg.state.refuse(c.refusalReason())
		if c.guard != nil {
			c.guard.refusals.add(c.refusalReason(), "")
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

// refusalLogInterval is how often a refusalLog writes its counts.
const refusalLogInterval = time.Minute

// A refusalLog logs the refusals of input nobody has vouched for (callers
// that proved no keyring key; at a relay, connections and requests no peer
// of the keyring answers for) as aggregates, counts by reason, one Warn
// record per interval, instead of one record each: a flood of them costs the
// sender nothing per record, and must not fill the operator's disk or drown
// the records that matter. Decisions about authenticated peers keep one
// record each. With atOnce, a reason not seen yet in the interval is logged
// at once, so that an operator sees an attack (or a misconfigured peer)
// start; the records per interval are bounded by the few fixed reasons.
type refusalLog struct {
	logger func() *slog.Logger
	msg    string
	attrs  []slog.Attr // the first attributes of every record
	atOnce bool

	mu     sync.Mutex
	total  int // refusals ever counted, logged or not
	counts map[string]int
	seen   map[string]bool // reasons logged in this interval, with atOnce
	sample string          // the last detail, to show what the refusals look like
	timer  *time.Timer     // armed while the interval runs
	since  time.Time       // of the last record
	closed bool
}

func newRefusalLog(logger func() *slog.Logger, msg string, atOnce bool, attrs ...slog.Attr) *refusalLog {
	return &refusalLog{logger: logger, msg: msg, attrs: attrs, atOnce: atOnce,
		counts: make(map[string]int), seen: make(map[string]bool)}
}

// add counts one refusal under reason, a few fixed words that are the key of
// its count; detail, if not empty, is an example logged with the counts.
func (r *refusalLog) add(reason, detail string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.counts[reason]++
	r.total++
	if detail != "" {
		r.sample = detail
	}
	if r.atOnce && !r.seen[reason] {
		r.seen[reason] = true
		r.writeLocked()
	}
	if r.timer == nil {
		r.timer = time.AfterFunc(refusalLogInterval, r.tick)
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
	r.timer.Reset(refusalLogInterval)
}

// flush writes what is held back and stops the timer.
func (r *refusalLog) flush() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.flushLocked()
}

// close is flush, and stops counting.
func (r *refusalLog) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	r.flushLocked()
}

func (r *refusalLog) flushLocked() {
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
	var reasons []slog.Attr
	for _, reason := range slices.Sorted(maps.Keys(r.counts)) {
		n := r.counts[reason]
		total += n
		reasons = append(reasons, slog.Int(reason, n))
	}
	attrs := append(slices.Clip(r.attrs), slog.Int("refused", total))
	if !r.since.IsZero() {
		attrs = append(attrs, slog.Duration("interval", now.Sub(r.since).Round(time.Second)))
	}
	attrs = append(attrs, slog.Attr{Key: "reasons", Value: slog.GroupValue(reasons...)})
	if r.sample != "" {
		attrs = append(attrs, slog.String("example", r.sample))
	}
	r.logger().LogAttrs(context.Background(), slog.LevelWarn, r.msg, attrs...)
	clear(r.counts)
	r.sample = ""
	r.since = now
}
