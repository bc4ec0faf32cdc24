package noisetor

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"
)

// ErrBadKey is matched (with errors.Is) by every error about a malformed,
// low-order or wrong-kind key.
var ErrBadKey = errors.New("noisetor: bad key")

func badKey(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadKey, fmt.Sprintf(format, args...))
}

// A PublicKey is a static public key. The zero value is no key. PublicKeys are
// comparable with == and usable as map keys.
type PublicKey struct {
	curve Curve
	raw   string // wire encoding; a string so that the type is comparable
}

// NewPublicKey checks raw as a public key on curve c. It rejects points that
// are not on the curve and, for X25519, points of low order (whose DH output
// is all zero, which would let a peer force a known shared secret).
func NewPublicKey(c Curve, raw []byte) (PublicKey, error) {
	ec := c.ecdh()
	if ec == nil {
		return PublicKey{}, badKey("unknown curve %d", c)
	}
	if len(raw) != c.publicKeyLen() {
		return PublicKey{}, badKey("%s public key is %d bytes, want %d", c, len(raw), c.publicKeyLen())
	}
	pub, err := ec.NewPublicKey(raw)
	if err != nil {
		return PublicKey{}, badKey("%s public key is not a valid point", c)
	}
	if c == X25519 {
		// Every clamped scalar is a multiple of 8, so any point of order
		// dividing 8 gives the all-zero output, which ECDH reports as an error.
		if _, err := lowOrderProbe.ECDH(pub); err != nil {
			return PublicKey{}, badKey("x25519 public key is a low-order point")
		}
		// A point has several 32-byte encodings (the top bit is ignored, and
		// u+p encodes u for u < 19). Only the canonical one is accepted, so
		// that one key has one PublicKey value and a keyring cannot hold the
		// same key twice under two names.
		if !canonicalX25519(raw) {
			return PublicKey{}, badKey("x25519 public key is not canonically encoded")
		}
	}
	return PublicKey{curve: c, raw: string(raw)}, nil
}

// canonicalX25519 reports whether the little-endian u is below 2^255-19.
func canonicalX25519(u []byte) bool {
	if u[31]&0x80 != 0 {
		return false
	}
	if u[31] != 0x7f || u[0] < 0xed {
		return true
	}
	for _, b := range u[1:31] {
		if b != 0xff {
			return true
		}
	}
	return false
}

var lowOrderProbe = func() *ecdh.PrivateKey {
	k, err := ecdh.X25519().NewPrivateKey(bytes.Repeat([]byte{0x5a}, 32))
	if err != nil {
		panic(err)
	}
	return k
}()

// ParsePublicKey parses the text form written by PublicKey.String, such as
// "x25519:Qh0W...". It refuses a private key with an error that says so.
func ParsePublicKey(s string) (PublicKey, error) {
	if strings.HasPrefix(strings.ToUpper(s), privateKeyPrefix) {
		return PublicKey{}, badKey("this is a private key, not a public key; never share it")
	}
	name, enc, ok := strings.Cut(s, ":")
	if !ok {
		return PublicKey{}, badKey("public key must look like x25519:<base64url>")
	}
	c, err := parseCurve(name)
	if err != nil {
		return PublicKey{}, badKey("%v", err)
	}
	raw, ok := decodeKeyBase64(enc)
	if !ok {
		return PublicKey{}, badKey("public key is not unpadded base64url")
	}
	return NewPublicKey(c, raw)
}

// decodeKeyBase64 decodes unpadded base64url (RFC 4648 §5) with nothing else
// in it. encoding/base64 skips CR and LF anywhere in its input, even in Strict
// mode; a key text must have exactly one accepted form (WIRE.md §11.1), so
// every byte is checked against the alphabet first. Strict mode then rejects
// a last character with unused bits set.
func decodeKeyBase64(s string) ([]byte, bool) {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 'A' || c > 'Z') && (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '_' {
			return nil, false
		}
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(s)
	return b, err == nil
}

// Curve returns the key's curve, or 0 for the zero PublicKey.
func (k PublicKey) Curve() Curve { return k.curve }

// Bytes returns the key's wire encoding (32 bytes for X25519, 65 for P-256).
func (k PublicKey) Bytes() []byte { return []byte(k.raw) }

// IsZero reports whether k is the zero PublicKey.
func (k PublicKey) IsZero() bool { return k.curve == 0 }

// String returns the text form, "<curve>:<unpadded base64url of Bytes>".
func (k PublicKey) String() string {
	if k.IsZero() {
		return "<none>"
	}
	return k.curve.String() + ":" + base64.RawURLEncoding.EncodeToString([]byte(k.raw))
}

// MarshalText implements encoding.TextMarshaler.
func (k PublicKey) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *PublicKey) UnmarshalText(b []byte) error {
	p, err := ParsePublicKey(string(b))
	if err != nil {
		return err
	}
	*k = p
	return nil
}

