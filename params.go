package noisetor

import (
	"crypto/ecdh"
	"errors"
	"fmt"

	"github.com/flynn/noise"
)

// The protocol parameters. Each pattern, cipher suite and curve is one entry
// of its table below: its wire byte (the constant's value, in the preamble,
// WIRE.md §3.1), its names and its implementation. Adding a cipher suite is
// one constant, one entry and a WIRE.md section; everything else reads the
// tables.

// A Pattern is a Noise handshake pattern.
type Pattern uint8

const (
	// KK: both sides know each other's static key before the handshake. Two
	// messages; the default.
	KK Pattern = 1
	// XK: the initiator knows the responder's static key; the responder learns
	// the initiator's from message 3 and checks it against its keyring.
	XK Pattern = 2
)

// A CipherSuite names the AEAD of the Noise protocol. The hash is always SHA-256
// and the DH function is the static key's Curve.
type CipherSuite uint8

const (
	// ChaChaPoly is ChaCha20-Poly1305; the default. Fast everywhere.
	ChaChaPoly CipherSuite = 1
	// AESGCM is AES-256-GCM; much faster on CPUs with AES instructions.
	AESGCM CipherSuite = 2
)

// A Curve names the Diffie-Hellman function of a static key and of the Noise
// handshakes it takes part in. Both peers of a connection use the same curve.
type Curve uint8

const (
	// X25519 is the Noise "25519" DH function (RFC 7748). The default.
	X25519 Curve = 1
	// P256 is ECDH on NIST P-256, for hardware tokens without X25519. Its
	// Noise DH name "P256" is not standard: see WIRE.md. Public keys are
	// uncompressed SEC 1 points (65 bytes); DH outputs the 32-byte x-coordinate.
	P256 Curve = 2
)

var patternTable = [...]struct {
	name  string // the Noise name
	noise noise.HandshakePattern
}{
	KK: {"KK", noise.HandshakeKK},
	XK: {"XK", noise.HandshakeXK},
}

var cipherTable = [...]struct {
	name  string // the Noise name
	noise noise.CipherFunc
	// transport is the cipher suite of every connection's transport
	// CipherStates, which use only its cipher (for Rekey): shared, so that
	// no connection keeps its handshake's suite, whose DH function held the
	// handshake's keys.
	transport noise.CipherSuite
}{
	ChaChaPoly: {"ChaChaPoly", noise.CipherChaChaPoly, noise.NewCipherSuite(noise.DH25519, noise.CipherChaChaPoly, noise.HashSHA256)},
	AESGCM:     {"AESGCM", noise.CipherAESGCM, noise.NewCipherSuite(noise.DH25519, noise.CipherAESGCM, noise.HashSHA256)},
}

var curveTable = [...]struct {
	name         string // in key encodings ("x25519:...")
	noiseName    string // the Noise DH name
	ecdh         func() ecdh.Curve
	publicKeyLen int // of a raw public key on the wire
}{
	X25519: {"x25519", "25519", ecdh.X25519, 32},
	P256:   {"p256", "P256", ecdh.P256, 65},
}

// known reports whether p is one of the patterns of the table.
func (p Pattern) known() bool { return int(p) < len(patternTable) && patternTable[p].name != "" }

func (c CipherSuite) known() bool { return int(c) < len(cipherTable) && cipherTable[c].name != "" }

func (c Curve) known() bool { return int(c) < len(curveTable) && curveTable[c].name != "" }

// String returns the Noise name of the pattern, "KK" or "XK".
func (p Pattern) String() string {
	if !p.known() {
		return fmt.Sprintf("pattern(%d)", uint8(p))
	}
	return patternTable[p].name
}

// String returns the Noise name of the cipher, "ChaChaPoly" or "AESGCM".
func (c CipherSuite) String() string {
	if !c.known() {
		return fmt.Sprintf("cipher(%d)", uint8(c))
	}
	return cipherTable[c].name
}

// String returns the curve's name as used in key encodings: "x25519" or "p256".
func (c Curve) String() string {
	if !c.known() {
		return fmt.Sprintf("curve(%d)", uint8(c))
	}
	return curveTable[c].name
}

// The callers below check known() first (the preamble parser and
// Config.check do), so an unknown value is a bug and they return zero values.

func (p Pattern) noisePattern() noise.HandshakePattern {
	if !p.known() {
		return noise.HandshakePattern{}
	}
	return patternTable[p].noise
}

func (c CipherSuite) noiseCipher() noise.CipherFunc {
	if !c.known() {
		return nil
	}
	return cipherTable[c].noise
}

func (c Curve) ecdh() ecdh.Curve {
	if !c.known() {
		return nil
	}
	return curveTable[c].ecdh()
}

func (c Curve) noiseName() string {
	if !c.known() {
		return ""
	}
	return curveTable[c].noiseName
}

func (c Curve) publicKeyLen() int {
	if !c.known() {
		return 0
	}
	return curveTable[c].publicKeyLen
}

// parseCurve returns the curve of a key encoding's name.
func parseCurve(s string) (Curve, error) {
	for c, e := range curveTable {
		if e.name != "" && e.name == s {
			return Curve(c), nil
		}
	}
	// The name is not quoted: it is whatever came before the first ':' of a
	// key field, which may be a pasted secret.
	return 0, errors.New("unknown curve (want x25519 or p256)")
}
