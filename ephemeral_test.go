package noisetor

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"
)

// RFC 7748 §6.1: both key pairs and the shared secret.
func TestX25519EphemeralRFC7748(t *testing.T) {
	h := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	alice := h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	alicePub := h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
	bob := h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
	bobPub := h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
	shared := h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
	if got := x25519Base(alice); !bytes.Equal(got, alicePub) {
		t.Errorf("alice's public key %x", got)
	}
	if got := x25519Base(bob); !bytes.Equal(got, bobPub) {
		t.Errorf("bob's public key %x", got)
	}
	for _, dh := range [][2][]byte{{alice, bobPub}, {bob, alicePub}} {
		if got, err := x25519DH(dh[0], dh[1]); err != nil || !bytes.Equal(got, shared) {
			t.Errorf("shared secret %x, %v", got, err)
		}
	}
	// The base point through the ladder agrees with the fixed-base path.
	base := make([]byte, 32)
	base[0] = 9
	if got, _ := x25519DH(alice, base); !bytes.Equal(got, alicePub) {
		t.Errorf("ladder on the base point: %x", got)
	}
}

// Against crypto/ecdh, for random scalars, random points (with the top bit
// set too, which X25519 ignores) and the low-order points.
func TestX25519EphemeralMatchesECDH(t *testing.T) {
	curve := ecdh.X25519()
	for i := range 300 {
		scalar, pub, err := newX25519Ephemeral(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := curve.NewPrivateKey(scalar)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pub, ref.PublicKey().Bytes()) {
			t.Fatalf("public key of %d differs from crypto/ecdh's", i)
		}
		point := make([]byte, 32)
		rand.Read(point)
		if i%2 == 0 {
			point[31] |= 0x80
		}
		p, err := curve.NewPublicKey(point)
		if err != nil {
			t.Fatal(err)
		}
		want, werr := ref.ECDH(p)
		got, gerr := x25519DH(scalar, point)
		if !bytes.Equal(got, want) || (werr == nil) != (gerr == nil) {
			t.Fatalf("DH %d: %x, %v; crypto/ecdh: %x, %v", i, got, gerr, want, werr)
		}
	}
	scalar, _, _ := newX25519Ephemeral(rand.Reader)
	for _, low := range []string{
		"0000000000000000000000000000000000000000000000000000000000000000",
		"0100000000000000000000000000000000000000000000000000000000000000",
		"e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
		"5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
		"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	} {
		point, _ := hex.DecodeString(low)
		if out, err := x25519DH(scalar, point); !errors.Is(err, errX25519LowOrder) {
			t.Errorf("low-order point %s: %x, %v", low, out, err)
		}
	}
}

// The ephemeral scalar is the first 32 bytes of the random source, as
// newScalar draws it: transcripts from a fixed source do not change.
func TestX25519EphemeralDrawsLikeNewScalar(t *testing.T) {
	src := bytes.Repeat([]byte{7, 1, 9}, 30)
	scalar, pub, err := newX25519Ephemeral(bytes.NewReader(src))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := newScalar(X25519, bytes.NewReader(src))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(scalar, ref.Bytes()) || !bytes.Equal(pub, ref.PublicKey().Bytes()) {
		t.Fatal("newX25519Ephemeral draws differently from newScalar")
	}
	if _, _, err := newX25519Ephemeral(bytes.NewReader(src[:31])); err == nil {
		t.Fatal("a short random source gave a key")
	}
}

// BenchmarkEphemeral compares the cost of an X25519 ephemeral key pair:
// "ladder" is crypto/ecdh's (as newScalar makes it), "fixed-base" this
// file's.
func BenchmarkEphemeral(b *testing.B) {
	b.Run("ladder", func(b *testing.B) {
		for b.Loop() {
			if _, err := newScalar(X25519, rand.Reader); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("fixed-base", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := newX25519Ephemeral(rand.Reader); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("dh-ecdh", func(b *testing.B) {
		k, _ := newScalar(X25519, rand.Reader)
		p := k.PublicKey()
		for b.Loop() {
			k.ECDH(p)
		}
	})
	b.Run("dh-ladder", func(b *testing.B) {
		s, p, _ := newX25519Ephemeral(rand.Reader)
		for b.Loop() {
			x25519DH(s, p)
		}
	})
}
