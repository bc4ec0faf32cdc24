//go:build cgo

package noisetor

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// This file implements StaticKey on a PKCS#11 token with
// github.com/miekg/pkcs11. github.com/ThalesGroup/crypto11 (v1.6.2) is not
// used: it has no ECDH at all, and once an X25519 key is on a token its Find*
// functions fail for every key. See the README, "Hardware keys (PKCS#11)".

// PKCS11Available reports whether this binary can use PKCS#11 tokens: true,
// it was built with cgo.
func PKCS11Available() bool { return true }

// A PKCS11Key is a StaticKey whose private half lives in a PKCS#11 token
// (a hardware security module, smart card or SoftHSM) and never enters this
// process: DH runs on the token as C_DeriveKey(CKM_ECDH1_DERIVE, CKD_NULL).
//
// It keeps a pool of token sessions for concurrent handshakes. A session that
// fails with a session or device error is closed, not reused; the next DH
// logs in again, finds the key again (checking it is still the same key) and
// carries on, so a token that comes back works again.
//
// Anyone who can use the token and knows the PIN can compute DH with this
// key, and so act as this identity, for as long as they have access: a token
// prevents theft of the key, not its use.
//
// Its String, GoString, Format and LogValue methods never show the PIN, for
// a *PKCS11Key and a dereferenced PKCS11Key alike.
type PKCS11Key struct {
	// All state is behind a pointer, so that the print methods can have
	// value receivers without copying locks: fmt would otherwise print a
	// dereferenced key field by field, PIN included.
	*pkcs11Key
}

type pkcs11Key struct {
	mod *p11module
	// pin is kept to log in again after the token comes back. It is behind
	// a pointer (nil: no PIN) so that even fmt's field-by-field printing of
	// a PKCS11Key shows only an address (see PrivateKey).
	pin      *string
	tokenSel string // "label \"x\"" or "serial y", for messages
	tokenID  string // key of mod.logins
	cfg      PKCS11Config
	id       []byte
	label    string
	pub      PublicKey
	derDER   atomic.Bool // the token wants the peer point DER-wrapped

	sem chan struct{} // bounds sessions in use

	mu     sync.RWMutex // held for reading by every operation, for writing by Close
	closed bool

	st         sync.Mutex // guards the connection state below
	slot       uint
	loginS     pkcs11.SessionHandle // keeps the login alive while the pool is empty
	haveLoginS bool
	handle     pkcs11.ObjectHandle
	gen        uint64 // bumped whenever the connection is declared broken
	broken     bool
	idle       []pkcs11.SessionHandle
	failAt     time.Time
	failErr    error
	retryEvery time.Duration
	pinErr     error // the token refused the PIN when logging in again

	derives    atomic.Int64 // C_DeriveKey calls, for tests
	reconnects atomic.Int64
}

// pkcs11RetryInterval is how long a key waits, after failing to reconnect to
// its token, before it tries again. DH calls in between fail fast.
const pkcs11RetryInterval = time.Second

// OpenPKCS11Key opens an existing key on a token. The key must be an X25519
// key (CKK_EC_MONTGOMERY; SoftHSM's CKK_EC_EDWARDS with the X25519 curve; or
// NSS's CKK_EC with the OID 1.3.6.1.4.1.11591.15.1) or a P-256 key (CKK_EC,
// prime256v1); it must allow derivation (CKA_DERIVE), be sensitive and not
// be extractable, or the error matches ErrPKCS11KeyPolicy. OpenPKCS11Key
// checks that the public key it finds belongs to the private key by
// computing DH with the curve's base point on the token; a token that has no
// ECDH for the key fails that with ErrPKCS11Unsupported.
func OpenPKCS11Key(cfg *PKCS11Config) (*PKCS11Key, error) {
	return openPKCS11(cfg, false)
}