// Fingerprint returns a short digest of the key for people to compare by
// reading it aloud: six groups of five decimal digits ("04711 ..."), about 99
// bits. The format is specified in WIRE.md.
func (k PublicKey) Fingerprint() string {
	return fingerprint("noisetor key fingerprint v1", []byte(k.String()))
}

// fingerprint hashes domain and data with SHA-256 and renders the first 30
// bytes as six groups of five digits (each group is a 40-bit big-endian
// integer modulo 100000), as Signal's safety numbers do.
func fingerprint(domain string, data []byte) string {
	h := sha256.New()
	h.Write([]byte(domain))
	h.Write([]byte{0})
	h.Write(data)
	sum := h.Sum(nil)
	groups := make([]string, 6)
	for i := range groups {
		var b [8]byte
		copy(b[3:], sum[i*5:i*5+5])
		groups[i] = fmt.Sprintf("%05d", binary.BigEndian.Uint64(b[:])%100000)
	}
	return strings.Join(groups, " ")
}

// A StaticKey is a long-term key that takes part in handshakes: its public
// half, and Diffie-Hellman with a peer's public key. The private half may live
// in a hardware module and never enter this process (see PKCS11Key).
//
// DH must be safe for concurrent use: a listener runs many handshakes at once.
type StaticKey interface {
	PublicKey() PublicKey
	// DH returns the shared secret with peer, which is on the same curve.
	DH(peer PublicKey) ([]byte, error)
}

const privateKeyPrefix = "NOISETOR-PRIVATE-KEY-"

// A PrivateKey is a software StaticKey. Its String, GoString, Format and
// LogValue methods never print the private scalar.
type PrivateKey struct {
	// The scalar is two pointers away. fmt prints a value that it cannot
	// call methods on (a PrivateKey in an unexported field of another
	// struct) field by field, and for a verb such as %s it prints what a
	// pointer field points to as well; only a pointer inside that is
	// printed as an address.
	*privateKey
}

type privateKey struct {
	priv *ecdh.PrivateKey
	pub  PublicKey
}

// GenerateKey makes a new software static key on curve c with randomness
// from rand (crypto/rand when nil).
func GenerateKey(c Curve, random io.Reader) (*PrivateKey, error) {
	if random == nil {
		random = rand.Reader
	}
	priv, err := newScalar(c, random)
	if err != nil {
		return nil, err
	}
	return NewPrivateKey(c, priv.Bytes())
}

// newScalar draws a private scalar for c from random: 32 bytes at a time,
// drawn again while out of range (P-256 only). ecdh.GenerateKey ignores
// custom readers since Go 1.26; reading the scalar ourselves keeps a
// deterministic reader deterministic, as the test vectors need.
func newScalar(c Curve, random io.Reader) (*ecdh.PrivateKey, error) {
	ec := c.ecdh()
	if ec == nil {
		return nil, badKey("unknown curve %d", c)
	}
	b := make([]byte, 32)
	for {
		if _, err := io.ReadFull(random, b); err != nil {
			return nil, fmt.Errorf("noisetor: reading randomness: %w", err)
		}
		k, err := ec.NewPrivateKey(b)
		if err == nil {
			return k, nil
		}
		if c == X25519 { // every 32-byte string is a valid X25519 scalar
			return nil, badKey("invalid x25519 scalar")
		}
	}
}

// NewPrivateKey makes a software static key from a raw scalar (32 bytes).
func NewPrivateKey(c Curve, scalar []byte) (*PrivateKey, error) {
	ec := c.ecdh()
	if ec == nil {
		return nil, badKey("unknown curve %d", c)
	}
	priv, err := ec.NewPrivateKey(scalar)
	if err != nil {
		return nil, badKey("invalid %s private key", c)
	}
	pub, err := NewPublicKey(c, priv.PublicKey().Bytes())
	if err != nil {
		return nil, err
	}
	return &PrivateKey{&privateKey{priv: priv, pub: pub}}, nil
}

// PublicKey returns the public half.
func (k *PrivateKey) PublicKey() PublicKey { return k.pub }

// DH implements StaticKey.
func (k *PrivateKey) DH(peer PublicKey) ([]byte, error) {
	if peer.curve != k.pub.curve {
		return nil, badKey("peer key is %s, own key is %s", peer.curve, k.pub.curve)
	}
	pub, err := k.priv.Curve().NewPublicKey(peer.Bytes())
	if err != nil {
		return nil, badKey("peer key is not a valid point")
	}
	out, err := k.priv.ECDH(pub)
	if err != nil {
		return nil, badKey("DH with peer key failed (low-order point)")
	}
	return out, nil
}

// String describes the key by its public half only.
//
// String, GoString and Format have value receivers so that a dereferenced
// key is covered too: for fmt.Sprintf("%s", *k), fmt would otherwise print
// the inner *ecdh.PrivateKey, scalar included, after "%!s(".
func (k PrivateKey) String() string {
	if k.privateKey == nil {
		return "noisetor.PrivateKey(<none>)"
	}
	return "noisetor.PrivateKey(" + k.pub.String() + ")"
}

