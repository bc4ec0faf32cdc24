package noisetor

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"
)

// The preamble is the cleartext header an initiator sends before Noise
// message 1 (WIRE.md §3). For KK it is keyed by a secret only the two peers
// of a pair can compute, so that a responder can, before any DH:
//   - find the initiator's keyring entry with one map lookup (the hint),
//     whatever the size of the keyring;
//   - verify that the sender holds the initiator's static private key or the
//     responder's (the tag), so that nobody else, including every party that
//     knows all the public keys, gets a DH, a DH slot or a per-peer budget.
const (
	preambleLen  = 48
	preambleSalt = 16
	preambleHint = 8
	preambleTag  = 16

	// preambleWindow is the time window of the KK hint. A responder accepts
	// the hints of the window before and after its own, so any clock skew up
	// to one window is tolerated. Within a window a passive observer can
	// link the connections of one pair; across windows it cannot.
	preambleWindow = 10 * time.Minute

	pairKeySalt   = "noisetor pair v2"
	pairKeyInfo   = "noisetor preamble key v2\x00"
	xkTagKeyLabel = "noisetor preamble v2 xk\x00"
	prologueLabel = "noisetor v2\x00"
)

var preambleMagic = [4]byte{'N', 'T', 'O', 'R'}

type preamble struct {
	pattern Pattern
	curve   Curve
	cipher  CipherSuite
	salt    [preambleSalt]byte
	hint    [preambleHint]byte // zero for XK
	tag     [preambleTag]byte
}

// marshal returns the 48 bytes of p, tag included.
func (p *preamble) marshal() []byte {
	b := make([]byte, preambleLen)
	copy(b, preambleMagic[:])
	b[4] = wireVersion
	b[5] = byte(p.pattern)
	b[6] = byte(p.curve)
	b[7] = byte(p.cipher)
	copy(b[8:24], p.salt[:])
	copy(b[24:32], p.hint[:])
	copy(b[32:48], p.tag[:])
	return b
}

// parsePreamble parses the 48 bytes and checks the fields that need no key.
func parsePreamble(b []byte) (*preamble, error) {
	if len(b) != preambleLen {
		return nil, fmt.Errorf("%w: preamble is %d bytes, want %d", ErrHandshake, len(b), preambleLen)
	}
	if err := checkPreambleHead(b[:5]); err != nil {
		return nil, err
	}
	p := &preamble{pattern: Pattern(b[5]), curve: Curve(b[6]), cipher: CipherSuite(b[7])}
	if !p.pattern.known() {
		return nil, fmt.Errorf("%w: unknown pattern %d", ErrVersion, b[5])
	}
	if !p.curve.known() {
		return nil, fmt.Errorf("%w: unknown curve %d", ErrVersion, b[6])
	}
	if !p.cipher.known() {
		return nil, fmt.Errorf("%w: unknown cipher %d", ErrVersion, b[7])
	}
	copy(p.salt[:], b[8:24])
	copy(p.hint[:], b[24:32])
	copy(p.tag[:], b[32:48])
	if p.pattern == XK && p.hint != ([preambleHint]byte{}) {
		return nil, fmt.Errorf("%w: XK preamble with a non-zero hint", ErrHandshake)
	}
	return p, nil
}

// checkPreambleHead checks the magic and the version, the first 5 bytes.
func checkPreambleHead(b []byte) error {
	if [4]byte(b[:4]) != preambleMagic {
		return fmt.Errorf("%w: not a noisetor preamble (bad magic)", ErrVersion)
	}
	if b[4] != wireVersion {
		return fmt.Errorf("%w: peer speaks wire version %d, this side %d (upgrade both sides to the same release)", ErrVersion, b[4], wireVersion)
	}
	return nil
}

// A pairKey is the preamble MAC key of one direction of one pair:
//
//	K = HKDF-SHA256(IKM = DH(s_i, s_r), salt = "noisetor pair v2",
//	                info = "noisetor preamble key v2" || 0x00 || s_i || s_r)
//
// It needs the static-static DH, so only the initiator and the responder can
// compute it. (The DH output is kept too, for the handshake's ss token: see
// pairSecrets.)
type pairKey [32]byte

func derivePairKey(ss []byte, initiator, responder PublicKey) (*pairKey, error) {
	info := pairKeyInfo + initiator.raw + responder.raw
	k, err := hkdf.Key(sha256.New, ss, []byte(pairKeySalt), info, len(pairKey{}))
	if err != nil {
		return nil, err
	}
	return (*pairKey)(k), nil
}

// preambleWindowOf returns the number of the hint window that holds t.
func preambleWindowOf(t time.Time) uint64 {
	return uint64(t.Unix()) / uint64(preambleWindow/time.Second)
}