// GeneratePKCS11Key makes a new key pair on the token and opens it: a
// private key that is sensitive, not extractable, usable only for
// derivation (CKA_DERIVE true; CKA_SIGN, CKA_SIGN_RECOVER, CKA_DECRYPT and
// CKA_UNWRAP false, and a public key that cannot encrypt, wrap or verify),
// and stored on the token (CKA_TOKEN), plus its public key object with the
// same CKA_ID and CKA_LABEL. A token that refuses those usage attributes for
// the key type gets the template without them, and its defaults decide. It
// refuses to make a second key with the label or ID of an existing one (the
// error matches fs.ErrExist and names the existing key).
//
// X25519 keys use CKM_EC_MONTGOMERY_KEY_PAIR_GEN (PKCS#11 3.0) when the token
// has it, else CKM_EC_EDWARDS_KEY_PAIR_GEN with the X25519 curve (how
// SoftHSM 2.5 and 2.6 make X25519 keys), else CKM_EC_KEY_PAIR_GEN with NSS's
// Curve25519 OID (how NSS before 3.110 does). Tokens that take none of them
// fail with ErrPKCS11Unsupported: use P256 there.
func GeneratePKCS11Key(cfg *PKCS11Config) (*PKCS11Key, error) {
	return openPKCS11(cfg, true)
}

func openPKCS11(cfg *PKCS11Config, generate bool) (_ *PKCS11Key, err error) {
	pin, err := cfg.check(generate)
	if err != nil {
		return nil, err
	}
	n := cfg.MaxSessions
	if n == 0 {
		n = defaultPKCS11Sessions
	}
	k := &PKCS11Key{&pkcs11Key{
		cfg:        *cfg,
		id:         bytes.Clone(cfg.KeyID),
		label:      cfg.KeyLabel,
		sem:        make(chan struct{}, n),
		retryEvery: pkcs11RetryInterval,
	}}
	if pin != "" {
		k.pin = &pin
	}
	k.cfg.PIN, k.cfg.KeyID = "", nil
	switch {
	case cfg.TokenLabel != "" && cfg.TokenSerial != "":
		k.tokenSel = fmt.Sprintf("label %q serial %q", cfg.TokenLabel, cfg.TokenSerial)
	case cfg.TokenLabel != "":
		k.tokenSel = fmt.Sprintf("label %q", cfg.TokenLabel)
	default:
		k.tokenSel = fmt.Sprintf("serial %q", cfg.TokenSerial)
	}
	if k.mod, err = acquireModule(cfg.Module, cfg.InitParams); err != nil {
		return nil, err
	}
	loggedIn := false
	defer func() {
		if err != nil {
			k.st.Lock()
			k.closeSessionsLocked()
			k.st.Unlock()
			if loggedIn {
				k.mod.logout(k.tokenID)
			}
			k.mod.release()
		}
	}()
	ctx := k.mod.ctx
	slot, ti, err := k.findSlot()
	if err != nil {
		return nil, err
	}
	k.slot = slot
	k.tokenID = ti.SerialNumber + "\x00" + ti.Label
	s, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return nil, p11err(nil, call("C_OpenSession", err), "token %s", k.tokenSel)
	}
	k.loginS, k.haveLoginS = s, true
	if pin == "" {
		if ti.Flags&pkcs11.CKF_LOGIN_REQUIRED != 0 {
			return nil, p11err(ErrPKCS11PIN, nil, "token %s needs a PIN and none is configured (%s or %s)", k.tokenSel, EnvPKCS11PINFile, EnvPKCS11PIN)
		}
	} else {
		if err := k.mod.login(s, k.tokenID, pin, true); err != nil {
			if _, ok := err.(*pkcs11Err); ok {
				return nil, err
			}
			return nil, p11err(nil, err, "logging in to token %s", k.tokenSel)
		}
		loggedIn = true
	}
	var found foundKey
	if generate {
		found, err = k.generate(cfg.Curve)
	} else {
		found, err = k.findKey(s)
	}
	if err != nil {
		return nil, err
	}
	k.handle, k.pub, k.id, k.label = found.h, found.pub, found.id, found.label
	if cfg.Curve != 0 && k.pub.Curve() != cfg.Curve {
		return nil, p11err(ErrPKCS11Unsupported, nil, "key %s is %v, configured curve is %v", k.keyDesc(), k.pub.Curve(), cfg.Curve)
	}
	return k, nil
}

