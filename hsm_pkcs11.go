//go:build cgo

package noisetor

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// This file implements StaticKey on a PKCS#11 token with
// github.com/miekg/pkcs11. github.com/ThalesGroup/crypto11 (v1.6.2) is not
// used: it has no ECDH at all, and once an X25519 key is on a token its Find*
// functions fail for every key. See the README, "Hardware keys (PKCS#11)".

// Name returns the symbolic name of Code, such as "CKR_PIN_INCORRECT".
func (e *PKCS11Error) Name() string {
	// pkcs11.Error's text is "pkcs11: 0xA0: CKR_PIN_INCORRECT".
	s := pkcs11.Error(e.Code).Error()
	if i := strings.LastIndex(s, ": "); i >= 0 && strings.HasPrefix(s[i+2:], "CKR_") {
		return s[i+2:]
	}
	return fmt.Sprintf("CKR_0x%X", e.Code)
}

// pkcs11Err is the error type returned to callers: one message, the
// ErrPKCS11 family, and an optional cause.
type pkcs11Err struct {
	kind  error // a specific ErrPKCS11* sentinel, fs.ErrExist, or nil
	msg   string
	cause error
}

func (e *pkcs11Err) Error() string { return "noisetor: pkcs11: " + e.text() }

// text is the message without the prefix, so that wrapping one pkcs11Err in
// another does not repeat "noisetor: pkcs11:".
func (e *pkcs11Err) text() string {
	var inner *pkcs11Err
	switch {
	case e.cause == nil:
		return e.msg
	case errors.As(e.cause, &inner) && inner == e.cause:
		return e.msg + ": " + inner.text()
	}
	return e.msg + ": " + strings.TrimPrefix(e.cause.Error(), "noisetor: ")
}

func (e *pkcs11Err) Unwrap() []error {
	errs := []error{ErrPKCS11}
	if e.kind != nil {
		errs = append(errs, e.kind)
	}
	if e.cause != nil {
		errs = append(errs, e.cause)
	}
	return errs
}

// p11err makes a caller-facing error. When kind is nil it is derived from
// the cause's PKCS#11 return value. Messages never contain the PIN: nothing
// that formats one is ever passed here.
func p11err(kind, cause error, format string, args ...any) error {
	if kind == nil {
		if rv, ok := rvOf(cause); ok {
			switch {
			case pinCodes[rv]:
				kind = ErrPKCS11PIN
			case connCodes[rv]:
				kind = ErrPKCS11Unavailable
			}
		}
	}
	return &pkcs11Err{kind: kind, msg: fmt.Sprintf(format, args...), cause: cause}
}

// call turns a miekg/pkcs11 error into a *PKCS11Error naming the function.
func call(fn string, err error) error {
	var e pkcs11.Error
	if errors.As(err, &e) {
		return &PKCS11Error{Func: fn, Code: uint(e)}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", fn, err)
	}
	return nil
}

// rvOf returns the PKCS#11 return value carried by err.
func rvOf(err error) (uint, bool) {
	var pe *PKCS11Error
	if errors.As(err, &pe) {
		return pe.Code, true
	}
	var e pkcs11.Error
	if errors.As(err, &e) {
		return uint(e), true
	}
	return 0, false
}

func isRV(err error, rv uint) bool {
	got, ok := rvOf(err)
	return ok && got == rv
}

// connCodes are the return values that mean the session, the login or the
// object handles are gone: the session is dropped, the key reconnects.
var connCodes = map[uint]bool{
	pkcs11.CKR_SESSION_HANDLE_INVALID:   true,
	pkcs11.CKR_SESSION_CLOSED:           true,
	pkcs11.CKR_DEVICE_REMOVED:           true,
	pkcs11.CKR_DEVICE_ERROR:             true,
	pkcs11.CKR_TOKEN_NOT_PRESENT:        true,
	pkcs11.CKR_TOKEN_NOT_RECOGNIZED:     true,
	pkcs11.CKR_USER_NOT_LOGGED_IN:       true,
	pkcs11.CKR_OBJECT_HANDLE_INVALID:    true, // SoftHSM: token deleted or re-initialised
	pkcs11.CKR_KEY_HANDLE_INVALID:       true,
	pkcs11.CKR_SLOT_ID_INVALID:          true,
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED: true, // someone else called C_Finalize
}

