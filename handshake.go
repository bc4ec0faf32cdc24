package noisetor

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"time"

	"github.com/flynn/noise"
)

// dhFunc is a noise.DHFunc over a StaticKey, so that the static private key
// may stay in a hardware module. flynn/noise hands the static "private key"
// only to DH, so the handshake state carries staticRef in its place: one byte
// long, it can never be mistaken for a 32-byte ephemeral scalar.
//
// Ephemeral keys are parsed once and kept: ecdh.NewPrivateKey does a scalar
// base multiplication, so re-parsing the scalar on every DH (as
// noise.DH25519 does with a current x/crypto) would double the cost.
//
// A dhFunc belongs to one handshake and is not safe for concurrent use.
type dhFunc struct {
	curve  Curve
	static StaticKey
	eph    *ecdh.PrivateKey
}

var staticRef = []byte{0}

// GenerateKeypair draws the scalar as GenerateKey does (the test vectors
// depend on it) but skips NewPublicKey's low-order probe, a full scalar
// multiplication: a public key computed from our own scalar is valid.
func (d *dhFunc) GenerateKeypair(random io.Reader) (noise.DHKey, error) {
	k, err := newScalar(d.curve, random)
	if err != nil {
		return noise.DHKey{}, err
	}
	d.eph = k
	return noise.DHKey{Private: k.Bytes(), Public: k.PublicKey().Bytes()}, nil
}

func (d *dhFunc) DH(priv, pub []byte) ([]byte, error) {
	if len(priv) == len(staticRef) {
		if d.static == nil {
			return nil, errors.New("noisetor: no static key")
		}
		// The remote key is either from the keyring (checked when added) or
		// a peer's key from the handshake; a low-order point makes DH fail.
		out, err := d.static.DH(PublicKey{curve: d.curve, raw: string(pub)})
		if err != nil && !errors.Is(err, ErrBadKey) {
			return nil, &staticKeyError{err} // our key failed (a token went away), not the peer
		}
		return out, err
	}
	k := d.eph
	if k == nil || !bytes.Equal(priv, k.Bytes()) {
		var err error
		if k, err = d.curve.ecdh().NewPrivateKey(priv); err != nil {
			return nil, err
		}
	}
	p, err := d.curve.ecdh().NewPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: peer sent an invalid %s point", ErrHandshake, d.curve)
	}
	return k.ECDH(p) // fails on an all-zero (low-order) result
}

func (d *dhFunc) DHLen() int { return d.curve.publicKeyLen() }

// staticKeyError marks a failure of this side's StaticKey, so that the
// handshake reports it instead of blaming the peer's message.
type staticKeyError struct{ err error }

func (e *staticKeyError) Error() string { return e.err.Error() }
func (e *staticKeyError) Unwrap() error { return e.err }

// readMessageErr explains why hs.ReadMessage failed on a handshake message:
// our own static key (such as a token that went away), or the message.
func readMessageErr(err error, what string) error {
	var se *staticKeyError
	if errors.As(err, &se) {
		return fmt.Errorf("%w: our static key failed: %w", ErrHandshake, se.err)
	}
	return fmt.Errorf("%w: %s", ErrHandshake, what)
}

func (d *dhFunc) DHName() string {
	if d.curve == P256 {
		return "P256"
	}
	return "25519"
}

func (c CipherSuite) noiseCipher() noise.CipherFunc {
	if c == AESGCM {
		return noise.CipherAESGCM
	}
	return noise.CipherChaChaPoly
}

func (p Pattern) noisePattern() noise.HandshakePattern {
	if p == XK {
		return noise.HandshakeXK
	}
	return noise.HandshakeKK
}

// handshakeParams is one side's view of a handshake before it starts.
type handshakeParams struct {
	initiator    bool
	pattern      Pattern
	cipher       CipherSuite
	static       StaticKey
	remoteStatic PublicKey // zero for an XK responder
	prologue     []byte
	random       io.Reader // source of the ephemeral key
}

