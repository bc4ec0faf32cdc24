package noisetor

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"testing"
)

// TestPreambleTagSpec recomputes preamble tags from the text of WIRE.md §3
// with crypto/hmac alone, and checks the vector printed there.
func TestPreambleTagSpec(t *testing.T) {
	resp, _ := NewPrivateKey(X25519, bytes.Repeat([]byte{0x01}, 32))
	init, _ := NewPrivateKey(X25519, bytes.Repeat([]byte{0x02}, 32))
	for _, tc := range []struct {
		pattern Pattern
		want    string // WIRE.md §3, "Vectors"
	}{
		{KK, preambleVectorKK},
		{XK, preambleVectorXK},
	} {
		pre := preamble{pattern: tc.pattern, curve: X25519, cipher: ChaChaPoly}
		for i := range pre.salt {
			pre.salt[i] = byte(i)
		}
		pre.tag = pre.computeTag(resp.PublicKey(), init.PublicKey())
		raw := pre.marshal()

		// The spec, word for word.
		k := sha256.Sum256(append([]byte("noisetor preamble v1\x00"), resp.PublicKey().Bytes()...))
		m := hmac.New(sha256.New, k[:])
		m.Write(raw[:24])
		if tc.pattern == KK {
			m.Write(init.PublicKey().Bytes())
		}
		if want := m.Sum(nil)[:16]; !bytes.Equal(raw[24:], want) {
			t.Errorf("%v: tag %x, spec says %x", tc.pattern, raw[24:], want)
		}
		if got := hex.EncodeToString(raw); got != tc.want {
			t.Errorf("%v: preamble\n got %s\nwant %s (WIRE.md §3)", tc.pattern, got, tc.want)
		}
		if !pre.tagMatches(resp.PublicKey(), init.PublicKey()) {
			t.Errorf("%v: tagMatches rejects its own tag", tc.pattern)
		}
	}
}

const (
	preambleVectorKK = "4e544f5201010101000102030405060708090a0b0c0d0e0f2ec5caff2f0e8c6e3d31bdd331313130"
	preambleVectorXK = "4e544f5201020101000102030405060708090a0b0c0d0e0f353c0c925cdf5239e336b3e74024ed17"
)