// pinCodes are the return values of C_Login that mean "wrong PIN".
var pinCodes = map[uint]bool{
	pkcs11.CKR_PIN_INCORRECT: true,
	pkcs11.CKR_PIN_INVALID:   true,
	pkcs11.CKR_PIN_LEN_RANGE: true,
	pkcs11.CKR_PIN_LOCKED:    true,
	pkcs11.CKR_PIN_EXPIRED:   true,
}

// paramCodes are the return values of C_DeriveKey that may mean the token
// wants the peer's point in the other encoding (raw or DER).
var paramCodes = map[uint]bool{
	pkcs11.CKR_MECHANISM_PARAM_INVALID: true,
	pkcs11.CKR_ARGUMENTS_BAD:           true,
	pkcs11.CKR_DOMAIN_PARAMS_INVALID:   true,
}

// templateCodes are the return values of C_GenerateKeyPair that mean a
// template attribute is not accepted for this key type.
var templateCodes = map[uint]bool{
	pkcs11.CKR_ATTRIBUTE_TYPE_INVALID:  true,
	pkcs11.CKR_ATTRIBUTE_VALUE_INVALID: true,
	pkcs11.CKR_TEMPLATE_INCONSISTENT:   true,
	pkcs11.CKR_ATTRIBUTE_READ_ONLY:     true,
}

const defaultPKCS11Sessions = 4

// PKCS11ConfigFromEnv reads a PKCS11Config from the NOISETOR_PKCS11_*
// environment variables. It returns nil, nil when none of them is set, so the
// caller can fall back to a software key, and an error naming the variable
// when one is malformed. Variables that are not set leave their fields
// empty, for the caller to fill in (a command-line flag, say); OpenPKCS11Key
// reports what is still missing. Prefer NOISETOR_PKCS11_PIN_FILE to
// NOISETOR_PKCS11_PIN: the environment is inherited by child processes and,
// on many systems, readable by the same user through /proc.
func PKCS11ConfigFromEnv() (*PKCS11Config, error) {
	var any bool
	get := func(name string) string {
		v := os.Getenv(name)
		if v != "" {
			any = true
		}
		return v
	}
	c := &PKCS11Config{
		Module:      get(EnvPKCS11Module),
		TokenLabel:  get(EnvPKCS11Token),
		TokenSerial: get(EnvPKCS11TokenSerial),
		KeyLabel:    get(EnvPKCS11Key),
		PIN:         get(EnvPKCS11PIN),
		PINFile:     get(EnvPKCS11PINFile),
		InitParams:  get(EnvPKCS11InitParams),
	}
	if v := get(EnvPKCS11KeyID); v != "" {
		id, err := hex.DecodeString(strings.TrimPrefix(strings.ReplaceAll(v, ":", ""), "0x"))
		if err != nil || len(id) == 0 {
			return nil, p11err(nil, nil, "%s is not a hex key ID", EnvPKCS11KeyID)
		}
		c.KeyID = id
	}
	if v := get(EnvPKCS11Curve); v != "" {
		cv, err := parseCurve(strings.ToLower(v))
		if err != nil {
			return nil, p11err(nil, err, "%s", EnvPKCS11Curve)
		}
		c.Curve = cv
	}
	if v := get(EnvPKCS11MaxSessions); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return nil, p11err(nil, nil, "%s must be a positive number", EnvPKCS11MaxSessions)
		}
		c.MaxSessions = n
	}
	if !any {
		return nil, nil
	}
	return c, nil
}