// deriveRaw runs ECDH on the token: C_DeriveKey(CKM_ECDH1_DERIVE, CKD_NULL)
// into a session object, reads its CKA_VALUE, and destroys it.
//
// The static key is sensitive and not extractable: it is the identity, and
// reading it out would let a copy of it act as this machine forever. The
// derived secret, in contrast, has to be extractable and not sensitive:
// Noise feeds the raw DH output into HKDF (MixKey) in software, so the bytes
// must come back. It is a session object (CKA_TOKEN false), never stored,
// and destroyed as soon as it has been read; a session in which the destroy
// fails is closed, which destroys it too. Tokens that refuse to hand out
// derived secrets (AWS CloudHSM, for one) cannot be used.
func (k *PKCS11Key) deriveRaw(s pkcs11.SessionHandle, h pkcs11.ObjectHandle, c Curve, peer []byte) ([]byte, error) {
	ctx := k.mod.ctx
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
	}
	der := k.derDER.Load()
	var dk pkcs11.ObjectHandle
	for {
		data := peer
		if der {
			data = derOctet(peer)
		}
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE,
			pkcs11.NewECDH1DeriveParams(pkcs11.CKD_NULL, nil, data))}
		k.derives.Add(1)
		var err error
		dk, err = ctx.DeriveKey(s, mech, h, tmpl)
		if err == nil {
			if der {
				k.derDER.Store(true)
			}
			break
		}
		// PKCS#11 says the peer point is raw, but older tokens (and the
		// 2.40 text for CKK_EC) want a DER OCTET STRING: try that once.
		if rv, _ := rvOf(err); !der && paramCodes[rv] {
			der = true
			continue
		}
		return nil, &sessionErr{call("C_DeriveKey", err)}
	}
	a, gerr := ctx.GetAttributeValue(s, dk, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if derr := ctx.DestroyObject(s, dk); derr != nil {
		return nil, &sessionErr{call("C_DestroyObject", derr)}
	}
	if gerr != nil {
		return nil, &sessionErr{call("C_GetAttributeValue", gerr)}
	}
	out := a[0].Value
	if len(out) != 32 {
		return nil, fmt.Errorf("token returned a %d-byte DH output, want 32", len(out))
	}
	if c == X25519 && subtle.ConstantTimeCompare(out, make([]byte, 32)) == 1 {
		return nil, badKey("x25519 DH output is all zero (low-order peer key)")
	}
	return out, nil
}

// sessionErr marks an error after which the session must not be reused.
type sessionErr struct{ err error }

func (e *sessionErr) Error() string { return e.err.Error() }
func (e *sessionErr) Unwrap() error { return e.err }

