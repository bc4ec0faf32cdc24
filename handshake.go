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
	"syscall"

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
	// remote and ss: the peer's static key and DH(static, remote), when
	// known before the handshake (KK), so that its ss token costs no DH.
	remote []byte
	ss     []byte
	// gate takes one of the Listener's DH slots for the length of one DH;
	// nil outside a Listener.
	gate func() (release func(), err error)
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
	if len(priv) == len(staticRef) && d.ss != nil && bytes.Equal(pub, d.remote) {
		return bytes.Clone(d.ss), nil // -> ss
	}
	if d.gate != nil {
		release, err := d.gate()
		if err != nil {
			return nil, &dhSlotError{err}
		}
		defer release()
	}
	if len(priv) == len(staticRef) {
		if d.static == nil {
			return nil, errors.New("noisetor: no static key")
		}
		// The peer's point is checked here, before it reaches a StaticKey
		// that may be a token or another key store that does not check it:
		// a low-order point would give a known shared secret.
		if err := checkPeerPoint(d.curve, pub); err != nil {
			return nil, err
		}
		out, err := d.static.DH(PublicKey{curve: d.curve, raw: string(pub)})
		if err != nil && !errors.Is(err, ErrBadKey) {
			return nil, &staticKeyError{err} // our key failed (a token went away), not the peer
		}
		if err == nil && allZero(out) {
			return nil, errInvalidPeerPoint
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
		return nil, errInvalidPeerPoint
	}
	out, err := k.ECDH(p)
	if err != nil {
		return nil, errInvalidPeerPoint // an all-zero (low-order) result
	}
	return out, nil
}

func (d *dhFunc) DHLen() int { return d.curve.publicKeyLen() }

// errInvalidPeerPoint: the peer sent a key that is not a point of the curve
// or is of low order.
var errInvalidPeerPoint = fmt.Errorf("%w: the peer sent an invalid public key (off the curve, or of low order)", ErrHandshake)

// checkPeerPoint rejects a peer's point without a scalar multiplication: for
// P-256 an off-curve point, for X25519 the points of small order (their DH
// output is the same for every scalar), in every 32-byte encoding.
func checkPeerPoint(c Curve, raw []byte) error {
	if len(raw) != c.publicKeyLen() {
		return errInvalidPeerPoint
	}
	if c == X25519 {
		var u [32]byte
		copy(u[:], raw)
		u[31] &= 0x7f // X25519 ignores the top bit
		for _, bad := range x25519SmallOrder {
			if u == bad {
				return errInvalidPeerPoint
			}
		}
		return nil
	}
	if _, err := c.ecdh().NewPublicKey(raw); err != nil {
		return errInvalidPeerPoint
	}
	return nil
}

