package noisetor

import (
	"slices"
	"strings"
	"sync"
	"time"
)

// A PeerState is what a Config has seen of one keyring peer since the
// Config was first used: its live connections, and its handshakes, in and
// out, counted and the last of each outcome kept. Config.PeerStates returns
// them.
//
// A caller that proved no keyring key is attributed to no peer, since it
// could claim to be anyone: a Listener or Server counts it in
// Config.Refusals instead.
type PeerState struct {
	// Name is the peer's name in the keyring.
	Name string

	// InKeyring reports that the peer is in the Config's Keyring now. A
	// peer removed from it keeps what was recorded while it was in it.
	InKeyring bool

	// Connections is the number of connections with the peer that
	// completed their handshake under the Config and are not closed yet,
	// in both directions. A connection that a Listener holds for Accept
	// counts.
	Connections int

	// Handshakes counts the attempts by direction and outcome.
	Handshakes HandshakeCounts

	// LastHandshake is the last handshake that completed, and LastFailure
	// the last attempt that failed (dialing included; Err says why). The
	// Time of either is zero if there has been none.
	LastHandshake HandshakeAttempt
	LastFailure   HandshakeAttempt
}

// HandshakeCounts counts the handshakes with one peer, by direction (in:
// the peer called this machine; out: this machine called it) and outcome.
type HandshakeCounts struct {
	InboundOK, InboundFailed   uint64
	OutboundOK, OutboundFailed uint64
}

// A HandshakeAttempt describes one handshake attempt, as its log record
// does.
type HandshakeAttempt struct {
	Time        time.Time // when it ended
	Outbound    bool      // this machine called the peer
	Addr        string    // the remote address
	Pattern     Pattern
	CipherSuite CipherSuite
	Duration    time.Duration // from the start of the dial or handshake
	Err         error         // why it failed; nil for a completed handshake
}

// PeerStates returns the state of every peer in c's Keyring, in name
// order, then that of peers that have left it, in name order. It may be
// called at any time, concurrently with connections using c; a Clone of c
// starts with no state.
func (c *Config) PeerStates() []PeerState {
	var keyring []Peer
	if c.Keyring != nil {
		keyring = c.Keyring.Peers()
	}
	conns := c.connsByPeer()
	s := &c.state
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]PeerState, 0, len(keyring))
	listed := make(map[string]bool, len(keyring))
	add := func(name string, inKeyring bool) {
		st := PeerState{Name: name, InKeyring: inKeyring, Connections: conns[name]}
		if r := s.peers[name]; r != nil {
			st.Handshakes, st.LastHandshake, st.LastFailure = r.counts, r.last, r.lastFailure
		}
		out = append(out, st)
		listed[name] = true
	}
	for _, p := range keyring {
		add(p.Name, true)
	}
	var gone []string
	for name := range s.peers {
		if !listed[name] {
			gone = append(gone, name)
		}
	}
	for name := range conns {
		if !listed[name] && !slices.Contains(gone, name) {
			gone = append(gone, name)
		}
	}
	slices.SortFunc(gone, strings.Compare)
	for _, name := range gone {
		add(name, false)
	}
	return out
}

// Refusals returns how many callers a Listener or Server using c refused
// before they proved a keyring key, by reason: the few fixed words of the
// Listener's aggregate log record ("preamble did not verify", "no
// preamble", ...). The counts only grow; it returns a new map.
func (c *Config) Refusals() map[string]uint64 {
	s := &c.state
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]uint64, len(s.refused))
	for reason, n := range s.refused {
		out[reason] = n
	}
	return out
}

// connsByPeer counts the live connections of c by peer name.
func (c *Config) connsByPeer() map[string]int {
	if c.StaticKey == nil {
		return nil // never used: no connection can exist
	}
	l := c.liveConns()
	l.mu.Lock()
	defer l.mu.Unlock()
	n := make(map[string]int)
	for conn := range l.conns {
		n[conn.state.Peer.Name]++ // set before track, never changed after
	}
	return n
}

// peerStates is what a Config records for PeerStates and Refusals. The zero
// value is ready. Recording costs one lock and a map lookup per attempt;
// only a peer's first attempt allocates.
type peerStates struct {
	mu      sync.Mutex
	peers   map[string]*peerRecord
	refused map[string]uint64
}

type peerRecord struct {
	counts            HandshakeCounts
	last, lastFailure HandshakeAttempt
}

// record records an attempt with a named peer. Only names in the keyring get
// an entry, so the map is bounded by the names the keyring has had.
func (s *peerStates) record(kr *Keyring, a attempt) {
	if a.peer == "" {
		return
	}
	h := HandshakeAttempt{Time: time.Now(), Outbound: a.outbound, Addr: a.addr,
		Pattern: a.pattern, CipherSuite: a.cipher, Duration: a.duration, Err: a.err}
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.peers[a.peer]
	if r == nil {
		if _, ok := kr.ByName(a.peer); !ok {
			return
		}
		if s.peers == nil {
			s.peers = make(map[string]*peerRecord)
		}
		r = new(peerRecord)
		s.peers[a.peer] = r
	}
	switch {
	case a.err == nil && a.outbound:
		r.counts.OutboundOK++
	case a.err == nil:
		r.counts.InboundOK++
	case a.outbound:
		r.counts.OutboundFailed++
	default:
		r.counts.InboundFailed++
	}
	if a.err == nil {
		r.last = h
	} else {
		r.lastFailure = h
	}
}

// refuse counts a caller refused before it proved a keyring key. The
// reasons are a few fixed words, so the map stays small.
func (s *peerStates) refuse(reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refused == nil {
		s.refused = make(map[string]uint64)
	}
	s.refused[reason]++
}
