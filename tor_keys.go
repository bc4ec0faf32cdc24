package noisetor

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha3"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"

	torEd25519 "github.com/cretz/bine/torutil/ed25519"
)

// Tor's keys: OnionKey, whose public half is a v3 onion address, and
// ClientAuthKey, for onion client authorization.

// torBase32 is tor's base32: RFC 4648, no padding.
var torBase32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// An OnionKey is the ed25519 identity key of a v3 onion service; its public
// half is the service's address. It never prints its private part.
type OnionKey struct {
	// The secret is two pointers away, as PrivateKey's is: fmt prints a
	// value it cannot call methods on field by field, and for a bad verb
	// what a pointer field points to as well; only a pointer inside that is
	// printed as an address.
	*onionKey
}

type onionKey struct {
	expanded *[64]byte // tor's expanded secret key: clamped scalar || prefix
	pub      [32]byte
}

const onionKeyPrefix = "NOISETOR-ONION-KEY-ED25519-V3:"

// torSecretKeyHeader starts tor's hs_ed25519_secret_key file.
const torSecretKeyHeader = "== ed25519v1-secret: type0 ==\x00\x00\x00"

// GenerateOnionKey returns a new onion service key with entropy from random
// (crypto/rand if nil).
func GenerateOnionKey(random io.Reader) (*OnionKey, error) {
	if random == nil {
		random = rand.Reader
	}
	seed := make([]byte, ed25519.SeedSize)
	if _, err := io.ReadFull(random, seed); err != nil {
		return nil, fmt.Errorf("noisetor: generating onion key: %w", err)
	}
	kp := torEd25519.FromCryptoPrivateKey(ed25519.NewKeyFromSeed(seed))
	clear(seed)
	k := &OnionKey{&onionKey{expanded: new([64]byte)}}
	copy(k.expanded[:], kp.PrivateKey())
	copy(k.pub[:], kp.PublicKey())
	return k, nil
}

func newOnionKey(expanded []byte) (*OnionKey, error) {
	if len(expanded) != 64 {
		return nil, badKey("an onion service key is 64 bytes")
	}
	// A valid expanded key has a clamped scalar.
	if expanded[0]&7 != 0 || expanded[31]&0xC0 != 0x40 {
		return nil, badKey("not a valid ed25519 expanded secret key")
	}
	k := &OnionKey{&onionKey{expanded: new([64]byte)}}
	copy(k.expanded[:], expanded)
	copy(k.pub[:], torEd25519.PrivateKey(k.expanded[:]).PublicKey())
	return k, nil
}

// ServiceID returns the service's address without ".onion": 56 base32
// characters, per rend-spec-v3 §6.
func (k *OnionKey) ServiceID() string {
	raw := append(append(k.pub[:], onionChecksum(k.pub[:], onionVersion)...), onionVersion)
	return strings.ToLower(torBase32.EncodeToString(raw))
}

// Address returns the service's address, "<56 characters>.onion".
func (k *OnionKey) Address() string { return k.ServiceID() + ".onion" }

// String returns the address only, never the private key.
func (k OnionKey) String() string { return "noisetor.OnionKey(" + k.Address() + ")" }

// GoString is like String.
func (k OnionKey) GoString() string { return k.String() }

// Format prints String for every verb.
func (k OnionKey) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// MarshalPrivateText returns the key file encoding,
// "NOISETOR-ONION-KEY-ED25519-V3:<base64url of tor's 64-byte expanded key>\n".
func (k *OnionKey) MarshalPrivateText() []byte {
	return []byte(onionKeyPrefix + base64.RawURLEncoding.EncodeToString(k.expanded[:]) + "\n")
}

