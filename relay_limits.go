package noisetor

// Availability limits of the relay (WIRE.md §12.8): no member, and on the
// watchtower side not even the sync server, can make a relay component hold
// resources without bound, and one member's share never covers another's.

import (
	"fmt"
	"sync"
	"time"
)

const (
	// defaultRelayMaxIdlePerPeer bounds, at the sync server, the outer
	// connections of one peer that have not yet sent their first control
	// line. An honest peer sends that line right after its handshake, so it
	// has at most a burst of them at once.
	defaultRelayMaxIdlePerPeer = 16

	// defaultRelayRequestTimeout bounds the wait for the first control line
	// of an outer connection. The line follows the handshake's last message
	// in the same flight, so this is ample over Tor.
	defaultRelayRequestTimeout = 10 * time.Second

	// defaultRelayMaxPending and defaultRelayMaxPendingPerPeer bound, at a
	// relay listener, the relayed connections being set up (accept
	// connection, end-to-end handshake, waiting for Accept), in all and per
	// requester. Per requester it matches the sync server's default
	// sessions per requester, so that an honest sync server never lets an
	// honest burst through that the listener then drops.
	defaultRelayMaxPending        = 256
	defaultRelayMaxPendingPerPeer = defaultRelayMaxPerPeer

	// relaySetupWindow sets the rate at which a relay listener starts
	// setting up relayed connections: at most its pending limits per window,
	// in all and per requester, in bursts of up to those limits. Each setup
	// costs an outer handshake (the accept connection) and an inner one, and
	// a sync server that refuses every accept at once could otherwise make
	// us do them as fast as it answers, taking the static key's DH capacity
	// (a token's, maybe) from our other listeners.
	relaySetupWindow = 4 * time.Second
)

// relayGate bounds the relayed connections a relay listener is setting up,
// in all and per requester, the requester being the peer the sync server
// names in its INCOMING line. The sync server may lie about who asks: then
// it only spends the share of the peer it names, which is no more than it
// could do by dropping that peer's requests. With an honest sync server a
// requester can fill its own share, never another's.
type relayGate struct {
	max, perPeerMax int

	mu      sync.Mutex
	total   int
	rate    relayBucket
	perPeer map[PublicKey]*relayGatePeer // only keyring peers: bounded
}

type relayGatePeer struct {
	pending int
	rate    relayBucket
}

// enter takes a slot for requester; on refusal it returns the reason code.
func (g *relayGate) enter(requester PublicKey) (refused string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.perPeer == nil {
		g.perPeer = make(map[PublicKey]*relayGatePeer)
	}
	p := g.perPeer[requester]
	if p == nil {
		p = &relayGatePeer{}
		g.perPeer[requester] = p
	}
	now := time.Now()
	switch {
	case p.pending >= g.perPeerMax:
		return "requester_share_full"
	case g.total >= g.max:
		return "all_slots_full"
	case !p.rate.ready(now, g.perPeerMax):
		return "requester_rate"
	case !g.rate.ready(now, g.max):
		return "total_rate"
	}
	// Spend only once both buckets allow it, so that one requester's
	// refused requests cost the others nothing.
	p.rate.take()
	g.rate.take()
	g.total++
	p.pending++
	return ""
}

// relayBucket is a token bucket holding up to size tokens, refilled at size
// per relaySetupWindow.
type relayBucket struct {
	spent float64 // tokens missing from a full bucket
	last  time.Time
}

// ready refills the bucket to now and reports whether it holds a token.
func (b *relayBucket) ready(now time.Time, size int) bool {
	if !b.last.IsZero() {
		b.spent = max(0, b.spent-float64(size)*float64(now.Sub(b.last))/float64(relaySetupWindow))
	}
	b.last = now
	return b.spent+1 <= float64(size)
}

func (b *relayBucket) take() { b.spent++ }

// leaver returns the function that frees requester's slot, once.
func (g *relayGate) leaver(requester PublicKey) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.total--
			g.perPeer[requester].pending--
		})
	}
}

// relayIdle counts, at the sync server, each peer's outer connections that
// have not yet sent their first control line, by keyring name (so that a
// peer rotating its key has one share, whichever key it proved).
type relayIdle struct {
	mu      sync.Mutex
	perPeer map[string]int
}

// enter reports whether peer may hold one more such connection, max at most,
// and counts it if so.
func (r *relayIdle) enter(peer string, max int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.perPeer[peer] >= max {
		return false
	}
	if r.perPeer == nil {
		r.perPeer = make(map[string]int)
	}
	r.perPeer[peer]++
	return true
}

func (r *relayIdle) leave(peer string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.perPeer[peer]--; r.perPeer[peer] <= 0 {
		delete(r.perPeer, peer)
	}
}

// explain describes a refusal code of enter, for a log record.
func (g *relayGate) explain(refused string) string {
	switch refused {
	case "requester_share_full":
		return fmt.Sprintf("it already has %d relayed connections being set up (MaxPendingPerPeer)", g.perPeerMax)
	case "all_slots_full":
		return fmt.Sprintf("%d relayed connections are already being set up (MaxPending)", g.max)
	case "requester_rate":
		return fmt.Sprintf("it started more than %d in %v (MaxPendingPerPeer per %v)", g.perPeerMax, relaySetupWindow, relaySetupWindow)
	}
	return fmt.Sprintf("more than %d were started in %v (MaxPending per %v)", g.max, relaySetupWindow, relaySetupWindow)
}