// generate makes the key pair (see GeneratePKCS11Key) in a read-write session.
func (k *PKCS11Key) generate(c Curve) (foundKey, error) {
	ctx := k.mod.ctx
	if c == 0 {
		c = X25519
	}
	mechs, err := ctx.GetMechanismList(k.slot)
	if err != nil {
		return foundKey{}, p11err(nil, call("C_GetMechanismList", err), "token %s", k.tokenSel)
	}
	has := map[uint]bool{}
	for _, m := range mechs {
		has[m.Mechanism] = true
	}
	if !has[pkcs11.CKM_ECDH1_DERIVE] {
		return foundKey{}, p11err(ErrPKCS11Unsupported, nil, "token %s has no CKM_ECDH1_DERIVE", k.tokenSel)
	}
	var mech, ktype uint
	var params []byte
	switch {
	case c == P256 && has[pkcs11.CKM_EC_KEY_PAIR_GEN]:
		mech, ktype, params = pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKK_EC, oidP256
	case c == X25519 && has[ckmECMontgomeryKeyPairGen]:
		mech, ktype, params = ckmECMontgomeryKeyPairGen, ckkECMontgomery, oidX25519
	case c == X25519 && has[ckmECEdwardsKeyPairGen]:
		mech, ktype, params = ckmECEdwardsKeyPairGen, ckkECEdwards, oidX25519
	case c == X25519 && has[pkcs11.CKM_EC_KEY_PAIR_GEN]:
		// NSS without PKCS#11 3.0 mechanisms makes Curve25519 keys as
		// CKK_EC keys with its own OID; other tokens refuse the OID.
		mech, ktype, params = pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKK_EC, oidX25519NSS
	default:
		return foundKey{}, p11err(ErrPKCS11Unsupported, nil, "token %s cannot generate %v keys; try curve p256", k.tokenSel, c)
	}
	if len(k.id) == 0 {
		k.id = make([]byte, 16)
		if _, err := rand.Read(k.id); err != nil {
			return foundKey{}, p11err(nil, err, "making a key ID")
		}
	}
	s, err := ctx.OpenSession(k.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return foundKey{}, p11err(nil, call("C_OpenSession", err), "token %s", k.tokenSel)
	}
	defer ctx.CloseSession(s)
	// Refuse duplicates: two keys under one name make OpenPKCS11Key ambiguous.
	// The message names the key that is there, not the new key's ID.
	for _, t := range [][]*pkcs11.Attribute{
		{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), pkcs11.NewAttribute(pkcs11.CKA_ID, k.id)},
		{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.label)},
	} {
		if t[1].Type == pkcs11.CKA_LABEL && k.label == "" {
			continue
		}
		hs, err := findObjects(ctx, s, t, 1)
		if err != nil {
			return foundKey{}, p11err(nil, err, "token %s", k.tokenSel)
		}
		if len(hs) == 0 {
			continue
		}
		label, _, _ := attr(ctx, s, hs[0], pkcs11.CKA_LABEL)
		id, _, _ := attr(ctx, s, hs[0], pkcs11.CKA_ID)
		what := fmt.Sprintf("id %x", k.id)
		if t[1].Type == pkcs11.CKA_LABEL {
			what = fmt.Sprintf("label %q", k.label)
		}
		return foundKey{}, p11err(fs.ErrExist, nil, "token %s already has a private key with %s (label %q, id %x); choose another",
			k.tokenSel, what, label, id)
	}
	common := func(class uint) []*pkcs11.Attribute {
		t := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ktype),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_ID, k.id),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true),
		}
		if k.label != "" {
			t = append(t, pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.label))
		}
		return t
	}
	pubT := append(common(pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
	privT := append(common(pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false))
	// Usable only for derivation: a token's defaults may allow more (SoftHSM
	// 2.6 sets CKA_DECRYPT and CKA_UNWRAP on EC keys), and a key that can
	// also sign or decrypt is a key that other software on the host can be
	// talked into using for something else.
	var onlyDerive []*pkcs11.Attribute
	for _, a := range []uint{pkcs11.CKA_DECRYPT, pkcs11.CKA_UNWRAP, pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER} {
		onlyDerive = append(onlyDerive, pkcs11.NewAttribute(a, false))
	}
	var pubOnly []*pkcs11.Attribute
	for _, a := range []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_WRAP, pkcs11.CKA_VERIFY, pkcs11.CKA_VERIFY_RECOVER} {
		pubOnly = append(pubOnly, pkcs11.NewAttribute(a, false))
	}
	gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}
	pubH, privH, err := ctx.GenerateKeyPair(s, gen, append(pubT, pubOnly...), append(privT, onlyDerive...))
	if rv, _ := rvOf(err); templateCodes[rv] {
		// Some tokens refuse attributes that do not apply to the key type
		// (CKA_SIGN on a Montgomery key, say): generate with the basic
		// template; the key is then restricted only as far as the token's
		// defaults go.
		pubH, privH, err = ctx.GenerateKeyPair(s, gen, pubT, privT)
	}
	if rv, _ := rvOf(err); bytes.Equal(params, oidX25519NSS) && (rv == pkcs11.CKR_DOMAIN_PARAMS_INVALID || rv == pkcs11.CKR_CURVE_NOT_SUPPORTED) {
		return foundKey{}, p11err(ErrPKCS11Unsupported, call("C_GenerateKeyPair", err), "token %s cannot generate x25519 keys; try curve p256", k.tokenSel)
	}
	if err != nil {
		return foundKey{}, p11err(nil, call("C_GenerateKeyPair", err), "generating a %v key on token %s", c, k.tokenSel)
	}
	f, err := k.findKey(s)
	if err != nil {
		// Do not leave a key behind that OpenPKCS11Key would refuse.
		_ = ctx.DestroyObject(s, privH)
		_ = ctx.DestroyObject(s, pubH)
		return foundKey{}, err
	}
	return f, nil
}