// GoString is like String, so %#v cannot leak the scalar either.
func (k PrivateKey) GoString() string { return k.String() }

// Format prints String for every verb, so no fmt verb reveals the scalar.
func (k PrivateKey) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// LogValue implements slog.LogValuer: log/slog shows String.
func (k PrivateKey) LogValue() slog.Value { return slog.StringValue(k.String()) }

// MarshalPrivateText returns the private key file encoding,
// "NOISETOR-PRIVATE-KEY-X25519:<base64url>\n". It is named so that nobody calls
// it by accident where a public encoding is wanted.
func (k *PrivateKey) MarshalPrivateText() []byte {
	return []byte(privateKeyPrefix + strings.ToUpper(k.pub.curve.String()) + ":" +
		base64.RawURLEncoding.EncodeToString(k.priv.Bytes()) + "\n")
}

// ParsePrivateKey parses the encoding of MarshalPrivateText. Errors never
// quote the input, which may be a secret.
func ParsePrivateKey(text []byte) (*PrivateKey, error) {
	s := strings.TrimSpace(string(text))
	if !strings.HasPrefix(s, privateKeyPrefix) {
		if _, err := ParsePublicKey(s); err == nil {
			return nil, badKey("this is a public key; a private key file starts with %s", privateKeyPrefix)
		}
		return nil, badKey("private key must start with %s", privateKeyPrefix)
	}
	name, enc, ok := strings.Cut(s[len(privateKeyPrefix):], ":")
	if !ok {
		return nil, badKey("private key has no ':' after the curve name")
	}
	c, err := parseCurve(strings.ToLower(name))
	if err != nil {
		return nil, badKey("%v", err)
	}
	scalar, ok := decodeKeyBase64(enc)
	if !ok || len(scalar) != 32 {
		return nil, badKey("private key is not 32 bytes of unpadded base64url")
	}
	return NewPrivateKey(c, scalar)
}

// ErrKeyFilePermissions is matched (with errors.Is) by every error about a
// secret file (a private key, PIN or Tor key file) that others may read or
// replace: its mode lets group or others access it, it is owned by another
// user, it is not a regular file, or a directory above it is not safe (see
// LoadPrivateKey). These errors match ErrUnsafeFile too.
var ErrKeyFilePermissions = errors.New("noisetor: secret file is not private")

// LoadPrivateKey reads a private key file written by SavePrivateKey. Like ssh,
// it refuses a file that group or others may read or write, so a key that has
// been exposed is not used silently; and one that someone else could have
// put there: the file must be a regular file owned by this process's user (or
// root), and every directory above it owned by this user or root and not
// writable by group or others (a sticky directory such as /tmp is accepted
// when the entry in it is this user's). A symbolic link on the way must be
// this user's or root's. The error says which check failed and the fix; it
// matches ErrKeyFilePermissions and ErrUnsafeFile.
func LoadPrivateKey(path string) (*PrivateKey, error) {
	return loadSecretFile(path, kindPrivateKey, ParsePrivateKey)
}

// loadSecretFile reads the secret file at path after the checks of
// LoadPrivateKey, parses it with parse and clears the bytes it read. kind
// is what the file should hold: a file of another kind gets an error that
// says what it is (ErrWrongFile) rather than advice for the wrong kind of
// file; any other parse error names the file.
func loadSecretFile[T any](path, kind string, parse func([]byte) (T, error)) (T, error) {
	var zero T
	text, err := readPrivateFile(path)
	if err != nil {
		if other := sniffPublicFile(path); other != "" && errors.Is(err, ErrKeyFilePermissions) {
			return zero, wrongFile(path, other, kind)
		}
		return zero, err
	}
	defer clear(text)
	k, err := parse(text)
	if err != nil {
		if other := secretFileKind(text); other != "" && other != kind {
			return zero, wrongFile(path, other, kind)
		}
		if other := publicFileKind(text); other == kindKeyring {
			return zero, wrongFile(path, other, kind)
		}
		return zero, &contextError{path, err}
	}
	return k, nil
}

// SavePrivateKey writes k to a new file at path with mode 0600. It refuses to
// overwrite an existing file, so a key is never lost by accident.
func SavePrivateKey(path string, k *PrivateKey) error {
	return writePrivateFile(path, k.MarshalPrivateText())
}

// readPrivateFile reads a small secret file after the checks of
// LoadPrivateKey (openChecked).
func readPrivateFile(path string) ([]byte, error) {
	f, err := openChecked(path, secretFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("noisetor: reading %s: %w", path, err)
	}
	return b, nil
}

// writePrivateFile creates path with mode 0600 and writes b; it refuses to
// overwrite an existing file.
func writePrivateFile(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("noisetor: %s already exists; refusing to overwrite a key", path)
		}
		return fmt.Errorf("noisetor: %w", err)
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("noisetor: writing %s: %w", path, err)
	}
	return nil
}
