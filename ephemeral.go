package noisetor

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"io"

	"filippo.io/edwards25519"
	"filippo.io/edwards25519/field"
)

// X25519 ephemeral keys without crypto/ecdh's generic ladder for the public
// key. crypto/ecdh computes an X25519 public key with the same Montgomery
// ladder as a DH, for any point; a fixed-base multiplication on the
// birationally equivalent Edwards curve, with its precomputed tables, costs
// about a third of that, and the Montgomery u-coordinate follows from the
// Edwards y-coordinate as u = (1+y)/(1-y) (RFC 7748 §4.1). An ephemeral key
// is used for two DHs and thrown away, so its public key is a third of its
// cost: one of the ten scalar multiplications of a KK handshake per side.
//
// crypto/ecdh cannot take a scalar without computing its public key the slow
// way (NewPrivateKey does it eagerly), so the DHs of such a key use
// x25519DH, the RFC 7748 ladder, here as well.

// newX25519Ephemeral draws an X25519 ephemeral scalar from random exactly as
// newScalar does, 32 bytes read once (every 32-byte string is a valid X25519
// scalar), so that transcripts from a fixed random source are unchanged, and
// returns it with its public key.
func newX25519Ephemeral(random io.Reader) (scalar, public []byte, err error) {
	scalar = make([]byte, 32)
	if _, err := io.ReadFull(random, scalar); err != nil {
		return nil, nil, fmt.Errorf("noisetor: reading randomness: %w", err)
	}
	return scalar, x25519Base(scalar), nil
}

// x25519Base returns X25519(scalar, 9), the public key of a 32-byte scalar.
func x25519Base(scalar []byte) []byte {
	// Clamping as X25519 does; the scalar is then reduced modulo the group
	// order, which leaves the multiple of the base point (of that order)
	// unchanged. A clamped scalar is never a multiple of the order (it is a
	// multiple of 8 in [2^254, 2^255), and the order is an odd prime just
	// above 2^252), so the point is never the identity, whose u would be 0.
	s, err := new(edwards25519.Scalar).SetBytesWithClamping(scalar)
	if err != nil {
		panic("noisetor: x25519 scalar is not 32 bytes")
	}
	return new(edwards25519.Point).ScalarBaseMult(s).BytesMontgomery()
}

var errX25519LowOrder = errors.New("noisetor: x25519 DH with a low-order point")

// x25519DH returns X25519(scalar, point) as RFC 7748 §5 defines it, in
// constant time, and an error if the result is all zeros (the point is of
// low order), as crypto/ecdh's ECDH does. It is crypto/ecdh's ladder
// (x25519ScalarMult) over filippo.io/edwards25519's field, the same code.
func x25519DH(scalar, point []byte) ([]byte, error) {
	if len(scalar) != 32 || len(point) != 32 {
		return nil, errors.New("noisetor: x25519 scalar or point is not 32 bytes")
	}
	var e [32]byte
	copy(e[:], scalar)
	e[0] &= 248
	e[31] &= 127
	e[31] |= 64

	var x1, x2, z2, x3, z3, tmp0, tmp1 field.Element
	x1.SetBytes(point) // ignores the top bit, as RFC 7748 requires
	x2.One()
	x3.Set(&x1)
	z3.One()

	swap := 0
	for pos := 254; pos >= 0; pos-- {
		b := int(e[pos/8]>>uint(pos&7)) & 1
		swap ^= b
		x2.Swap(&x3, swap)
		z2.Swap(&z3, swap)
		swap = b

		tmp0.Subtract(&x3, &z3)
		tmp1.Subtract(&x2, &z2)
		x2.Add(&x2, &z2)
		z2.Add(&x3, &z3)
		z3.Multiply(&tmp0, &x2)
		z2.Multiply(&z2, &tmp1)
		tmp0.Square(&tmp1)
		tmp1.Square(&x2)
		x3.Add(&z3, &z2)
		z2.Subtract(&z3, &z2)
		x2.Multiply(&tmp1, &tmp0)
		tmp1.Subtract(&tmp1, &tmp0)
		z2.Square(&z2)

		z3.Mult32(&tmp1, 121666)
		x3.Square(&x3)
		tmp0.Add(&tmp0, &z3)
		z3.Multiply(&x1, &z2)
		z2.Multiply(&tmp1, &tmp0)
	}
	x2.Swap(&x3, swap)
	z2.Swap(&z3, swap)

	z2.Invert(&z2)
	x2.Multiply(&x2, &z2)
	out := x2.Bytes()
	if subtle.ConstantTimeCompare(out, make([]byte, 32)) == 1 {
		return nil, errX25519LowOrder
	}
	return out, nil
}