// check validates the configuration and resolves the PIN.
func (c *PKCS11Config) check(generate bool) (pin string, err error) {
	if c == nil {
		return "", p11err(nil, nil, "nil PKCS11Config")
	}
	if c.Module == "" {
		return "", p11err(nil, nil, "no PKCS#11 module configured (PKCS11Config.Module, %s)", EnvPKCS11Module)
	}
	if c.TokenLabel == "" && c.TokenSerial == "" {
		return "", p11err(nil, nil, "no token configured: set a token label or serial (%s, %s)", EnvPKCS11Token, EnvPKCS11TokenSerial)
	}
	if !generate && c.KeyLabel == "" && len(c.KeyID) == 0 {
		return "", p11err(nil, nil, "no key configured: set a key label or ID (%s, %s)", EnvPKCS11Key, EnvPKCS11KeyID)
	}
	if c.Curve != 0 && c.Curve.ecdh() == nil {
		return "", p11err(ErrPKCS11Unsupported, nil, "unknown curve %v", c.Curve)
	}
	if c.MaxSessions < 0 {
		return "", p11err(nil, nil, "MaxSessions is negative")
	}
	switch {
	case c.PIN != "" && c.PINFile != "":
		return "", p11err(nil, nil, "both a PIN and a PIN file are configured; use one")
	case c.PINFile != "":
		return readPINFile(c.PINFile)
	}
	return c.PIN, nil
}

// readPINFile reads the first line of path, which group and others must not
// be able to read. The error never contains the file's contents.
func readPINFile(path string) (string, error) {
	b, err := readPrivateFile(path)
	if err != nil {
		return "", p11err(ErrPKCS11PIN, err, "PIN file")
	}
	line, _, _ := strings.Cut(string(b), "\n")
	line = strings.TrimSuffix(line, "\r")
	if line == "" {
		return "", p11err(ErrPKCS11PIN, nil, "PIN file %s is empty", path)
	}
	return line, nil
}

// p11module is a loaded, initialised PKCS#11 module, shared by every key of
// the process that uses the same library: C_Initialize and C_Finalize are
// process-wide, and so is the login state of a token.
type p11module struct {
	path     string
	params   string // PKCS11Config.InitParams
	ctx      *pkcs11.Ctx
	refs     int  // guarded by p11modules
	finalize bool // we called C_Initialize; guarded by p11modules
	// logins records, per token, the PIN this process logged in with, so a
	// second key on a logged-in token cannot skip the PIN check: C_Login then
	// returns CKR_USER_ALREADY_LOGGED_IN without looking at the PIN.
	logins map[string]*p11login // guarded by p11modules
}

type p11login struct {
	pin      string
	verified bool // pin was accepted by C_Login (not by someone else's login)
	refs     int
}

var p11modules = struct {
	sync.Mutex
	m map[string]*p11module
}{m: map[string]*p11module{}}

// acquireModule loads and initialises the module at path, passing params
// (PKCS11Config.InitParams) to C_Initialize, or takes another reference to it.
func acquireModule(path, params string) (*p11module, error) {
	key := path
	if strings.ContainsRune(path, os.PathSeparator) {
		// Resolve symlinks so that two spellings share one registry entry
		// (dlopen would share the library anyway).
		real, err := filepath.EvalSymlinks(path)
		if err != nil {
			return nil, p11err(ErrPKCS11NotFound, nil, "PKCS#11 module %s does not exist or cannot be read", path)
		}
		if st, err := os.Stat(real); err != nil || st.IsDir() {
			return nil, p11err(ErrPKCS11NotFound, nil, "PKCS#11 module %s is not a file", path)
		}
		key = real
	}
	p11modules.Lock()
	defer p11modules.Unlock()
	if m := p11modules.m[key]; m != nil {
		if m.params != params {
			// One C_Initialize per process: the second configuration
			// would silently get the first one's database.
			return nil, p11err(nil, nil, "PKCS#11 module %s is already in use in this process with other InitParams", path)
		}
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(key)
	if ctx == nil {
		return nil, p11err(ErrPKCS11NotFound, nil, "cannot load %s as a PKCS#11 module (not a shared library with C_GetFunctionList, or for another architecture)", path)
	}
	m := &p11module{path: path, params: params, ctx: ctx, refs: 1, finalize: true, logins: map[string]*p11login{}}
	if err := m.initialize(); err != nil {
		if !isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			ctx.Destroy()
			if isRV(err, pkcs11.CKR_ARGUMENTS_BAD) && params == "" {
				return nil, p11err(nil, err, "initialising module %s (NSS softokn needs its parameters: PKCS11Config.InitParams, %s)", path, EnvPKCS11InitParams)
			}
			// SoftHSM reports a missing or broken SOFTHSM2_CONF as CKR_GENERAL_ERROR.
			return nil, p11err(nil, err, "initialising module %s", path)
		}
		// Someone else in this process (crypto11, say) initialised it: share
		// it and leave C_Finalize to them.
		m.finalize = false
	}
	p11modules.m[key] = m
	return m, nil
}

