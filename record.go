package noisetor

import (
	"bytes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"math"
	"time"

	"github.com/flynn/noise"
)

// The record layer of one direction: sealing and opening transport frames
// with the session's AEAD and nonce counter, and the rekey rule (WIRE.md §6).

// halfState is the cipher state of one direction. After the handshake it
// drives the AEAD itself with its own nonce counter, so that sealing and
// opening a frame allocate nothing (noise.CipherState builds each nonce on
// the heap); the CipherState stays for Rekey, which Noise defines on it.
type halfState struct {
	cs        *noise.CipherState
	c         noise.Cipher
	aead      cipher.AEAD // c's AEAD, or nil if c does not expose it
	nonceLE   bool        // ChaChaPoly's nonce encoding (AESGCM's is big-endian)
	n         uint64      // next nonce
	nonce     [12]byte
	bytes     int64 // ciphertext bytes sent since the last rekey (the sender decides)
	rekeyedAt time.Time
}

// newHalfState returns the state of one direction with cipher suite, key k
// and next nonce n: a CipherState of its own, on the suite's shared
// transport cipher suite, never the one Split returns (see cipherTable).
func newHalfState(suite CipherSuite, k [32]byte, n uint64) *halfState {
	cs := noise.UnsafeNewCipherState(cipherTable[suite].transport, k, n)
	h := &halfState{cs: cs, n: n, rekeyedAt: time.Now()}
	h.setCipher()
	return h
}

// setCipher takes the current key's Cipher from cs. The Noise ciphers are
// AEADs that differ only in how they encode the nonce (Noise §12.3, §12.4),
// so one seal at nonce 1 tells the encoding, and seal and open then call the
// AEAD directly.
func (h *halfState) setCipher() {
	h.c = h.cs.Cipher()
	h.aead = nil
	a, ok := h.c.(cipher.AEAD)
	if !ok || a.NonceSize() != len(h.nonce) || a.Overhead() != aeadOverhead {
		return
	}
	want := h.c.Encrypt(nil, 1, nil, nil)
	var le, be [12]byte
	le[4], be[11] = 1, 1
	switch {
	case bytes.Equal(a.Seal(nil, le[:], nil, nil), want):
		h.aead, h.nonceLE = a, true
	case bytes.Equal(a.Seal(nil, be[:], nil, nil), want):
		h.aead, h.nonceLE = a, false
	}
}

// nextNonce returns the nonce for the next frame and advances the counter.
func (h *halfState) nextNonce() (uint64, []byte) {
	n := h.n
	// n reaches 2^64-1, which Noise reserves, only after 2^64-1 frames: no
	// connection can send that many (centuries at a billion frames a
	// second), but a nonce must never repeat.
	if n == math.MaxUint64 {
		panic("noisetor: nonce space exhausted")
	}
	h.n++
	if h.nonceLE {
		binary.LittleEndian.PutUint64(h.nonce[4:], n)
	} else {
		binary.BigEndian.PutUint64(h.nonce[4:], n)
	}
	return n, h.nonce[:]
}

// seal appends one frame: length, then the AEAD of typ || body, sealed in place.
func (h *halfState) seal(out []byte, typ byte, body []byte) []byte {
	start := len(out)
	out = append(out, 0, 0, typ)
	out = append(out, body...)
	n, nonce := h.nextNonce()
	pt := out[start+frameHeader:]
	if h.aead != nil {
		out = h.aead.Seal(out[:start+frameHeader], nonce, pt, nil)
	} else {
		out = h.c.Encrypt(out[:start+frameHeader], n, nil, pt)
	}
	size := len(out) - start - frameHeader
	binary.BigEndian.PutUint16(out[start:], uint16(size))
	h.bytes += int64(size)
	return out
}

// open authenticates and decrypts a frame in place.
func (h *halfState) open(dst, frame []byte) (typ byte, body []byte, err error) {
	n, nonce := h.nextNonce()
	var pt []byte
	if h.aead != nil {
		pt, err = h.aead.Open(dst, nonce, frame, nil)
	} else {
		pt, err = h.c.Decrypt(dst, n, nil, frame)
	}
	if err != nil || len(pt) == 0 {
		h.n-- // nothing was accepted; the connection is failing anyway
		return 0, nil, fmt.Errorf("%w: frame failed to authenticate", ErrFrame)
	}
	return pt[0], pt[1:], nil
}

// rekey replaces the key as Noise §11.3 specifies: k = ENCRYPT(k, 2^64-1, "", zeros)[:32].
func (h *halfState) rekey() {
	h.cs.Rekey()
	h.setCipher()
	h.bytes = 0
	h.rekeyedAt = time.Now()
}

// maybeRekey appends a rekey record and switches keys when the current key
// has protected enough bytes or time (WIRE.md §6.3).
func (c *Conn) maybeRekey(out []byte) []byte {
	h := c.out.half
	if h.bytes < c.cfg.rekeyAfterBytes() && time.Since(h.rekeyedAt) < c.cfg.rekeyAfter() {
		return out
	}
	out = h.seal(out, recordRekey, nil)
	h.rekey()
	return out
}
