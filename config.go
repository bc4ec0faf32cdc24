package noisetor

import (
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"time"
)

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

// String returns the Noise name of the pattern, "KK" or "XK".
func (p Pattern) String() string {
	switch p {
	case KK:
		return "KK"
	case XK:
		return "XK"
	}
	return fmt.Sprintf("pattern(%d)", uint8(p))
}

// A CipherSuite names the AEAD of the Noise protocol. The hash is always SHA-256
// and the DH function is the static key's Curve.
type CipherSuite uint8

const (
	// ChaChaPoly is ChaCha20-Poly1305; the default. Fast everywhere.
	ChaChaPoly CipherSuite = 1
	// AESGCM is AES-256-GCM; much faster on CPUs with AES instructions.
	AESGCM CipherSuite = 2
)

// String returns the Noise name of the cipher, "ChaChaPoly" or "AESGCM".
func (c CipherSuite) String() string {
	switch c {
	case ChaChaPoly:
		return "ChaChaPoly"
	case AESGCM:
		return "AESGCM"
	}
	return fmt.Sprintf("cipher(%d)", uint8(c))
}

// A Config configures a Client, Server, Dialer or Listener. After it has been
// passed to one of them it must not be modified. The zero value plus a
// StaticKey and a Keyring is a working configuration.
type Config struct {
	// StaticKey is this machine's long-term key. Required.
	StaticKey StaticKey

	// Keyring lists the peers this machine may talk to. A connection with a
	// peer whose static key is not in it fails. Required.
	Keyring *Keyring

	// Patterns lists the handshake patterns. A client uses the first; a server
	// accepts any of them. Default: [KK].
	Patterns []Pattern

	// CipherSuites lists the AEAD ciphers. A client uses the first; a server
	// accepts any of them. Default: [ChaChaPoly].
	CipherSuites []CipherSuite

	// HandshakeTimeout bounds a whole handshake, reads and writes included,
	// when the caller's context has no earlier deadline. Default: 60s, room for
	// several round trips over Tor circuits.
	HandshakeTimeout time.Duration

	// MaxPendingHandshakes bounds the connections a Listener holds before their
	// handshake completes. When it is reached the oldest pending connection is
	// dropped, so that stalled connections cannot lock out real peers.
	// Default: 1024.
	MaxPendingHandshakes int

	// MaxConcurrentDH bounds the handshakes a Listener runs past the preamble
	// check at once, that is, the DH operations in flight (they may run on a
	// hardware token). Default: 4 × GOMAXPROCS.
	MaxConcurrentDH int

	// RekeyAfterBytes and RekeyAfter bound how much traffic and how much time
	// one transport key protects in each direction; after either, the sender
	// rekeys (WIRE.md §6.3). Defaults: 1 GiB and 1 hour.
	RekeyAfterBytes int64
	RekeyAfter      time.Duration

	// Random is the source of ephemeral keys and preamble salts.
	// Default: crypto/rand.Reader.
	Random io.Reader

	// Logger receives one record per connection attempt, in and out.
	// Default: slog.Default().
	Logger *slog.Logger
}

const (
	defaultHandshakeTimeout     = 60 * time.Second
	defaultMaxPendingHandshakes = 1024
	defaultRekeyAfterBytes      = 1 << 30
	defaultRekeyAfter           = time.Hour
)

func (c *Config) patterns() []Pattern {
	if len(c.Patterns) == 0 {
		return []Pattern{KK}
	}
	return c.Patterns
}

func (c *Config) cipherSuites() []CipherSuite {
	if len(c.CipherSuites) == 0 {
		return []CipherSuite{ChaChaPoly}
	}
	return c.CipherSuites
}

func (c *Config) handshakeTimeout() time.Duration {
	if c.HandshakeTimeout <= 0 {
		return defaultHandshakeTimeout
	}
	return c.HandshakeTimeout
}

func (c *Config) rekeyAfterBytes() int64 {
	if c.RekeyAfterBytes <= 0 {
		return defaultRekeyAfterBytes
	}
	return c.RekeyAfterBytes
}

func (c *Config) rekeyAfter() time.Duration {
	if c.RekeyAfter <= 0 {
		return defaultRekeyAfter
	}
	return c.RekeyAfter
}

func (c *Config) rand() io.Reader {
	if c.Random == nil {
		return rand.Reader
	}
	return c.Random
}

func (c *Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.Default()
	}
	return c.Logger
}

// check reports a configuration that cannot work.
func (c *Config) check() error {
	if c == nil {
		return fmt.Errorf("noisetor: nil Config")
	}
	if c.StaticKey == nil {
		return fmt.Errorf("noisetor: Config.StaticKey is not set")
	}
	if c.Keyring == nil {
		return fmt.Errorf("noisetor: Config.Keyring is not set")
	}
	for _, p := range c.patterns() {
		if p != KK && p != XK {
			return fmt.Errorf("noisetor: unsupported pattern %v", p)
		}
	}
	for _, s := range c.cipherSuites() {
		if s != ChaChaPoly && s != AESGCM {
			return fmt.Errorf("noisetor: unsupported cipher suite %v", s)
		}
	}
	return nil
}