func (m *p11module) release() {
	p11modules.Lock()
	defer p11modules.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	for k, v := range p11modules.m {
		if v == m {
			delete(p11modules.m, k)
		}
	}
	if m.finalize {
		_ = m.ctx.Finalize()
	}
	m.ctx.Destroy() // after this any call on m.ctx is a SIGSEGV
}

// initialize calls C_Initialize with the module's parameters (OS locking,
// and pReserved for NSS).
func (m *p11module) initialize() error {
	if m.params == "" {
		return call("C_Initialize", m.ctx.Initialize())
	}
	// A NUL-terminated copy in Go memory: it holds no Go pointers, is
	// pinned for the duration of the call, and NSS parses it during
	// C_Initialize without keeping it.
	p := append([]byte(m.params), 0)
	err := m.ctx.Initialize(pkcs11.InitializeWithReserved(unsafe.Pointer(&p[0])))
	runtime.KeepAlive(p)
	return call("C_Initialize", err)
}

// reinitialize calls C_Initialize again after someone else finalised the module.
func (m *p11module) reinitialize() error {
	p11modules.Lock()
	defer p11modules.Unlock()
	err := m.initialize()
	if err == nil {
		m.finalize = true
		return nil
	}
	if isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return nil
	}
	return err
}

// login logs the process in to the token (one login covers every session of
// the process) and records the PIN; see p11module.logins. The returned
// error is a *PKCS11Error or a pkcs11Err, never containing the PIN.
func (m *p11module) login(s pkcs11.SessionHandle, token, pin string, first bool) error {
	err := m.ctx.Login(s, pkcs11.CKU_USER, pin)
	already := isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN)
	if err != nil && !already {
		return call("C_Login", err)
	}
	p11modules.Lock()
	defer p11modules.Unlock()
	rec := m.logins[token]
	switch {
	case rec == nil && !first:
		return nil // only a closed key has no record, and it does not log in
	case rec == nil:
		// When already is true, someone else in this process (another
		// library) logged in and the PIN cannot be checked. That grants
		// nothing new: every session of the process can use the token now.
		rec = &p11login{pin: pin, verified: !already}
		m.logins[token] = rec
	case !already:
		// C_Login checked this PIN (it may have been changed meanwhile).
		rec.pin, rec.verified = pin, true
	case rec.verified && subtle.ConstantTimeCompare([]byte(rec.pin), []byte(pin)) != 1:
		return p11err(ErrPKCS11PIN, &PKCS11Error{Func: "C_Login", Code: pkcs11.CKR_PIN_INCORRECT},
			"logging in to the token: this process is already logged in to it with a different PIN")
	}
	if first {
		rec.refs++
	}
	return nil
}

func (m *p11module) logout(token string) {
	p11modules.Lock()
	defer p11modules.Unlock()
	if rec := m.logins[token]; rec != nil {
		if rec.refs--; rec.refs <= 0 {
			delete(m.logins, token)
		}
	}
}

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