// hint is HMAC(K, "hint" || u64(window))[:8]: it names the pair to the
// responder for one window without naming either key.
func (k *pairKey) hint(window uint64) [preambleHint]byte {
	m := hmac.New(sha256.New, k[:])
	m.Write([]byte("hint"))
	m.Write(binary.BigEndian.AppendUint64(nil, window))
	return [preambleHint]byte(m.Sum(nil))
}

// tag is HMAC(K, "tag" || preamble[0:32])[:16].
func (k *pairKey) tag(head []byte) [preambleTag]byte {
	m := hmac.New(sha256.New, k[:])
	m.Write([]byte("tag"))
	m.Write(head)
	return [preambleTag]byte(m.Sum(nil))
}

// xkTagKey is SHA256("noisetor preamble v2 xk" || 0x00 || rs): XK cannot know
// its caller before message 3, so its tag proves only that the caller knows
// the responder's public key.
func xkTagKey(responder PublicKey) []byte {
	k := sha256.Sum256([]byte(xkTagKeyLabel + responder.raw))
	return k[:]
}

func xkTag(key, head []byte) [preambleTag]byte {
	m := hmac.New(sha256.New, key)
	m.Write(head)
	return [preambleTag]byte(m.Sum(nil))
}

// sealKK fills in the hint and tag of a KK preamble sent at time now.
func (p *preamble) sealKK(k *pairKey, now time.Time) []byte {
	p.hint = k.hint(preambleWindowOf(now))
	b := p.marshal()
	p.tag = k.tag(b[:32])
	copy(b[32:], p.tag[:])
	return b
}

// sealXK fills in the tag of an XK preamble.
func (p *preamble) sealXK(responder PublicKey) []byte {
	p.hint = [preambleHint]byte{}
	b := p.marshal()
	p.tag = xkTag(xkTagKey(responder), b[:32])
	copy(b[32:], p.tag[:])
	return b
}

// tagEqual compares in constant time.
func tagEqual(a, b [preambleTag]byte) bool {
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// prologue binds the whole preamble into the Noise handshake, so that a
// tampered preamble fails the handshake even where its tag still matched.
func prologue(rawPreamble []byte) []byte {
	return append([]byte(prologueLabel), rawPreamble...)
}

// Replay caches remember the salts of accepted preambles, so that an exact
// replay is dropped before any DH (WIRE.md §3.3).
//
// A KK peer's salts are kept apart from every other peer's, so that no
// member can flush them, and each is kept for as long as its hint window is
// accepted (after that the replay fails the hint check anyway). A peer whose
// cache is full of salts still in force has its new preambles refused: a peer
// can only hurt itself, at 8192 handshakes within 30 minutes (4.5 a second).
// XK callers, unauthenticated, share one cache of the last 65536 salts;
// an older XK replay costs one DH and still yields no session (§6.2).
//
// Salts do not survive a restart: for the 10 to 20 minutes of hint windows
// after one, a recorded KK preamble can be replayed once more, at the cost
// of its handshake's DH; its handshake turn is taken by the peer's next
// connection (admission.go).
const (
	replayCacheSize     = 1 << 16
	peerReplayCacheSize = 1 << 13
)

var errReplayCacheFull = errors.New("noisetor: this peer has made more handshakes in the last three preamble windows than its replay cache holds")

// replayCache remembers recent preamble salts in arrival order. It grows to
// its size as salts arrive.
type replayCache struct {
	mu       sync.Mutex
	max      int
	windowed bool // KK: entries expire with their window; full means refuse
	seen     map[[preambleSalt]byte]struct{}
	queue    []saltEntry // oldest first, from head
	head     int
}

type saltEntry struct {
	salt   [preambleSalt]byte
	window uint64
}

func newReplayCache(size int, windowed bool) *replayCache {
	return &replayCache{max: size, windowed: windowed, seen: make(map[[preambleSalt]byte]struct{})}
}

// add remembers salt, sent in window w, if it is new. It fails with
// ErrReplay for a salt seen before and errReplayCacheFull for a full KK
// cache. now is the current window (KK only).
func (r *replayCache) add(salt [preambleSalt]byte, w, now uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.seen[salt]; ok {
		return fmt.Errorf("%w: preamble salt seen before", ErrReplay)
	}
	for r.windowed && r.head < len(r.queue) && r.queue[r.head].window+1 < now {
		r.pop() // its window is no longer accepted
	}
	if len(r.queue)-r.head >= r.max {
		if r.windowed {
			return errReplayCacheFull
		}
		r.pop()
	}
	r.queue = append(r.queue, saltEntry{salt, w})
	r.seen[salt] = struct{}{}
	return nil
}

func (r *replayCache) pop() {
	delete(r.seen, r.queue[r.head].salt)
	r.head++
	if r.head > len(r.queue)/2 {
		r.queue = append(r.queue[:0], r.queue[r.head:]...)
		r.head = 0
	}
}
