package noisetor

import (
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"
)

// A Config configures a Client, Server, Dialer or Listener. After it has been
// passed to one of them it must not be modified. The zero value plus a
// StaticKey and a Keyring is a working configuration.
type Config struct {
	// StaticKey is this machine's long-term key. Required.
	StaticKey StaticKey

	// PreviousStaticKey is set while this machine's key is being rotated
	// (WIRE.md §11.2.6): it is the key being replaced, StaticKey the new one,
	// listed in the peers' keyrings as the old key with next=StaticKey.
	// Handshakes addressed to either key are answered, since peers address
	// this machine with the old key until the overlap ends; this machine
	// always authenticates with StaticKey. Remove it once the overlap is
	// over. It must be on the curve of StaticKey. Optional.
	PreviousStaticKey StaticKey

	// Keyring lists the peers this machine may talk to. A connection with a
	// peer whose static key is not in it fails. Required.
	Keyring *Keyring

	// Patterns lists the handshake patterns. A client uses the first; a server
	// accepts any of them. Default: [KK]. A server that accepts XK lets
	// anyone who knows its public key make it compute XK's first DH before
	// message 3 shows who is calling; with KK only, a caller without a
	// keyring key costs it no DH at all (WIRE.md §3.3).
	Patterns []Pattern

	// CipherSuites lists the AEAD ciphers. A client uses the first; a server
	// accepts any of them. Default: [ChaChaPoly].
	CipherSuites []CipherSuite

	// HandshakeTimeout bounds a whole handshake, reads and writes included,
	// when the caller's context has no earlier deadline. Default: 60s, room for
	// several round trips over Tor circuits.
	HandshakeTimeout time.Duration

	// MaxPendingHandshakes bounds the connections a Listener holds that have
	// not yet sent a valid preamble (or, for XK, message 3): anyone on the
	// network can open those. When it is reached, the oldest connection from
	// the remote address that holds the most of them is dropped, so a flood
	// from one address can only push out its own connections. Connections
	// that have proved a keyring key are never dropped for this.
	// Default: 1024.
	MaxPendingHandshakes int

	// PreambleTimeout bounds the wait for a caller's preamble, which an
	// initiator sends as soon as it has connected. Default: 15s (a Tor
	// rendezvous circuit takes one round trip before the preamble arrives).
	PreambleTimeout time.Duration

	// MaxHandshakesPerPeer bounds the handshakes one keyring peer runs at
	// once on a Listener; more of its connections wait for a turn, newest
	// first (up to 15 times as many; past that the oldest waiting one is
	// dropped), and a newer connection takes the turn of a handshake that has
	// run for 5 seconds. A peer can use up only its own share. Default: 8.
	MaxHandshakesPerPeer int

	// MaxConcurrentDH bounds the DH operations a Listener computes at once
	// (they may run on a hardware token). A slot is held only while a DH is
	// computed, never across network I/O. Default: 4 × GOMAXPROCS.
	MaxConcurrentDH int

	// AcceptBacklog bounds the connections whose handshake has completed but
	// that Accept has not returned yet. A completed handshake waits for room
	// until its HandshakeTimeout, holding its peer's turn, and is then closed.
	// Default: 64.
	AcceptBacklog int

	// RekeyAfterBytes and RekeyAfter bound how much traffic and how much time
	// one transport key protects in each direction; after either, the sender
	// rekeys (WIRE.md §6.3). Defaults: 1 GiB and 1 hour.
	RekeyAfterBytes int64
	RekeyAfter      time.Duration

	// Random is the source of ephemeral keys and preamble salts.
	// Default: crypto/rand.Reader.
	Random io.Reader

	// Time returns the current time, for the preamble's time window
	// (WIRE.md §3). Default: time.Now.
	Time func() time.Time

	// Logger receives one record per connection attempt, in and out, except
	// that a Listener counts the attempts of callers that proved no keyring
	// key and logs the counts once a minute (and at once for a reason new in
	// that minute). Default: slog.Default().
	Logger *slog.Logger

	// Derived from StaticKey and Keyring on first use.
	derivedOnce  sync.Once
	pairKeys     *pairKeys
	previousKeys *pairKeys // of PreviousStaticKey, if set
	live         *liveConns

	state peerStates // for PeerStates and Refusals; see peerstate.go
}

