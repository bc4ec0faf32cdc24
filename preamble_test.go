package noisetor

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"testing"
)

// TestX25519SmallOrder checks every entry of the small-order list against a
// real DH (all-zero output for any scalar), and that random points pass.
func TestX25519SmallOrder(t *testing.T) {
	scalar, _ := ecdh.X25519().GenerateKey(rand.Reader)
	for i, u := range x25519SmallOrder {
		for _, top := range []byte{0, 0x80} {
			raw := u
			raw[31] |= top
			if err := checkPeerPoint(X25519, raw[:]); !errors.Is(err, errInvalidPeerPoint) {
				t.Errorf("entry %d (top bit %x): checkPeerPoint = %v", i, top, err)
			}
			p, err := ecdh.X25519().NewPublicKey(raw[:])
			if err != nil {
				t.Fatal(err)
			}
			if _, err := scalar.ECDH(p); err == nil {
				t.Errorf("entry %d (top bit %x) is not of small order: DH succeeded", i, top)
			}
		}
	}
	for range 100 {
		k, _ := ecdh.X25519().GenerateKey(rand.Reader)
		if err := checkPeerPoint(X25519, k.PublicKey().Bytes()); err != nil {
			t.Fatalf("random point refused: %v", err)
		}
	}
	bad := bytes.Repeat([]byte{0x04}, 65)
	if err := checkPeerPoint(P256, bad); !errors.Is(err, errInvalidPeerPoint) {
		t.Errorf("off-curve P-256 point: %v", err)
	}
}
