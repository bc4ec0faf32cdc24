package noisetor

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Wire constants. WIRE.md is the specification; keep the two in step.
const (
	wireVersion = 1

	preambleLen  = 40
	preambleSalt = 16
	preambleTag  = 16

	// maxMessage is the Noise limit on any message, handshake or transport.
	maxMessage   = 65535
	frameHeader  = 2
	aeadOverhead = 16
	// maxPayload is the most application data one transport frame carries:
	// the Noise limit less the AEAD tag and the record type byte.
	maxPayload = maxMessage - aeadOverhead - 1
)

var preambleMagic = [4]byte{'N', 'T', 'O', 'R'}

// Transport record types, the first plaintext byte of every transport frame.
const (
	recordData    = 0
	recordConfirm = 1
	recordRekey   = 2
	recordClose   = 3
)

// Errors a handshake can fail with. Match them with errors.Is; the returned
// error says more.
var (
	// ErrUnknownPeer: the remote static key (or, for a KK preamble, the
	// initiator's key) is not in the keyring, or the initiator does not know
	// our public key.
	ErrUnknownPeer = errors.New("noisetor: peer not in keyring")
	// ErrVersion: the peer speaks another wire version or asked for a pattern,
	// curve or cipher this side does not accept.
	ErrVersion = errors.New("noisetor: unsupported protocol version or parameters")
	// ErrReplay: a preamble seen before was sent again.
	ErrReplay = errors.New("noisetor: replayed handshake")
	// ErrHandshake: a handshake message failed to decrypt or was malformed.
	ErrHandshake = errors.New("noisetor: handshake failed")
	// ErrFrame: a transport frame failed to authenticate or was malformed. The
	// connection is unusable afterwards.
	ErrFrame = errors.New("noisetor: bad frame")
)

// A preamble is the cleartext header an initiator sends before Noise message 1
// (WIRE.md §3). Its tag lets a responder pick the initiator's keyring
// entry with one HMAC per entry and no DH, and proves that the sender knows
// the responder's public key, so scanners are dropped before any DH.
type preamble struct {
	pattern Pattern
	curve   Curve
	cipher  CipherSuite
	salt    [preambleSalt]byte
	tag     [preambleTag]byte
}

func (p *preamble) marshal() []byte {
	b := make([]byte, preambleLen)
	copy(b, preambleMagic[:])
	b[4] = wireVersion
	b[5] = byte(p.pattern)
	b[6] = byte(p.curve)
	b[7] = byte(p.cipher)
	copy(b[8:24], p.salt[:])
	copy(b[24:40], p.tag[:])
	return b
}

// parsePreamble parses the 40 bytes and checks the fields that need no key.
func parsePreamble(b []byte) (*preamble, error) {
	if len(b) != preambleLen {
		return nil, fmt.Errorf("%w: preamble is %d bytes, want %d", ErrHandshake, len(b), preambleLen)
	}
	if [4]byte(b[:4]) != preambleMagic {
		return nil, fmt.Errorf("%w: not a noisetor preamble (bad magic)", ErrVersion)
	}
	if b[4] != wireVersion {
		return nil, fmt.Errorf("%w: peer speaks wire version %d, this side %d", ErrVersion, b[4], wireVersion)
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
	copy(p.tag[:], b[24:40])
	return p, nil
}

// A tagger computes the tags of one preamble for one responder key: the
// first 16 bytes of HMAC-SHA256(SHA256("noisetor preamble v1" || 0x00 ||
// responder key), preamble[0:24] || initiator key), the initiator key being
// empty for XK. The HMAC key and the header are the same for every keyring
// entry a KK responder tries, so they are prepared once.
type tagger struct {
	pattern Pattern
	header  []byte
	mac     hash.Hash
	sum     []byte
}

func (p *preamble) tagger(responder PublicKey) *tagger {
	k := sha256.New()
	k.Write([]byte("noisetor preamble v1\x00"))
	k.Write([]byte(responder.raw))
	return &tagger{pattern: p.pattern, header: p.marshal()[:24], mac: hmac.New(sha256.New, k.Sum(nil))}
}

func (t *tagger) tag(initiator PublicKey) [preambleTag]byte {
	t.mac.Reset()
	t.mac.Write(t.header)
	if t.pattern == KK {
		t.mac.Write([]byte(initiator.raw))
	}
	t.sum = t.mac.Sum(t.sum[:0])
	return [preambleTag]byte(t.sum[:preambleTag])
}

// matches compares in constant time.
func (t *tagger) matches(tag [preambleTag]byte, initiator PublicKey) bool {
	want := t.tag(initiator)
	return subtle.ConstantTimeCompare(want[:], tag[:]) == 1
}

// computeTag returns the tag of p for one responder and initiator key.
func (p *preamble) computeTag(responder, initiator PublicKey) [preambleTag]byte {
	return p.tagger(responder).tag(initiator)
}

// tagMatches reports whether p carries the tag for these keys.
func (p *preamble) tagMatches(responder, initiator PublicKey) bool {
	return p.tagger(responder).matches(p.tag, initiator)
}

// prologue binds the whole preamble into the Noise handshake, so that a
// tampered preamble fails the handshake even where its tag still matched.
func prologue(rawPreamble []byte) []byte {
	return append([]byte("noisetor v1\x00"), rawPreamble...)
}

// readMessage reads one length-prefixed message (handshake or transport frame)
// into a new buffer. It is used only during the handshake; transport reads go
// through the resumable reader in conn.go.
func readMessage(r io.Reader) ([]byte, error) {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 {
		return nil, fmt.Errorf("%w: empty message", ErrHandshake)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// appendMessage appends msg with its length prefix.
func appendMessage(out, msg []byte) []byte {
	out = binary.BigEndian.AppendUint16(out, uint16(len(msg)))
	return append(out, msg...)
}