// PublicKey returns the public half of the key.
func (k *PKCS11Key) PublicKey() PublicKey { return k.pub }

// ID returns the key's CKA_ID.
func (k *PKCS11Key) ID() []byte { return bytes.Clone(k.id) }

// Label returns the key's CKA_LABEL.
func (k *PKCS11Key) Label() string { return k.label }

// DH computes Diffie-Hellman with peer on the token: for X25519 the RFC 7748
// shared secret, for P-256 the 32-byte x-coordinate, the same bytes a
// software key returns. It is safe for concurrent use; at most MaxSessions
// calls run on the token at once and the rest wait.
//
// After a session or device error (token removed, re-initialised, sessions
// closed under it) DH drops the session and tries once more on a fresh
// connection: it logs in again and finds the key again, refusing a different
// key under the same name. While the token stays unreachable, DH fails fast
// with an error matching ErrPKCS11Unavailable or ErrPKCS11NotFound, and tries
// to reconnect at most once a second.
func (k *PKCS11Key) DH(peer PublicKey) ([]byte, error) {
	c := k.pub.Curve()
	if peer.Curve() != c {
		return nil, badKey("peer key is %s, own key is %s", peer.Curve(), c)
	}
	raw := peer.Bytes()
	if len(raw) != c.publicKeyLen() {
		return nil, badKey("%s peer key is %d bytes", c, len(raw))
	}
	if c == P256 {
		// Handshake code may hand over a peer's ephemeral point unchecked.
		// Check it is on the curve here: not every token does, and an
		// invalid-curve point could make the token leak the private key.
		if _, err := ecdh.P256().NewPublicKey(raw); err != nil {
			return nil, badKey("p256 peer key is not a valid point")
		}
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.closed {
		return nil, p11err(ErrPKCS11Closed, nil, "DH with key %s: key is closed", k.keyDesc())
	}
	k.sem <- struct{}{}
	defer func() { <-k.sem }()
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		s, h, gen, serr := k.session()
		if serr != nil {
			return nil, p11err(ErrPKCS11Unavailable, serr, "DH with key %s", k.keyDesc())
		}
		var out []byte
		out, err = k.deriveRaw(s, h, c, raw)
		if err == nil {
			k.putSession(s, gen)
			return out, nil
		}
		var se *sessionErr
		if !errors.As(err, &se) {
			k.putSession(s, gen)
			break
		}
		rv, _ := rvOf(err)
		k.dropSession(s, gen, connCodes[rv])
		if !connCodes[rv] {
			break
		}
	}
	if errors.Is(err, ErrBadKey) {
		return nil, err
	}
	return nil, p11err(nil, err, "DH with key %s on token %s", k.keyDesc(), k.tokenSel)
}

const sessionFlags = pkcs11.CKF_SERIAL_SESSION // read-only: DH creates only session objects

// session takes an idle session or opens one, reconnecting first when the
// connection is broken. It returns the key handle and the connection
// generation to go with it.
func (k *PKCS11Key) session() (pkcs11.SessionHandle, pkcs11.ObjectHandle, uint64, error) {
	k.st.Lock()
	defer k.st.Unlock()
	if k.broken {
		if err := k.reconnectLocked(); err != nil {
			return 0, 0, 0, err
		}
	}
	if n := len(k.idle); n > 0 {
		s := k.idle[n-1]
		k.idle = k.idle[:n-1]
		return s, k.handle, k.gen, nil
	}
	s, err := k.mod.ctx.OpenSession(k.slot, sessionFlags)
	if err != nil {
		err = call("C_OpenSession", err)
		if rv, _ := rvOf(err); connCodes[rv] {
			k.breakLocked()
		}
		return 0, 0, 0, p11err(nil, err, "DH with key %s on token %s", k.keyDesc(), k.tokenSel)
	}
	return s, k.handle, k.gen, nil
}

