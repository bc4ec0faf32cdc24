package noisetor

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
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
	if p.pattern != KK && p.pattern != XK {
		return nil, fmt.Errorf("%w: unknown pattern %d", ErrVersion, b[5])
	}
	if p.curve != X25519 && p.curve != P256 {
		return nil, fmt.Errorf("%w: unknown curve %d", ErrVersion, b[6])
	}
	if p.cipher != ChaChaPoly && p.cipher != AESGCM {
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
// compute it. Only K is kept, never the DH output: K cannot be turned back
// into the ss input of the Noise handshake.
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

// Replay caches bound the preamble salts remembered. An exact replay within
// that many handshakes is dropped before any DH; an older one costs one
// handshake's DH and still yields no session (WIRE.md §6.2). A KK preamble
// replayed after its hint window has passed fails the hint check, so a KK
// peer's cache, which only that peer's own preambles can fill, needs to cover
// only three windows: 4096 salts in 30 minutes. XK callers share one.
const (
	replayCacheSize     = 1 << 16
	peerReplayCacheSize = 1 << 12
)

// replayCache remembers recent preamble salts, evicting the oldest. It grows
// to its size as salts arrive.
type replayCache struct {
	mu    sync.Mutex
	max   int
	seen  map[[preambleSalt]byte]struct{}
	order [][preambleSalt]byte // ring
	next  int
}

func newReplayCache(size int) *replayCache {
	return &replayCache{max: size, seen: make(map[[preambleSalt]byte]struct{})}
}

// add reports whether salt is new, and remembers it.
func (r *replayCache) add(salt [preambleSalt]byte) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.seen[salt]; ok {
		return false
	}
	if len(r.order) < r.max {
		r.order = append(r.order, salt)
	} else {
		delete(r.seen, r.order[r.next])
		r.order[r.next] = salt
		r.next = (r.next + 1) % len(r.order)
	}
	r.seen[salt] = struct{}{}
	return true
}
