package noisetor

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"
)

// admission decides which connections a Listener keeps while they handshake
// (NewListener lists the rules). All of it is guarded by listener.mu.
//
// Two classes are kept apart because anyone can open the first and only a
// keyring member the second: unauthenticated connections (no valid preamble
// yet, or XK before message 3) share MaxPendingHandshakes places, and a flood
// of them can only push out each other; authenticated ones take a turn of
// their peer and are never pushed out.
type admission struct {
	max      int
	count    int                // unauthenticated connections held
	bySource map[string][]*Conn // unauthenticated, oldest first per source
	turns    map[PublicKey]*peerTurns
}

// peerTurns bounds one peer's concurrent handshakes. The newest connection
// of a peer takes precedence: a handshake that has held a turn for
// turnMinAge while another of the peer's connections arrives is dropped for
// it, and waiting connections are served newest first. So handshakes that
// never finish (a replayer's, which cannot send CONFIRM, or a stalled
// member's) can keep no connection of that peer out for long, and they cost
// only that peer's share.
type peerTurns struct {
	key     PublicKey
	running []*Conn       // holding a turn, oldest first
	waiting []*turnWaiter // oldest first; served from the end
	dh      chan struct{} // the peer's share of the DH slots
	timer   *time.Timer   // armed while connections wait: see rebalance
}

type turnWaiter struct {
	c       *Conn
	ready   chan struct{} // closed when granted or refused
	granted bool
}

// turnMinAge is how long a running handshake keeps its turn against a newer
// connection of the same peer: a real handshake needs one round trip after
// its turn (message 2 out, CONFIRM in), seconds even over Tor.
const turnMinAge = 5 * time.Second

// enter admits a new unauthenticated connection, dropping another if the
// places are full, and gives it timeout to send its preamble.
func (a *admission) enter(c *Conn, timeout time.Duration) {
	if a.count >= a.max {
		a.evict()
	}
	c.source = sourceOf(c.conn.RemoteAddr())
	a.bySource[c.source] = append(a.bySource[c.source], c)
	a.count++
	c.unauthenticated = true
	c.preambleTimer = time.AfterFunc(timeout, func() { c.drop("no preamble within " + timeout.String()) })
}

// evict drops the oldest unauthenticated connection of the source that holds
// the most: a flood from one address displaces only itself. (Behind an onion
// service every caller has the same address; there tor's own limits and
// client authorization hold the flood back, WIRE.md §7.)
func (a *admission) evict() {
	var busiest string
	n := 0
	for src, cs := range a.bySource {
		if len(cs) > n {
			busiest, n = src, len(cs)
		}
	}
	if n == 0 {
		return
	}
	victim := a.bySource[busiest][0]
	a.remove(victim)
	victim.drop("too many unauthenticated connections; this was the oldest from the busiest address")
}

// remove takes c out of the unauthenticated places.
func (a *admission) remove(c *Conn) {
	if !c.unauthenticated {
		return
	}
	c.unauthenticated = false
	cs := a.bySource[c.source]
	for i, x := range cs {
		if x == c {
			cs = append(cs[:i], cs[i+1:]...)
			break
		}
	}
	if len(cs) == 0 {
		delete(a.bySource, c.source)
	} else {
		a.bySource[c.source] = cs
	}
	a.count--
}

// leave forgets c when its handshake goroutine ends.
func (a *admission) leave(c *Conn) {
	if c.preambleTimer != nil {
		c.preambleTimer.Stop()
		c.preambleTimer = nil
	}
	a.remove(c)
	if t := c.turn; t != nil {
		c.turn = nil
		t.running = slices.DeleteFunc(t.running, func(x *Conn) bool { return x == c })
		if n := len(t.waiting); n > 0 {
			w := t.waiting[n-1] // newest first
			t.waiting = t.waiting[:n-1]
			t.grant(w)
		}
		a.forgetIdle(t)
	}
}

func (t *peerTurns) grant(w *turnWaiter) {
	w.granted = true
	w.c.turn, w.c.turnStart = t, time.Now()
	t.running = append(t.running, w.c)
	close(w.ready)
}

func (a *admission) forgetIdle(t *peerTurns) {
	if len(t.running) == 0 && len(t.waiting) == 0 && a.turns[t.key] == t {
		delete(a.turns, t.key)
	}
}

// dropAll drops every unauthenticated connection (the listener is closing;
// the others end through their cancelled contexts).
func (a *admission) dropAll(reason string) {
	for _, cs := range a.bySource {
		for _, c := range cs {
			c.unauthenticated = false
			c.drop(reason)
		}
	}
	clear(a.bySource)
	a.count = 0
}