// putSession returns a healthy session to the pool, or closes it if the
// connection it belongs to has been declared broken since.
func (k *PKCS11Key) putSession(s pkcs11.SessionHandle, gen uint64) {
	k.st.Lock()
	defer k.st.Unlock()
	if gen == k.gen && !k.broken {
		k.idle = append(k.idle, s)
		return
	}
	_ = k.mod.ctx.CloseSession(s)
}

// dropSession closes a session that failed. When the failure means the
// connection is gone, the other idle sessions go too and the next DH
// reconnects.
func (k *PKCS11Key) dropSession(s pkcs11.SessionHandle, gen uint64, conn bool) {
	_ = k.mod.ctx.CloseSession(s)
	if !conn {
		return
	}
	k.st.Lock()
	defer k.st.Unlock()
	if gen == k.gen && !k.broken {
		k.breakLocked()
	}
}

func (k *PKCS11Key) breakLocked() {
	k.broken = true
	k.gen++
	k.failErr = nil // reconnect at once the first time
	k.closeSessionsLocked()
}

func (k *PKCS11Key) closeSessionsLocked() {
	for _, s := range k.idle {
		_ = k.mod.ctx.CloseSession(s)
	}
	k.idle = nil
	if k.haveLoginS {
		_ = k.mod.ctx.CloseSession(k.loginS)
		k.haveLoginS = false
	}
}

// reconnectLocked finds the token again, logs in and finds the key again.
func (k *PKCS11Key) reconnectLocked() error {
	if k.pinErr != nil {
		// Never retry a refused PIN: tokens lock the PIN after a few wrong
		// tries, and a daemon retrying every second would lock it.
		return k.pinErr
	}
	if k.failErr != nil && time.Since(k.failAt) < k.retryEvery {
		return k.failErr
	}
	k.reconnects.Add(1)
	err := func() error {
		slot, _, err := k.findSlot()
		if err != nil {
			return err
		}
		ctx := k.mod.ctx
		s, err := ctx.OpenSession(slot, sessionFlags)
		if err != nil {
			return p11err(nil, call("C_OpenSession", err), "reconnecting to token %s", k.tokenSel)
		}
		if k.pin != nil {
			if err := k.mod.login(s, k.tokenID, *k.pin, false); err != nil {
				_ = ctx.CloseSession(s)
				if _, ok := err.(*pkcs11Err); ok {
					return err
				}
				return p11err(nil, err, "logging in to token %s again", k.tokenSel)
			}
		}
		f, err := k.findKey(s)
		if err != nil {
			_ = ctx.CloseSession(s)
			return err
		}
		k.slot, k.handle, k.loginS, k.haveLoginS = slot, f.h, s, true
		return nil
	}()
	if err != nil {
		k.failAt, k.failErr = time.Now(), err
		if errors.Is(err, ErrPKCS11PIN) {
			k.pinErr = p11err(ErrPKCS11PIN, err, "not retrying (reopen the key with the right PIN)")
			return k.pinErr
		}
		return err
	}
	k.broken, k.failErr = false, nil
	return nil
}

// Close closes the key's sessions and, when no other key uses the module, the
// module. It waits for DH calls in flight; later calls fail with an error
// matching ErrPKCS11Closed. Close does not delete the key from the token.
func (k *PKCS11Key) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	k.st.Lock()
	k.closeSessionsLocked()
	k.st.Unlock()
	if k.pin != nil {
		k.mod.logout(k.tokenID)
	}
	k.pin = nil
	k.mod.release()
	return nil
}

// String describes the key by its public key, token and name.
func (k PKCS11Key) String() string {
	if k.pkcs11Key == nil {
		return "noisetor.PKCS11Key(<none>)"
	}
	return fmt.Sprintf("noisetor.PKCS11Key(%s, token %s, key %s)", k.pub, k.tokenSel, k.keyDesc())
}

// GoString is String, so %#v does not print the PIN kept for reconnecting.
func (k PKCS11Key) GoString() string { return k.String() }

// Format prints String for every verb.
func (k PKCS11Key) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// LogValue implements slog.LogValuer: log/slog shows String.
func (k PKCS11Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

var _ StaticKey = (*PKCS11Key)(nil)