// findSlot finds the token by label and/or serial among the present tokens.
func (k *PKCS11Key) findSlot() (uint, pkcs11.TokenInfo, error) {
	ctx := k.mod.ctx
	slots, err := ctx.GetSlotList(true)
	if isRV(err, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		if err = k.mod.reinitialize(); err == nil {
			slots, err = ctx.GetSlotList(true)
		}
	}
	if err != nil {
		return 0, pkcs11.TokenInfo{}, p11err(nil, call("C_GetSlotList", err), "listing tokens")
	}
	var found []uint
	var info pkcs11.TokenInfo
	var present, matching []string
	for _, sl := range slots {
		ti, err := ctx.GetTokenInfo(sl)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		present = append(present, strconv.Quote(ti.Label))
		if (k.cfg.TokenLabel == "" || ti.Label == k.cfg.TokenLabel) &&
			(k.cfg.TokenSerial == "" || ti.SerialNumber == k.cfg.TokenSerial) {
			found = append(found, sl)
			info = ti
			matching = append(matching, fmt.Sprintf("label %q serial %q", ti.Label, ti.SerialNumber))
		}
	}
	switch len(found) {
	case 0:
		list := "none"
		if len(present) > 0 {
			list = strings.Join(present, ", ")
		}
		return 0, info, p11err(ErrPKCS11NotFound, nil, "no token with %s in module %s (tokens present: %s)", k.tokenSel, k.mod.path, list)
	case 1:
		return found[0], info, nil
	}
	// Advise the selector that was not given; with both given, the tokens
	// cannot be told apart by this API at all.
	var advice string
	switch {
	case k.cfg.TokenSerial == "":
		advice = "select one by serial as well (" + EnvPKCS11TokenSerial + ")"
	case k.cfg.TokenLabel == "":
		advice = "select one by label as well (" + EnvPKCS11Token + ")"
	default:
		advice = "they cannot be told apart: relabel one of them"
	}
	return 0, info, p11err(nil, nil, "%d tokens with %s in module %s (%s); %s",
		len(found), k.tokenSel, k.mod.path, strings.Join(matching, ", "), advice)
}

func (k *PKCS11Key) keyDesc() string {
	switch {
	case k.label != "" && len(k.id) > 0:
		return fmt.Sprintf("%q (id %x)", k.label, k.id)
	case k.label != "":
		return strconv.Quote(k.label)
	}
	return fmt.Sprintf("with id %x", k.id)
}

func (k *PKCS11Key) keyTemplate(class uint) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}
	if len(k.id) > 0 {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_ID, k.id))
	}
	if k.label != "" {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.label))
	}
	return t
}

func findObjects(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := ctx.FindObjectsInit(s, tmpl); err != nil {
		return nil, call("C_FindObjectsInit", err)
	}
	hs, _, err := ctx.FindObjects(s, max)
	ferr := ctx.FindObjectsFinal(s)
	if err != nil {
		return nil, call("C_FindObjects", err)
	}
	if ferr != nil {
		return nil, call("C_FindObjectsFinal", ferr)
	}
	return hs, nil
}

// attr reads one attribute; ok is false when the object does not have it.
func attr(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, typ uint) (v []byte, ok bool, err error) {
	a, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
	switch {
	case isRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID), isRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE):
		return nil, false, nil
	case err != nil:
		return nil, false, call("C_GetAttributeValue", err)
	case a[0].Value == nil:
		return nil, false, nil
	}
	return a[0].Value, true, nil
}

func ckBool(v []byte) bool { return len(v) == 1 && v[0] != 0 }

func ckUlong(v []byte) uint {
	switch len(v) {
	case 8:
		return uint(binary.NativeEndian.Uint64(v))
	case 4:
		return uint(binary.NativeEndian.Uint32(v))
	}
	return ^uint(0)
}

func oneOf(v []byte, set [][]byte) bool {
	for _, s := range set {
		if bytes.Equal(v, s) {
			return true
		}
	}
	return false
}

// foundKey is a private key that findKey has checked.
type foundKey struct {
	h     pkcs11.ObjectHandle
	pub   PublicKey
	id    []byte
	label string
}