// ParseOnionKey parses MarshalPrivateText's encoding, or the contents of
// tor's own hs_ed25519_secret_key file (so an existing service keeps its
// address). Errors never quote the input.
func ParseOnionKey(b []byte) (*OnionKey, error) {
	if rest, ok := bytes.CutPrefix(b, []byte(torSecretKeyHeader)); ok {
		return newOnionKey(rest)
	}
	s := strings.TrimSpace(string(b))
	enc, ok := strings.CutPrefix(s, onionKeyPrefix)
	if !ok {
		return nil, badKey("onion key must start with %s (or be tor's hs_ed25519_secret_key)", onionKeyPrefix)
	}
	raw, ok := decodeKeyBase64(enc) // one text form: no CR or LF inside, zero trailing bits
	if !ok {
		return nil, badKey("onion key is not unpadded base64url")
	}
	return newOnionKey(raw)
}

// LoadOnionKey reads an onion key file. It refuses a file that group or
// others may access (ErrKeyFilePermissions).
func LoadOnionKey(path string) (*OnionKey, error) {
	return loadSecretFile(path, kindOnionKey, ParseOnionKey)
}

// SaveOnionKey writes k to a new file with mode 0600; it never overwrites.
func SaveOnionKey(path string, k *OnionKey) error {
	return writePrivateFile(path, k.MarshalPrivateText())
}

// LoadOrCreateOnionKey loads the key at path, or generates one and saves it
// there if the file does not exist; created reports which.
func LoadOrCreateOnionKey(path string) (k *OnionKey, created bool, err error) {
	k, err = LoadOnionKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return k, false, err
	}
	if k, err = GenerateOnionKey(nil); err != nil {
		return nil, false, err
	}
	if err := SaveOnionKey(path, k); err != nil {
		return nil, false, err
	}
	return k, true, nil
}

// A ClientAuthKey is a Tor v3 onion client-authorization key pair
// (x25519). The public half goes in the keyrings of the services this
// machine connects to (Peer.ClientAuth); the private half stays here and is
// registered with this machine's tor. It never prints its private part.
type ClientAuthKey struct {
	*clientAuthKey // behind a pointer, as OnionKey's secret is
}

type clientAuthKey struct {
	priv *ecdh.PrivateKey
}

const clientAuthKeyPrefix = "NOISETOR-TOR-CLIENT-AUTH-X25519:"

// GenerateClientAuthKey returns a new key pair with entropy from random
// (crypto/rand if nil).
func GenerateClientAuthKey(random io.Reader) (*ClientAuthKey, error) {
	if random == nil {
		random = rand.Reader
	}
	b := make([]byte, 32)
	defer clear(b)
	if _, err := io.ReadFull(random, b); err != nil {
		return nil, fmt.Errorf("noisetor: generating client-auth key: %w", err)
	}
	priv, err := ecdh.X25519().NewPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	return &ClientAuthKey{&clientAuthKey{priv: priv}}, nil
}

// PublicKey returns the public key as tor writes it: 52 characters of
// base32, the form of Peer.ClientAuth and of the "descriptor:x25519:" line
// of a tor authorized_clients file.
func (k *ClientAuthKey) PublicKey() string {
	return torBase32.EncodeToString(k.priv.PublicKey().Bytes())
}

// String returns the public key only.
func (k ClientAuthKey) String() string { return "noisetor.ClientAuthKey(" + k.PublicKey() + ")" }

// GoString is like String.
func (k ClientAuthKey) GoString() string { return k.String() }

// Format prints String for every verb.
func (k ClientAuthKey) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// MarshalPrivateText returns the key file encoding,
// "NOISETOR-TOR-CLIENT-AUTH-X25519:<base32 private key>\n".
func (k *ClientAuthKey) MarshalPrivateText() []byte {
	return []byte(clientAuthKeyPrefix + torBase32.EncodeToString(k.priv.Bytes()) + "\n")
}

// ParseClientAuthKey parses MarshalPrivateText's encoding, or a line of a
// tor .auth_private file ("<onion>:descriptor:x25519:<base32 private key>").
// Errors never quote the input.
func ParseClientAuthKey(b []byte) (*ClientAuthKey, error) {
	s := strings.TrimSpace(string(b))
	var enc string
	if e, ok := strings.CutPrefix(s, clientAuthKeyPrefix); ok {
		enc = e
	} else if _, e, ok := strings.Cut(s, ":descriptor:x25519:"); ok {
		enc = e
	} else {
		return nil, badKey("client-auth key must start with %s (or be a tor .auth_private line)", clientAuthKeyPrefix)
	}
	raw, err := torBase32.DecodeString(strings.ToUpper(enc))
	defer clear(raw)
	if err != nil || len(raw) != 32 {
		return nil, badKey("client-auth key is not 32 bytes of base32")
	}
	priv, err := ecdh.X25519().NewPrivateKey(raw)
	if err != nil {
		return nil, badKey("client-auth key is invalid")
	}
	return &ClientAuthKey{&clientAuthKey{priv: priv}}, nil
}