// newHandshakeState builds the flynn/noise state for p: protocol name
// Noise_<pattern>_<25519|P256>_<ChaChaPoly|AESGCM>_SHA256.
func newHandshakeState(p handshakeParams) (*noise.HandshakeState, error) {
	curve := p.static.PublicKey().Curve()
	dh := &dhFunc{curve: curve, static: p.static}
	cfg := noise.Config{
		CipherSuite:   noise.NewCipherSuite(dh, p.cipher.noiseCipher(), noise.HashSHA256),
		Random:        p.random,
		Pattern:       p.pattern.noisePattern(),
		Initiator:     p.initiator,
		Prologue:      p.prologue,
		StaticKeypair: noise.DHKey{Private: staticRef, Public: p.static.PublicKey().Bytes()},
	}
	if !p.remoteStatic.IsZero() {
		cfg.PeerStatic = p.remoteStatic.Bytes()
	}
	return noise.NewHandshakeState(cfg)
}

// handshakeDeadline bounds ctx by the configured handshake timeout and
// applies the deadline to the underlying connection, also cancelling its I/O
// when ctx is cancelled. ctxBound reports that ctx's deadline is the earlier
// one. The returned stop restores the caller's deadlines.
func (c *Conn) handshakeDeadline(ctx context.Context) (stop func(), ctxBound bool) {
	deadline := time.Now().Add(c.cfg.handshakeTimeout())
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline, ctxBound = d, true
	}
	c.conn.SetDeadline(deadline)
	// context.AfterFunc starts no goroutine unless ctx is cancelled (none
	// at all for a context that cannot be), where a watcher goroutine per
	// handshake cost a spawn and a wake-up.
	fired := make(chan struct{})
	stopWatch := context.AfterFunc(ctx, func() {
		c.conn.SetDeadline(time.Unix(1, 0)) // unblock reads and writes now
		close(fired)
	})
	return func() {
		if !stopWatch() {
			<-fired // it ran or is running: let it finish before restoring
		}
		c.conn.SetReadDeadline(c.userReadDeadline())
		c.conn.SetWriteDeadline(c.userWriteDeadline())
	}, ctxBound
}

// clientHandshake runs the initiator side. The keyring entry is chosen by
// name before anything is sent.
func (c *Conn) clientHandshake() error {
	cfg := c.cfg
	own := cfg.StaticKey.PublicKey()
	remote := c.remoteStatic
	if remote.IsZero() {
		peer, ok := cfg.Keyring.ByName(c.state.Peer.Name)
		if !ok {
			return fmt.Errorf("%w: no peer named %q", ErrUnknownPeer, c.state.Peer.Name)
		}
		c.state.Peer = peer
		remote = peer.PublicKey
	}
	if remote.Curve() != own.Curve() {
		return fmt.Errorf("noisetor: peer %q has a %s key and ours is %s", c.state.Peer.Name, remote.Curve(), own.Curve())
	}

	pre := preamble{pattern: c.state.Pattern, curve: own.Curve(), cipher: c.state.CipherSuite}
	if _, err := io.ReadFull(cfg.rand(), pre.salt[:]); err != nil {
		return fmt.Errorf("noisetor: reading randomness: %w", err)
	}
	pre.tag = pre.computeTag(remote, own)
	rawPreamble := pre.marshal()

	hs, err := newHandshakeState(handshakeParams{
		initiator: true, pattern: pre.pattern, cipher: pre.cipher,
		static: cfg.StaticKey, remoteStatic: remote,
		prologue: prologue(rawPreamble), random: c.ephemeralSource(),
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrHandshake, err)
	}

	// -> e, es, ss (KK) or -> e, es (XK). No payload: message 1 can be replayed.
	msg1, _, _, err := hs.WriteMessage(nil, nil)
	if err != nil {
		return fmt.Errorf("%w: writing message 1: %v", ErrHandshake, err)
	}
	if _, err := c.conn.Write(appendMessage(rawPreamble, msg1)); err != nil {
		return fmt.Errorf("noisetor: sending preamble and message 1: %w", err)
	}

	// <- e, ee, se (KK) or <- e, ee (XK)
	msg2, err := readMessage(c.conn)
	if err != nil {
		return handshakeReadErr("message 2", err)
	}
	payload, cs1, cs2, err := hs.ReadMessage(nil, msg2)
	if err != nil {
		return readMessageErr(err, "message 2 did not authenticate (the responder does not hold the key we have for it, or the bytes were altered)")
	}
	if len(payload) != 0 {
		return fmt.Errorf("%w: message 2 carries a payload", ErrHandshake)
	}

	var out []byte
	if c.state.Pattern == XK {
		// -> s, se
		var msg3 []byte
		msg3, cs1, cs2, err = hs.WriteMessage(nil, nil)
		if err != nil {
			return fmt.Errorf("%w: writing message 3: %v", ErrHandshake, err)
		}
		out = appendMessage(out, msg3)
	}
	if cs1 == nil {
		return fmt.Errorf("%w: handshake did not complete", ErrHandshake)
	}
	c.state.HandshakeHash = hs.ChannelBinding()

	// The confirm record proves to the responder that we hold the ephemeral
	// key, so a replayed message 1 never yields a session (WIRE.md §6.2).
	send := newHalfState(cs1)
	out = send.seal(out, recordConfirm, nil)
	if _, err := c.conn.Write(out); err != nil {
		return fmt.Errorf("noisetor: sending confirm record: %w", err)
	}
	c.out.half, c.in.half = send, newHalfState(cs2)
	return nil
}