// x25519SmallOrder lists the u-coordinates of the points of order 1, 2, 4
// and 8, with the non-canonical encodings p and p+1 of 0 and 1 (the list of
// libsodium's crypto_scalarmult_curve25519; TestX25519SmallOrder checks each
// against a DH).
var x25519SmallOrder = [][32]byte{
	{},     // 0
	{0x01}, // 1
	{0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
		0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00},
	{0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef, 0x5b,
		0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f, 0x11, 0x57},
	{0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, // p-1
	{0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, // p
	{0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, // p+1
}

// staticKeyError marks a failure of this side's StaticKey, so that the
// handshake reports it instead of blaming the peer's message.
type staticKeyError struct{ err error }

func (e *staticKeyError) Error() string { return e.err.Error() }
func (e *staticKeyError) Unwrap() error { return e.err }

// dhSlotError: the wait for a DH slot ended (deadline, eviction, listener
// closed) before one was free.
type dhSlotError struct{ err error }

func (e *dhSlotError) Error() string { return "waiting for a DH slot: " + e.err.Error() }
func (e *dhSlotError) Unwrap() error { return e.err }

// readMessageErr explains why hs.ReadMessage failed on a handshake message:
// our own static key (such as a token that went away), an invalid key in the
// message, or the message itself.
func readMessageErr(err error, msg, failure string) error {
	var se *staticKeyError
	var slot *dhSlotError
	switch {
	case errors.As(err, &se):
		return fmt.Errorf("%w: our static key failed: %w", ErrHandshake, se.err)
	case errors.As(err, &slot):
		return fmt.Errorf("noisetor: %w", slot)
	case errors.Is(err, errInvalidPeerPoint):
		return fmt.Errorf("%w: %s carries an invalid public key (off the curve, or of low order)", ErrHandshake, msg)
	}
	return fmt.Errorf("%w: %s %s", ErrHandshake, msg, failure)
}

func (d *dhFunc) DHName() string { return d.curve.noiseName() }

// handshakeParams is one side's view of a handshake before it starts.
type handshakeParams struct {
	initiator    bool
	pattern      Pattern
	cipher       CipherSuite
	static       StaticKey
	remoteStatic PublicKey // zero for an XK responder
	ss           []byte    // KK: DH(static, remoteStatic), from pairSecrets
	prologue     []byte
	random       io.Reader // source of the ephemeral key
	gate         func() (release func(), err error)
}

// newHandshakeState builds the flynn/noise state for p: protocol name
// Noise_<pattern>_<25519|P256>_<ChaChaPoly|AESGCM>_SHA256.
func newHandshakeState(p handshakeParams) (*noise.HandshakeState, error) {
	curve := p.static.PublicKey().Curve()
	dh := &dhFunc{curve: curve, static: p.static, gate: p.gate}
	if p.ss != nil {
		dh.remote, dh.ss = p.remoteStatic.Bytes(), p.ss
	}
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

// handshakeDeadline bounds the handshake's I/O by ctx and the configured
// handshake timeout (boundIO); stop restores the caller's deadlines.
func (c *Conn) handshakeDeadline(ctx context.Context) (stop func(), ctxBound bool) {
	return boundIO(ctx, c.conn, c.cfg.handshakeTimeout(), func() {
		c.conn.SetReadDeadline(c.userReadDeadline())
		c.conn.SetWriteDeadline(c.userWriteDeadline())
	})
}

// clientHandshake runs the initiator side. The keyring entry is chosen by
// name before anything is sent.
func (c *Conn) clientHandshake() error {
	cfg := c.cfg
	own := cfg.StaticKey.PublicKey()
	peer, ok := cfg.Keyring.ByName(c.state.Peer.Name)
	if !ok {
		return fmt.Errorf("%w: no peer named %q", ErrUnknownPeer, c.state.Peer.Name)
	}
	c.state.Peer = peer
	remote := c.remoteStatic
	if remote.IsZero() {
		remote = peer.DialKey(cfg.now())
	} else if !peer.accepts(remote, cfg.now()) {
		return fmt.Errorf("%w: key %v of peer %q is no longer accepted: its rotation's overlap ended at %v", ErrUnknownPeer, remote, peer.Name, peer.OverlapUntil)
	}
	c.state.PeerKey = remote
	if remote.Curve() != own.Curve() {
		return fmt.Errorf("noisetor: peer %q has a %s key and ours is %s", c.state.Peer.Name, remote.Curve(), own.Curve())
	}

	pre := preamble{pattern: c.state.Pattern, curve: own.Curve(), cipher: c.state.CipherSuite}
	if _, err := io.ReadFull(cfg.rand(), pre.salt[:]); err != nil {
		return fmt.Errorf("noisetor: reading randomness: %w", err)
	}
	var rawPreamble, ss []byte
	if pre.pattern == KK {
		s, err := cfg.keys().secrets(remote)
		if err != nil {
			return readMessageErr(err, "the preamble", "could not be keyed")
		}
		rawPreamble, ss = pre.sealKK(s.toPeer, cfg.now()), s.ss
	} else {
		rawPreamble = pre.sealXK(remote)
	}

	hs, err := newHandshakeState(handshakeParams{
		initiator: true, pattern: pre.pattern, cipher: pre.cipher,
		static: cfg.StaticKey, remoteStatic: remote, ss: ss,
		prologue: prologue(rawPreamble), random: c.ephemeralSource(),
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrHandshake, err)
	}

	// -> e, es, ss (KK) or -> e, es (XK). No payload: message 1 can be replayed.
	msg1, _, _, err := hs.WriteMessage(nil, nil)
	if err != nil {
		return readMessageErr(err, "message 1", "could not be written")
	}
	if _, err := c.conn.Write(appendMessage(rawPreamble, msg1)); err != nil {
		return c.refusedErr("message 2", err, fmt.Errorf("noisetor: sending preamble and message 1: %w", err))
	}

	// <- e, ee, se (KK) or <- e, ee (XK)
	msg2, err := readMessage(c.conn, handshakeMessageLen(own.Curve(), 2))
	if err != nil {
		return c.refusedErr("message 2", err, handshakeReadErr("message 2", err))
	}
	payload, cs1, cs2, err := hs.ReadMessage(nil, msg2)
	if err != nil {
		return readMessageErr(err, "message 2", "did not authenticate (the responder does not hold the key we have for it, or the bytes were altered)")
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
			return readMessageErr(err, "message 3", "could not be written")
		}
		out = appendMessage(out, msg3)
	}
	if cs1 == nil {
		return fmt.Errorf("%w: handshake did not complete", ErrHandshake)
	}
	c.state.HandshakeHash = hs.ChannelBinding()

	// The confirm record proves to the responder that we hold the ephemeral
	// key, so a replayed message 1 never yields a session (WIRE.md §6.2).
	send, recv := newHalfState(pre.cipher, cs1.UnsafeKey(), cs1.Nonce()), newHalfState(pre.cipher, cs2.UnsafeKey(), cs2.Nonce())
	out = send.seal(out, recordConfirm, nil)
	if _, err := c.conn.Write(out); err != nil {
		return c.refusedErr("its confirm record", err, fmt.Errorf("noisetor: sending confirm record: %w", err))
	}
	if c.state.Pattern == XK {
		// The XK responder learns who we are only from message 3; its own
		// confirm says it has found our key in its keyring, so that Dial
		// fails here rather than at the first Read (WIRE.md §6.2).
		if err := readConfirm(c.conn, recv); err != nil {
			return c.refusedErr("its confirm record", err, err)
		}
	}
	c.out.half, c.in.half = send, recv
	return nil
}

// refusedErr turns the end of the connection (raw) where the responder's
// next message was due into ErrRefused, with what the operator can check:
// both keys' fingerprints. Other errors are returned as err.
func (c *Conn) refusedErr(next string, raw, err error) error {
	if !isClosedByPeer(raw) {
		return err
	}
	own := c.cfg.StaticKey.PublicKey()
	remote := c.state.PeerKey
	why := fmt.Sprintf("it does not list our key, or the key we hold for it is not its key, or it does not accept %v with %v on %v, or our clocks differ by more than 10 minutes, or it is at its connection limits",
		c.state.Pattern, c.state.CipherSuite, own.Curve())
	switch {
	case c.state.Pattern == XK && next == "its confirm record":
		why = "it does not list our key in its keyring, or it is at its connection limits"
	case c.state.Pattern == XK:
		// An XK responder checks our key only after message 3.
		why = fmt.Sprintf("the key we hold for it is not its key, or it does not accept %v with %v on %v, or it is at its connection limits",
			c.state.Pattern, c.state.CipherSuite, own.Curve())
	}
	return fmt.Errorf("%w: %q closed the connection instead of sending %s: %s (the pattern we asked for is %v; our key's fingerprint %s; the key we hold for %q has fingerprint %s)",
		ErrRefused, c.state.Peer.Name, next, why, c.state.Pattern, own.Fingerprint(), c.state.Peer.Name, remote.Fingerprint())
}

// isClosedByPeer reports an end of stream or a reset: what an initiator sees
// when the responder refuses it.
func isClosedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// readConfirm reads the first transport record, which must be CONFIRM.
func readConfirm(r io.Reader, recv *halfState) error {
	frame, err := readMessage(r, confirmLen)
	if err != nil {
		return handshakeReadErr("confirm record", err) // wraps io.ErrUnexpectedEOF: isClosedByPeer sees it
	}
	typ, body, err := recv.open(frame[:0], frame)
	if err != nil || typ != recordConfirm || len(body) != 0 {
		return fmt.Errorf("%w: the first record is not a confirm record (replayed message 1?)", ErrHandshake)
	}
	return nil
}

// serverHandshake runs the responder side. Until the preamble has proved a
// keyring key (KK) it costs only HMACs and a map lookup, so a caller without
// a key, whatever public keys it knows, is dropped before any DH.
func (c *Conn) serverHandshake(ctx context.Context) error {
	cfg := c.cfg
	own := cfg.StaticKey.PublicKey()

	// The magic and version first, so that a peer of another version, whose
	// preamble may be shorter, gets a clear error rather than a timeout.
	// One read usually brings the preamble and message 1, sent together; it
	// asks for no more than the shortest message 1 can fill, so it never
	// takes bytes past it.
	first := make([]byte, preambleLen+frameHeader+handshakeMessageLen(X25519, 1))
	n, err := io.ReadAtLeast(c.conn, first, 5)
	if err != nil {
		c.refusal = "no preamble"
		return handshakeReadErr("preamble", err)
	}
	if err := checkPreambleHead(first[:5]); err != nil {
		c.refusal = "malformed preamble or other wire version"
		return err
	}
	if n < preambleLen {
		if _, err := io.ReadFull(c.conn, first[n:preambleLen]); err != nil {
			c.refusal = "no preamble"
			return handshakeReadErr("preamble", err)
		}
		n = preambleLen
	}
	rawPreamble, early := first[:preambleLen], first[preambleLen:n]
	if c.guard != nil {
		c.guard.preambleReceived(c)
	}
	pre, err := parsePreamble(rawPreamble)
	if err != nil {
		c.refusal = "malformed preamble or other wire version"
		return err
	}
	c.state.Pattern, c.state.CipherSuite = pre.pattern, pre.cipher
	c.refusal = "parameters not accepted"
	if !slices.Contains(cfg.patterns(), pre.pattern) {
		return fmt.Errorf("%w: peer asked for %v, this side accepts %v", ErrVersion, pre.pattern, cfg.patterns())
	}
	if !slices.Contains(cfg.cipherSuites(), pre.cipher) {
		return fmt.Errorf("%w: peer asked for cipher %v, this side accepts %v", ErrVersion, pre.cipher, cfg.cipherSuites())
	}
	if pre.curve != own.Curve() {
		return fmt.Errorf("%w: peer uses curve %v, our key is %v", ErrVersion, pre.curve, own.Curve())
	}

	// keys is that of our static keys (two during a rotation) to which the
	// preamble is addressed.
	keys := cfg.keys()
	var remote PublicKey
	var ss []byte
	var replay *replayCache
	var window, now uint64
	if pre.pattern == KK {
		var p Peer
		var secrets *pairSecrets
		var w uint64
		for _, ks := range cfg.ownKeys() {
			if p, secrets, w, err = ks.findKK(cfg.Keyring, pre, rawPreamble, cfg.now()); err != nil {
				c.refusal = "our static key failed"
				return readMessageErr(err, "the preamble", "could not be checked")
			}
			if secrets != nil {
				keys = ks
				break
			}
		}
		if secrets == nil {
			c.refusal = "preamble did not verify"
			return fmt.Errorf("%w: KK preamble matches no keyring peer: the caller is not in our keyring, or has another public key for us (ours has fingerprint %s), or its clock is more than 10 minutes off", ErrUnknownPeer, keys.ownFingerprint)
		}
		if a, ok := c.conn.(interface{ announcedInitiator() PublicKey }); ok && !a.announcedInitiator().IsZero() && a.announcedInitiator() != secrets.peer {
			// A relayed stream whose preamble proves another key than the
			// requester its INCOMING line named: whoever relays it (the
			// sync server) gets the same refusal as a forger.
			c.refusal = "preamble did not verify"
			return fmt.Errorf("%w: the relayed preamble is not from the announced requester", ErrUnknownPeer)
		}
		c.state.Peer, c.state.PeerKey, remote, replay = p, secrets.peer, secrets.peer, secrets.replay
		ss = secrets.ss
		window, now = w, preambleWindowOf(cfg.now())
	} else if keys = xkAddressee(cfg.ownKeys(), pre, rawPreamble); keys == nil {
		c.refusal = "preamble did not verify"
		return fmt.Errorf("%w: XK preamble tag is wrong: the caller does not have our public key (fingerprint %s)", ErrUnknownPeer, cfg.keys().ownFingerprint)
	} else {
		replay = keys.replay
	}
	if err := replay.add(pre.salt, window, now); err != nil {
		c.refusal = "replayed preamble"
		if errors.Is(err, errReplayCacheFull) {
			c.refusal = "peer's replay cache full"
		}
		return err
	}
	c.refusal = ""
	// Waits for a turn or a DH slot end with the handshake.
	ctx, cancel := context.WithDeadline(ctx, c.handshakeStart.Add(cfg.handshakeTimeout()))
	defer cancel()
	if pre.pattern == KK {
		c.authenticated = true
		if err := c.takeTurn(ctx, c.state.Peer.PublicKey); err != nil {
			return err
		}
	} else {
		c.refusal = "XK caller did not complete the handshake"
	}

	hs, err := newHandshakeState(handshakeParams{
		pattern: pre.pattern, cipher: pre.cipher,
		static: keys.static, remoteStatic: remote, ss: ss,
		prologue: prologue(rawPreamble), random: c.ephemeralSource(),
		gate: c.dhGate(ctx),
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrHandshake, err)
	}

	// -> e, es, ss (KK) or -> e, es (XK)
	msg1, err := readMessage(io.MultiReader(bytes.NewReader(early), c.conn), handshakeMessageLen(own.Curve(), 1))
	if err != nil {
		return handshakeReadErr("message 1", err)
	}
	payload, _, _, err := hs.ReadMessage(nil, msg1)
	if err != nil {
		return readMessageErr(err, "message 1", "did not authenticate (altered, or the caller's key for us is wrong)")
	}
	if len(payload) != 0 {
		return fmt.Errorf("%w: message 1 carries a payload", ErrHandshake)
	}

	// <- e, ee, se (KK) or <- e, ee (XK)
	msg2, cs1, cs2, err := hs.WriteMessage(nil, nil)
	if err != nil {
		return readMessageErr(err, "message 2", "could not be written")
	}
	if _, err := c.conn.Write(appendMessage(nil, msg2)); err != nil {
		return fmt.Errorf("noisetor: sending message 2: %w", err)
	}

	if pre.pattern == XK {
		// -> s, se
		msg3, err := readMessage(c.conn, handshakeMessageLen(own.Curve(), 3))
		if err != nil {
			return handshakeReadErr("message 3", err)
		}
		payload, cs1, cs2, err = hs.ReadMessage(nil, msg3)
		if err != nil {
			return readMessageErr(err, "message 3", "did not authenticate")
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
		if !ok || !p.accepts(remote, cfg.now()) {
			c.refusal = "XK caller's key not in the keyring"
			return fmt.Errorf("%w: caller's key %v (fingerprint %s) is not in our keyring", ErrUnknownPeer, remote, remote.Fingerprint())
		}
		c.state.Peer, c.state.PeerKey = p, remote
		c.authenticated, c.refusal = true, ""
		if err := c.takeTurn(ctx, p.PublicKey); err != nil {
			return err
		}
	}
	if cs1 == nil {
		return fmt.Errorf("%w: handshake did not complete", ErrHandshake)
	}
	c.state.HandshakeHash = hs.ChannelBinding()
	send, recv := newHalfState(pre.cipher, cs2.UnsafeKey(), cs2.Nonce()), newHalfState(pre.cipher, cs1.UnsafeKey(), cs1.Nonce())

	// The first transport record must be the initiator's confirm: until it
	// arrives the caller may be replaying a captured message 1.
	if err := readConfirm(c.conn, recv); err != nil {
		return err
	}
	if pre.pattern == XK {
		// Our confirm: the caller's key is in our keyring (WIRE.md §6.2).
		if _, err := c.conn.Write(send.seal(nil, recordConfirm, nil)); err != nil {
			return fmt.Errorf("noisetor: sending confirm record: %w", err)
		}
	}
	c.out.half, c.in.half = send, recv
	return nil
}

// xkAddressee returns the one of our keys to which the XK preamble raw is
// addressed, or nil.
func xkAddressee(own []*pairKeys, pre *preamble, raw []byte) *pairKeys {
	for _, ks := range own {
		if tagEqual(xkTag(ks.xkKey, raw[:32]), pre.tag) {
			return ks
		}
	}
	return nil
}

// takeTurn waits for one of the authenticated peer's handshake turns on a
// Listener.
func (c *Conn) takeTurn(ctx context.Context, peer PublicKey) error {
	if c.guard == nil {
		return nil
	}
	if err := c.guard.authenticated(ctx, c, peer); err != nil {
		return fmt.Errorf("noisetor: peer %q: waiting for a handshake turn: %w", c.state.Peer.Name, err)
	}
	return nil
}

// dhGate returns the Listener's DH slots bound to ctx, or nil.
func (c *Conn) dhGate(ctx context.Context) func() (func(), error) {
	if c.guard == nil {
		return nil
	}
	return func() (func(), error) { return c.guard.acquireDH(ctx, c) }
}

// drop closes a connection whose handshake is still running, recording why
// for its log line. The Listener calls it with its mutex held: cut, not
// Close, so that a relayed stream does not linger.
func (c *Conn) drop(reason string) {
	c.dropReason.CompareAndSwap(nil, &reason)
	if cancel := c.cancelHandshake.Load(); cancel != nil {
		(*cancel)()
	}
	c.cut()
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
		return fmt.Errorf("%w: peer closed the connection before %s (%w)", ErrHandshake, what, io.ErrUnexpectedEOF)
	case isTimeout(err):
		return fmt.Errorf("noisetor: handshake timed out waiting for %s: %w", what, err)
	}
	return fmt.Errorf("noisetor: reading %s: %w", what, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