const (
	defaultHandshakeTimeout     = 60 * time.Second
	defaultMaxPendingHandshakes = 1024
	defaultPreambleTimeout      = 15 * time.Second
	defaultMaxHandshakesPerPeer = 8
	defaultAcceptBacklog        = 64
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

// orDefault is v, or def if v is not positive: the rule of every numeric
// Config field (and RelayServer's), whose zero value means the default.
func orDefault[T int | int64 | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

func (c *Config) handshakeTimeout() time.Duration {
	return orDefault(c.HandshakeTimeout, defaultHandshakeTimeout)
}
func (c *Config) rekeyAfterBytes() int64 { return orDefault(c.RekeyAfterBytes, defaultRekeyAfterBytes) }
func (c *Config) rekeyAfter() time.Duration {
	return orDefault(c.RekeyAfter, defaultRekeyAfter)
}
func (c *Config) preambleTimeout() time.Duration {
	return orDefault(c.PreambleTimeout, defaultPreambleTimeout)
}
func (c *Config) maxHandshakesPerPeer() int {
	return orDefault(c.MaxHandshakesPerPeer, defaultMaxHandshakesPerPeer)
}
func (c *Config) maxPendingHandshakes() int {
	return orDefault(c.MaxPendingHandshakes, defaultMaxPendingHandshakes)
}
func (c *Config) acceptBacklog() int { return orDefault(c.AcceptBacklog, defaultAcceptBacklog) }

func (c *Config) now() time.Time {
	if c.Time == nil {
		return time.Now()
	}
	return c.Time()
}

// Clone returns a copy of c with its exported fields; state derived from
// them (such as the preamble keys) is not copied. A Config in use must not be
// copied with *c, as in crypto/tls.
func (c *Config) Clone() *Config {
	if c == nil {
		return nil
	}
	return &Config{
		StaticKey:            c.StaticKey,
		PreviousStaticKey:    c.PreviousStaticKey,
		Keyring:              c.Keyring,
		Patterns:             c.Patterns,
		CipherSuites:         c.CipherSuites,
		HandshakeTimeout:     c.HandshakeTimeout,
		MaxPendingHandshakes: c.MaxPendingHandshakes,
		PreambleTimeout:      c.PreambleTimeout,
		MaxHandshakesPerPeer: c.MaxHandshakesPerPeer,
		MaxConcurrentDH:      c.MaxConcurrentDH,
		AcceptBacklog:        c.AcceptBacklog,
		RekeyAfterBytes:      c.RekeyAfterBytes,
		RekeyAfter:           c.RekeyAfter,
		Random:               c.Random,
		Time:                 c.Time,
		Logger:               c.Logger,
	}
}

func (c *Config) derive() {
	c.derivedOnce.Do(func() {
		c.pairKeys = newPairKeys(c.StaticKey)
		if c.PreviousStaticKey != nil {
			c.previousKeys = newPairKeys(c.PreviousStaticKey)
		}
		c.live = &liveConns{cfg: c}
	})
}

// keys returns the preamble keys derived from c.StaticKey, which must be set.
func (c *Config) keys() *pairKeys {
	c.derive()
	return c.pairKeys
}

// ownKeys returns the preamble keys of each of our static keys: StaticKey's,
// then PreviousStaticKey's during a rotation.
func (c *Config) ownKeys() []*pairKeys {
	c.derive()
	if c.previousKeys == nil {
		return []*pairKeys{c.pairKeys}
	}
	return []*pairKeys{c.pairKeys, c.previousKeys}
}

// liveConns returns the connections established under c.
func (c *Config) liveConns() *liveConns {
	c.derive()
	return c.live
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
	if c.PreviousStaticKey != nil {
		own, prev := c.StaticKey.PublicKey(), c.PreviousStaticKey.PublicKey()
		if prev.Curve() != own.Curve() {
			return fmt.Errorf("noisetor: Config.PreviousStaticKey is %s and StaticKey %s (a rotation keeps the curve)", prev.Curve(), own.Curve())
		}
		if prev == own {
			return fmt.Errorf("noisetor: Config.PreviousStaticKey is StaticKey")
		}
	}
	for _, p := range c.patterns() {
		if !p.known() {
			return fmt.Errorf("noisetor: unsupported pattern %v", p)
		}
	}
	for _, s := range c.cipherSuites() {
		if !s.known() {
			return fmt.Errorf("noisetor: unsupported cipher suite %v", s)
		}
	}
	return nil
}