// LoadClientAuthKey reads a client-auth key file. It refuses a file that
// group or others may access (ErrKeyFilePermissions).
func LoadClientAuthKey(path string) (*ClientAuthKey, error) {
	return loadSecretFile(path, kindClientAuth, ParseClientAuthKey)
}

// SaveClientAuthKey writes k to a new file with mode 0600; it never
// overwrites.
func SaveClientAuthKey(path string, k *ClientAuthKey) error {
	return writePrivateFile(path, k.MarshalPrivateText())
}

// A v3 onion address, per rend-spec-v3 §6, is base32(PUBKEY || CHECKSUM ||
// VERSION) + ".onion", with VERSION = 3 and CHECKSUM = SHA3-256(".onion
// checksum" || PUBKEY || VERSION)[:2].
const onionVersion = 3

// onionChecksum returns the CHECKSUM of an onion address.
func onionChecksum(pub []byte, version byte) []byte {
	h := sha3.New256()
	h.Write([]byte(".onion checksum"))
	h.Write(pub)
	h.Write([]byte{version})
	return h.Sum(nil)[:2]
}

// checkOnion checks a lower-case Tor v3 onion address.
func checkOnion(host string) error {
	label := strings.TrimSuffix(host, ".onion")
	if len(label) != 56 || strings.Contains(label, ".") {
		return errors.New("an onion address must be 56 base32 characters + \".onion\" (Tor v3; v2 and subdomains are not accepted)")
	}
	raw, err := torBase32.DecodeString(strings.ToUpper(label))
	if err != nil || len(raw) != 35 {
		return errors.New("onion address is not valid base32")
	}
	pub, sum, version := raw[:32], raw[32:34], raw[34]
	if version != onionVersion {
		return fmt.Errorf("onion address has version %d, want 3", version)
	}
	if !bytes.Equal(onionChecksum(pub, version), sum) {
		return errors.New("onion address checksum is wrong (a typo?)")
	}
	return nil
}

// clientAuthPrefix starts a client-auth public key as tor writes it in an
// authorized_clients file.
const clientAuthPrefix = "descriptor:x25519:"

// parseClientAuthPublic checks a Tor v3 client-authorization public key, the
// bare key or with tor's "descriptor:x25519:" prefix, and returns it as 52
// upper-case base32 characters without prefix. Errors never quote s.
func parseClientAuthPublic(s string) (string, error) {
	if len(s) > len(clientAuthPrefix) && strings.EqualFold(s[:len(clientAuthPrefix)], clientAuthPrefix) {
		s = s[len(clientAuthPrefix):]
	}
	if strings.Contains(strings.ToLower(s), ":descriptor:") {
		// "<onion>:descriptor:x25519:<key>" is the .auth_private format,
		// whose key is the client's private key.
		return "", badKey("this looks like a Tor .auth_private line, which holds the PRIVATE client-auth key; use the public key (the descriptor:x25519:... line of the .auth file)")
	}
	if strings.Contains(s, ":") {
		return "", badKey("want descriptor:x25519:<52 base32 characters>, or the bare key")
	}
	if len(s) != 52 {
		return "", badKey("want 52 base32 characters (a 32-byte x25519 public key)")
	}
	u := strings.ToUpper(s)
	raw, err := torBase32.DecodeString(u)
	if err != nil || len(raw) != 32 || torBase32.EncodeToString(raw) != u {
		return "", badKey("not a base32-encoded 32-byte key")
	}
	if _, err := NewPublicKey(X25519, raw); err != nil {
		return "", err
	}
	return u, nil
}