// findKey finds the private key, checks its type and attributes, reads its
// public key and checks that the pair matches. When the key has been opened
// before (reconnecting), the public key must be the one it had.
func (k *PKCS11Key) findKey(s pkcs11.SessionHandle) (foundKey, error) {
	ctx := k.mod.ctx
	hs, err := findObjects(ctx, s, k.keyTemplate(pkcs11.CKO_PRIVATE_KEY), 2)
	if err != nil {
		return foundKey{}, p11err(nil, err, "looking for key %s on token %s", k.keyDesc(), k.tokenSel)
	}
	switch len(hs) {
	case 0:
		return foundKey{}, p11err(ErrPKCS11NotFound, nil, "no private key %s on token %s", k.keyDesc(), k.tokenSel)
	case 1:
	default:
		return foundKey{}, p11err(nil, nil, "more than one private key %s on token %s; select it by label and ID", k.keyDesc(), k.tokenSel)
	}
	f := foundKey{h: hs[0], id: k.id, label: k.label}
	h := f.h
	fail := func(kind, cause error, format string, args ...any) (foundKey, error) {
		return foundKey{}, p11err(kind, cause, "key %s on token %s: "+format, append([]any{k.keyDesc(), k.tokenSel}, args...)...)
	}
	ktype, ok, err := attr(ctx, s, h, pkcs11.CKA_KEY_TYPE)
	if err != nil || !ok {
		return fail(nil, err, "cannot read CKA_KEY_TYPE")
	}
	params, _, err := attr(ctx, s, h, pkcs11.CKA_EC_PARAMS)
	if err != nil {
		return fail(nil, err, "cannot read CKA_EC_PARAMS")
	}
	var curve Curve
	switch t := ckUlong(ktype); {
	case t == ckkECMontgomery && (params == nil || oneOf(params, ecParamsX25519)):
		curve = X25519
	case t == ckkECEdwards && oneOf(params, ecParamsX25519):
		// SoftHSM 2.5/2.6 store X25519 keys as Edwards-type keys.
		curve = X25519
	case t == pkcs11.CKK_EC && oneOf(params, ecParamsP256):
		curve = P256
	case t == pkcs11.CKK_EC && bytes.Equal(params, oidX25519NSS):
		// NSS before PKCS#11 3.0 support stores X25519 keys as CKK_EC
		// with its own OID; the base-point check below proves that the
		// token computes X25519 with it.
		curve = X25519
	case t == ckkECEdwards:
		return fail(ErrPKCS11Unsupported, nil, "is an Edwards (signing) key, not an X25519 key (CKA_EC_PARAMS %x)", params)
	default:
		return fail(ErrPKCS11Unsupported, nil, "unsupported key type 0x%x with CKA_EC_PARAMS %x; want X25519 or P-256", t, params)
	}
	if v, ok, err := attr(ctx, s, h, pkcs11.CKA_DERIVE); err != nil {
		return fail(nil, err, "cannot read CKA_DERIVE")
	} else if !ok || !ckBool(v) {
		return fail(ErrPKCS11KeyPolicy, nil, "does not allow key derivation (CKA_DERIVE is false), so it cannot do Diffie-Hellman; generate a key with derive permission")
	}
	// A key that can leave the token defeats the point of keeping it there.
	if v, ok, _ := attr(ctx, s, h, pkcs11.CKA_EXTRACTABLE); ok && ckBool(v) {
		return fail(ErrPKCS11KeyPolicy, nil, "is extractable (CKA_EXTRACTABLE is true); refusing a private key that can be read out of the token")
	}
	if v, ok, _ := attr(ctx, s, h, pkcs11.CKA_SENSITIVE); ok && !ckBool(v) {
		return fail(ErrPKCS11KeyPolicy, nil, "is not sensitive (CKA_SENSITIVE is false); refusing a private key that can be read out of the token")
	}
	if len(f.id) == 0 {
		f.id, _, _ = attr(ctx, s, h, pkcs11.CKA_ID)
	}
	if f.label == "" {
		v, _, _ := attr(ctx, s, h, pkcs11.CKA_LABEL)
		f.label = string(v)
	}

	// The public half: the public key object with the same CKA_ID and label,
	// or CKA_EC_POINT on the private object, which some tokens have.
	var point []byte
	{
		pt := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY)}
		if len(f.id) > 0 {
			pt = append(pt, pkcs11.NewAttribute(pkcs11.CKA_ID, f.id))
		}
		if f.label != "" {
			pt = append(pt, pkcs11.NewAttribute(pkcs11.CKA_LABEL, f.label))
		}
		ph, err := findObjects(ctx, s, pt, 2)
		if err != nil {
			return fail(nil, err, "looking for its public key")
		}
		if len(ph) == 1 {
			if point, _, err = attr(ctx, s, ph[0], pkcs11.CKA_EC_POINT); err != nil {
				return fail(nil, err, "reading its public key")
			}
		}
	}
	if point == nil {
		point, _, _ = attr(ctx, s, h, pkcs11.CKA_EC_POINT)
	}
	// DH with the base point gives the public key (X25519) or its
	// x-coordinate (P-256): it proves that the public key belongs to this
	// private key and that derivation works, before any peer relies on it.
	base := basePoint(curve)
	fromBase, err := k.deriveRaw(s, h, curve, base)
	if err != nil {
		if noECDH(err) {
			return fail(ErrPKCS11Unsupported, err, "the token cannot do ECDH (CKM_ECDH1_DERIVE) with this key; "+
				"tpm2-pkcs11 and p11-kit remoting, for two, have none")
		}
		return fail(nil, err, "Diffie-Hellman with the base point failed")
	}
	var pub PublicKey
	switch {
	case point != nil:
		raw, err := decodeECPoint(curve, point)
		if err != nil {
			return fail(ErrPKCS11Unsupported, err, "cannot decode its CKA_EC_POINT")
		}
		if pub, err = NewPublicKey(curve, raw); err != nil {
			return fail(nil, err, "its public key is invalid")
		}
		want := raw
		if curve == P256 {
			want = raw[1:33]
		}
		if !bytes.Equal(fromBase, want) {
			return fail(nil, nil, "its public key object does not belong to it")
		}
	case curve == X25519:
		if pub, err = NewPublicKey(curve, fromBase); err != nil {
			return fail(nil, err, "its public key is invalid")
		}
	default:
		return fail(ErrPKCS11NotFound, nil, "no public key object with the same ID or label")
	}
	if !k.pub.IsZero() && pub != k.pub {
		// Reconnecting found a different key under the same name: never
		// switch identities silently.
		return fail(ErrPKCS11NotFound, nil, "now holds a different key (%s, was %s)", pub, k.pub)
	}
	f.pub = pub
	return f, nil
}