// serverHandshake runs the responder side. Everything up to the DH gate costs
// only HMACs, so a scanner or a stale peer is dropped before any DH.
func (c *Conn) serverHandshake(ctx context.Context) error {
	cfg := c.cfg
	own := cfg.StaticKey.PublicKey()

	rawPreamble := make([]byte, preambleLen)
	if _, err := io.ReadFull(c.conn, rawPreamble); err != nil {
		return handshakeReadErr("preamble", err)
	}
	pre, err := parsePreamble(rawPreamble)
	if err != nil {
		return err
	}
	c.state.Pattern, c.state.CipherSuite = pre.pattern, pre.cipher
	if !slices.Contains(cfg.patterns(), pre.pattern) {
		return fmt.Errorf("%w: peer asked for %v, this side accepts %v", ErrVersion, pre.pattern, cfg.patterns())
	}
	if !slices.Contains(cfg.cipherSuites(), pre.cipher) {
		return fmt.Errorf("%w: peer asked for cipher %v, this side accepts %v", ErrVersion, pre.cipher, cfg.cipherSuites())
	}
	if pre.curve != own.Curve() {
		return fmt.Errorf("%w: peer uses curve %v, our key is %v", ErrVersion, pre.curve, own.Curve())
	}

	var remote PublicKey
	tags := pre.tagger(own)
	if pre.pattern == KK {
		// One HMAC per keyring entry; no DH, no trial decryption.
		p, ok := cfg.Keyring.find(func(p Peer) bool {
			return p.PublicKey.Curve() == own.Curve() && tags.matches(pre.tag, p.PublicKey)
		})
		if ok {
			c.state.Peer, remote = p, p.PublicKey
		}
		if remote.IsZero() {
			return fmt.Errorf("%w: KK preamble matches no keyring entry: the caller is not in our keyring, or has another public key for us (ours is %v, fingerprint %s)", ErrUnknownPeer, own, own.Fingerprint())
		}
	} else if !tags.matches(pre.tag, PublicKey{}) {
		return fmt.Errorf("%w: XK preamble tag is wrong: the caller does not have our public key (ours is %v, fingerprint %s)", ErrUnknownPeer, own, own.Fingerprint())
	}
	if c.replay != nil && !c.replay.add(pre.salt) {
		return fmt.Errorf("%w: preamble salt seen before", ErrReplay)
	}
	if c.dhGate != nil {
		release, err := c.dhGate(ctx)
		if err != nil {
			return err
		}
		defer release()
	}

	hs, err := newHandshakeState(handshakeParams{
		pattern: pre.pattern, cipher: pre.cipher,
		static: cfg.StaticKey, remoteStatic: remote,
		prologue: prologue(rawPreamble), random: c.ephemeralSource(),
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrHandshake, err)
	}

	// -> e, es, ss (KK) or -> e, es (XK)
	msg1, err := readMessage(c.conn)
	if err != nil {
		return handshakeReadErr("message 1", err)
	}
	payload, _, _, err := hs.ReadMessage(nil, msg1)
	if err != nil {
		return readMessageErr(err, "message 1 did not authenticate (altered, or the caller's key for us is wrong)")
	}
	if len(payload) != 0 {
		return fmt.Errorf("%w: message 1 carries a payload", ErrHandshake)
	}

	// <- e, ee, se (KK) or <- e, ee (XK)
	msg2, cs1, cs2, err := hs.WriteMessage(nil, nil)
	if err != nil {
		return fmt.Errorf("%w: writing message 2: %v", ErrHandshake, err)
	}
	if _, err := c.conn.Write(appendMessage(nil, msg2)); err != nil {
		return fmt.Errorf("noisetor: sending message 2: %w", err)
	}

	if pre.pattern == XK {
		// -> s, se
		msg3, err := readMessage(c.conn)
		if err != nil {
			return handshakeReadErr("message 3", err)
		}
		payload, cs1, cs2, err = hs.ReadMessage(nil, msg3)
		if err != nil {
			return readMessageErr(err, "message 3 did not authenticate")
		}
		if len(payload) != 0 {
			return fmt.Errorf("%w: message 3 carries a payload", ErrHandshake)
		}
		// No NewPublicKey here: its low-order probe costs a scalar
		// multiplication, and the se DH of message 3 has already rejected an
		// invalid or low-order key. A non-canonical encoding matches no
		// keyring entry.
		remote = PublicKey{curve: own.Curve(), raw: string(hs.PeerStatic())}
		p, ok := cfg.Keyring.ByKey(remote)
		if !ok {
			return fmt.Errorf("%w: caller's key %v (fingerprint %s) is not in our keyring", ErrUnknownPeer, remote, remote.Fingerprint())
		}
		c.state.Peer = p
	}
	if cs1 == nil {
		return fmt.Errorf("%w: handshake did not complete", ErrHandshake)
	}
	c.state.HandshakeHash = hs.ChannelBinding()
	c.out.half = newHalfState(cs2)
	recv := newHalfState(cs1)

	// The first transport record must be the initiator's confirm: until it
	// arrives the caller may be replaying a captured message 1.
	frame, err := readMessage(c.conn)
	if err != nil {
		return handshakeReadErr("confirm record", err)
	}
	typ, body, err := recv.open(frame[:0], frame)
	if err != nil || typ != recordConfirm || len(body) != 0 {
		return fmt.Errorf("%w: caller did not confirm the handshake (replayed message 1?)", ErrHandshake)
	}
	c.in.half = recv
	return nil
}

// ephemeralSource yields the explicit ephemeral key of HandshakeInitiate or
// HandshakeRespond, or else Config.Random.
func (c *Conn) ephemeralSource() io.Reader {
	if c.ephemeral != nil {
		return bytes.NewReader(c.ephemeral.priv.Bytes())
	}
	return c.cfg.rand()
}

func handshakeReadErr(what string, err error) error {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: peer closed the connection before %s (%v)", ErrHandshake, what, io.ErrUnexpectedEOF)
	case isTimeout(err):
		return fmt.Errorf("noisetor: handshake timed out waiting for %s: %w", what, err)
	}
	return fmt.Errorf("noisetor: reading %s: %w", what, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