// sourceOf is the address a flood is counted by: the IP address (an IPv6
// /64, which one host usually owns whole), or the whole address otherwise.
func sourceOf(addr net.Addr) string {
	if addr == nil {
		return ""
	}
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return addr.String()
	}
	ip := ap.Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.String()
	}
	return ip.String()
}

// preambleReceived ends the preamble timer: the caller has sent its 48 bytes.
func (l *listener) preambleReceived(c *Conn) {
	c.preambleTimer.Stop()
}

// authenticated moves c, which has just proved the static key of peer (KK:
// its preamble tag; XK: message 3), out of the unauthenticated places and
// waits, within ctx, for one of the peer's turns.
func (l *listener) authenticated(ctx context.Context, c *Conn, peer PublicKey) error {
	limit := l.cfg.maxHandshakesPerPeer()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	l.admission.remove(c)
	t := l.admission.turns[peer]
	if t == nil {
		t = &peerTurns{key: peer, dh: make(chan struct{}, max(1, cap(l.dhSlots)/2))}
		l.admission.turns[peer] = t
	}
	c.peerDH = t.dh
	now := time.Now()
	if len(t.running) >= limit && now.Sub(t.running[0].turnStart) >= turnMinAge {
		// The oldest has had its round trip and more: this one goes first.
		old := t.running[0]
		t.running = t.running[1:]
		old.turn = nil
		old.drop("a newer connection of the same peer took its turn")
	}
	if len(t.running) < limit {
		c.turn, c.turnStart = t, now
		t.running = append(t.running, c)
		l.mu.Unlock()
		return nil
	}
	if len(t.waiting) >= maxWaitingTurns*limit {
		// Full: the oldest waiting connection of this peer makes room.
		old := t.waiting[0]
		t.waiting = t.waiting[1:]
		close(old.ready)
	}
	w := &turnWaiter{c: c, ready: make(chan struct{})}
	t.waiting = append(t.waiting, w)
	l.armRebalance(t, now)
	l.mu.Unlock()

	var err error
	select {
	case <-w.ready:
	case <-ctx.Done():
		err = ctx.Err()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if w.granted {
		return nil // granted, perhaps as ctx ended: leave releases it
	}
	t.waiting = slices.DeleteFunc(t.waiting, func(x *turnWaiter) bool { return x == w })
	l.admission.forgetIdle(t)
	if err == nil {
		return fmt.Errorf("%w: newer connections of this peer took the %d places in its queue", errTooManyHandshakes, maxWaitingTurns*limit)
	}
	return err
}

// armRebalance makes sure that, while connections of t's peer wait, its
// oldest running handshake is displaced once it reaches turnMinAge. l.mu
// must be held.
func (l *listener) armRebalance(t *peerTurns, now time.Time) {
	if t.timer != nil || len(t.waiting) == 0 || len(t.running) == 0 {
		return
	}
	t.timer = time.AfterFunc(t.running[0].turnStart.Add(turnMinAge).Sub(now), func() { l.rebalance(t) })
}

// rebalance gives the turns of handshakes that have run for turnMinAge to
// the newest waiting connections.
func (l *listener) rebalance(t *peerTurns) {
	l.mu.Lock()
	defer l.mu.Unlock()
	t.timer = nil
	if l.closed {
		return
	}
	now := time.Now()
	for len(t.waiting) > 0 && len(t.running) > 0 && now.Sub(t.running[0].turnStart) >= turnMinAge {
		old := t.running[0]
		t.running = t.running[1:]
		old.turn = nil
		old.drop("a newer connection of the same peer took its turn")
		n := len(t.waiting)
		w := t.waiting[n-1]
		t.waiting = t.waiting[:n-1]
		t.grant(w)
	}
	l.armRebalance(t, now)
}

// maxWaitingTurns: a peer's connections beyond its running handshakes wait
// for a turn, up to this many times MaxHandshakesPerPeer (with the default,
// 128 connections in all, enough for an http.Client's burst); past that the
// oldest waiting one is dropped, so a member cannot hold unbounded sockets.
const maxWaitingTurns = 15

var errTooManyHandshakes = fmt.Errorf("noisetor: too many concurrent handshakes from one peer")

// acquireDH waits, within ctx, for a DH slot, and first for one of the
// caller's peer's share (at most half the slots), so that no one member can
// hold every slot; release it as soon as the DH is done.
func (l *listener) acquireDH(ctx context.Context, c *Conn) (release func(), err error) {
	if c.peerDH != nil {
		select {
		case c.peerDH <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	select {
	case l.dhSlots <- struct{}{}:
	case <-ctx.Done():
		if c.peerDH != nil {
			<-c.peerDH
		}
		return nil, ctx.Err()
	}
	return func() {
		<-l.dhSlots
		if c.peerDH != nil {
			<-c.peerDH
		}
	}, nil
}