// noECDH reports whether err, from C_DeriveKey, says that the token has no
// ECDH at all for the key, rather than that this one call failed.
func noECDH(err error) bool {
	var pe *PKCS11Error
	if !errors.As(err, &pe) || pe.Func != "C_DeriveKey" {
		return false
	}
	switch pe.Code {
	case pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_FUNCTION_NOT_SUPPORTED, pkcs11.CKR_KEY_TYPE_INCONSISTENT:
		return true
	}
	return false
}

// basePoint returns the curve's generator in the encoding C_DeriveKey takes.
func basePoint(c Curve) []byte {
	if c == X25519 {
		b := make([]byte, 32)
		b[0] = 9
		return b
	}
	// P-256 generator, uncompressed (SEC 2, 2.4.2).
	g, _ := hex.DecodeString("04" +
		"6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296" +
		"4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")
	return g
}

// decodeECPoint turns CKA_EC_POINT into the raw public key. PKCS#11 2.40
// makes it a DER OCTET STRING; PKCS#11 3.0 makes Montgomery points raw bytes.
// SoftHSM 2.6 DER-wraps both curves. The lengths differ, so accept both.
func decodeECPoint(c Curve, v []byte) ([]byte, error) {
	n := c.publicKeyLen()
	switch {
	case len(v) == n:
		return bytes.Clone(v), nil
	case len(v) == n+2 && v[0] == 0x04 && int(v[1]) == n:
		return bytes.Clone(v[2:]), nil
	}
	return nil, fmt.Errorf("%d-byte CKA_EC_POINT for %v", len(v), c)
}

// derOctet wraps b in a DER OCTET STRING (b is shorter than 128 bytes).
func derOctet(b []byte) []byte { return append([]byte{0x04, byte(len(b))}, b...) }

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
