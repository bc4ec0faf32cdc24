package noisetor

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// pairKeys holds what a Config derives from its StaticKey and each keyring
// peer for the preamble (WIRE.md §3): the pair keys of both directions, the
// index from KK hint to peer for the windows currently accepted, the XK tag
// key and the replay cache. Every connection, listener and dialer that uses
// the Config shares it, so a replay sent to a second listener of the same
// key is caught too, and a hardware token performs the static-static DH once
// per peer, not once per handshake.
type pairKeys struct {
	static         StaticKey
	own            PublicKey
	ownFingerprint string // for refusals: computing it per refusal would double their cost
	xkKey          []byte
	replay         *replayCache

	mu    sync.Mutex
	pairs map[PublicKey]*pairSecrets // by the peer's static key
	index hintIndex
}

// pairSecrets are what one pair derives from its static keys: the two
// directions' preamble keys, and ss itself, which KK handshakes reuse.
//
// Keeping ss is a decision, not an accident. Its DH is computed here anyway,
// and a KK handshake with the same pair computes the same bytes again (two
// of a handshake's ten scalar multiplications, or two of its four token
// operations with a hardware key). Whoever reads ss out of memory can forge
// the pair's preambles, as the preamble key derived from it allows, and
// also its message 1 (whose payload is empty): we then send message 2 and
// wait for a confirm record that never comes, which holds a handshake open
// no longer than a preamble with nothing after it, and is refused as a
// replay would be. It yields no session, since es and se each need a static
// private key, and no traffic, which also needs ee. It is never written
// anywhere and never changes after it is derived (handshakes read it without
// the lock, which is also why it is not wiped when the peer leaves the
// keyring, as K never was).
type pairSecrets struct {
	peer         PublicKey
	ss           []byte       // DH(our static key, peer): KK's ss token
	toPeer, toUs *pairKey     // we initiate; the peer initiates
	replay       *replayCache // the salts of the peer's preambles
}

// hintIndex maps the KK hints of the accepted windows to their pairs. It is
// rebuilt when the keyring changes and extended when the window moves.
type hintIndex struct {
	ring    *Keyring
	gen     uint64
	windows map[uint64]map[[preambleHint]byte][]*pairSecrets
}

func newPairKeys(static StaticKey) *pairKeys {
	own := static.PublicKey()
	return &pairKeys{
		static:         static,
		own:            own,
		ownFingerprint: own.Fingerprint(),
		xkKey:          xkTagKey(own),
		replay:         newReplayCache(replayCacheSize, false),
		pairs:          make(map[PublicKey]*pairSecrets),
	}
}

// secretsLocked returns the pair keys with peer, deriving them with one DH
// on first use. k.mu must be held.
func (k *pairKeys) secretsLocked(peer PublicKey) (*pairSecrets, error) {
	if s, ok := k.pairs[peer]; ok {
		return s, nil
	}
	if peer.Curve() != k.own.Curve() {
		return nil, fmt.Errorf("noisetor: peer key is %s and ours is %s", peer.Curve(), k.own.Curve())
	}
	// -> ss, once per pair.
	ss, err := k.static.DH(peer)
	if err != nil {
		if errors.Is(err, ErrBadKey) {
			return nil, err
		}
		return nil, &staticKeyError{err}
	}
	if allZero(ss) {
		return nil, fmt.Errorf("%w: DH with a peer key gave the all-zero output", ErrBadKey)
	}
	s := &pairSecrets{peer: peer, ss: ss, replay: newReplayCache(peerReplayCacheSize, true)}
	if s.toPeer, err = derivePairKey(ss, k.own, peer); err == nil {
		s.toUs, err = derivePairKey(ss, peer, k.own)
	}
	if err != nil {
		clear(ss)
		return nil, err
	}
	k.pairs[peer] = s
	return s, nil
}

// secrets returns the pair's secrets with peer, deriving them on first use.
func (k *pairKeys) secrets(peer PublicKey) (*pairSecrets, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.secretsLocked(peer)
}

// findKK returns the keyring peer whose pair key produced the hint and tag of
// the KK preamble raw (48 bytes), sent at a time within one window of now,
// its secrets and the window of its hint; nil secrets if there is none. It costs a map lookup per
// accepted window and one HMAC per candidate (one, barring a 64-bit
// collision), whatever the size of the keyring, and never a DH once the index
// is built.
func (k *pairKeys) findKK(ring *Keyring, pre *preamble, raw []byte, now time.Time) (Peer, *pairSecrets, uint64, error) {
	w := preambleWindowOf(now)
	k.mu.Lock()
	if err := k.indexLocked(ring, w); err != nil {
		k.mu.Unlock()
		return Peer{}, nil, 0, err
	}
	var match *pairSecrets
	var window uint64
	for _, win := range [3]uint64{w, w - 1, w + 1} {
		for _, s := range k.index.windows[win][pre.hint] {
			if tagEqual(s.toUs.tag(raw[:32]), pre.tag) {
				match, window = s, win
			}
		}
	}
	k.mu.Unlock()
	if match == nil {
		return Peer{}, nil, 0, nil
	}
	// The keyring has the last word: a peer removed since the index was
	// built is not accepted, nor a key whose rotation overlap has ended (the
	// index holds both keys of a rotating peer).
	p, ok := ring.ByKey(match.peer)
	if !ok || !p.accepts(match.peer, now) {
		return Peer{}, nil, 0, nil
	}
	return p, match, window, nil
}

// indexLocked brings the hint index up to date for ring and window w: the
// windows w-1, w and w+1, for every peer on our curve. k.mu must be held.
func (k *pairKeys) indexLocked(ring *Keyring, w uint64) error {
	gen := ring.generation()
	if k.index.ring != ring || k.index.gen != gen || k.index.windows == nil {
		// Until every peer's keys are derived there is no index: a token
		// failure part way leaves none, and the next preamble tries again.
		k.index = hintIndex{}
		live := make(map[PublicKey]bool)
		for _, p := range ring.Peers() {
			if p.PublicKey.Curve() != k.own.Curve() {
				continue
			}
			for _, key := range []PublicKey{p.PublicKey, p.NextKey} {
				if key.IsZero() {
					continue
				}
				if _, err := k.secretsLocked(key); err != nil {
					var se *staticKeyError
					if errors.As(err, &se) {
						return err // our key failed: no index is better than a partial one
					}
					continue // a peer key our DH refuses can never handshake anyway
				}
				live[key] = true
			}
		}
		for pub := range k.pairs {
			if !live[pub] {
				delete(k.pairs, pub) // removed from the keyring: forget its keys
			}
		}
		k.index = hintIndex{ring: ring, gen: gen, windows: make(map[uint64]map[[preambleHint]byte][]*pairSecrets)}
	}
	for win := range k.index.windows {
		if win+1 < w || win > w+1 {
			delete(k.index.windows, win)
		}
	}
	for _, win := range [3]uint64{w - 1, w, w + 1} {
		if _, ok := k.index.windows[win]; ok {
			continue
		}
		m := make(map[[preambleHint]byte][]*pairSecrets, len(k.pairs))
		for _, s := range k.pairs {
			h := s.toUs.hint(win)
			m[h] = append(m[h], s)
		}
		k.index.windows[win] = m
	}
	return nil
}

func allZero(b []byte) bool {
	var acc byte
	for _, x := range b {
		acc |= x
	}
	return acc == 0
}
