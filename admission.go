package noisetor

import (
	"context"
	"fmt"
	"net"
	"net/netip"
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

// peerTurns bounds one peer's concurrent handshakes.
type peerTurns struct {
	key     PublicKey
	sem     chan struct{} // one token per running handshake
	waiting int
}

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
	}
	a.remove(c)
	if t := c.turn; t != nil {
		c.turn = nil
		<-t.sem
		a.forgetIdle(t)
	}
}

func (a *admission) forgetIdle(t *peerTurns) {
	if len(t.sem) == 0 && t.waiting == 0 && a.turns[t.key] == t {
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
	max := l.cfg.maxHandshakesPerPeer()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	l.admission.remove(c)
	t := l.admission.turns[peer]
	if t == nil {
		t = &peerTurns{key: peer, sem: make(chan struct{}, max)}
		l.admission.turns[peer] = t
	}
	if t.waiting >= maxWaitingTurns*max {
		l.mu.Unlock()
		return fmt.Errorf("%w: this peer has %d handshakes running and %d waiting", errTooManyHandshakes, max, t.waiting)
	}
	t.waiting++
	l.mu.Unlock()

	var err error
	select {
	case t.sem <- struct{}{}:
	case <-ctx.Done():
		err = ctx.Err()
	}
	l.mu.Lock()
	t.waiting--
	if err == nil {
		c.turn = t
	} else {
		l.admission.forgetIdle(t)
	}
	l.mu.Unlock()
	return err
}

// maxWaitingTurns: a peer's connections beyond its running handshakes wait
// for a turn, up to this many times MaxHandshakesPerPeer (with the default,
// 128 connections in all, enough for an http.Client's burst); more are
// refused, so a member cannot hold unbounded sockets.
const maxWaitingTurns = 15

var errTooManyHandshakes = fmt.Errorf("noisetor: too many concurrent handshakes from one peer")

// acquireDH waits, within ctx, for a DH slot; release it as soon as the DH
// is done.
func (l *listener) acquireDH(ctx context.Context) (release func(), err error) {
	select {
	case l.dhSlots <- struct{}{}:
		return func() { <-l.dhSlots }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
