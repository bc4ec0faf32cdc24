//go:build cgo

package noisetor

import (
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// The PKCS#11 configuration from the environment, and the registry of loaded
// modules with their logins: a module is initialized once per process and
// shared by every key on it.

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
	pin, err := loadSecretFile(path, kindPIN, func(b []byte) (string, error) {
		line, _, _ := strings.Cut(string(b), "\n")
		line = strings.TrimSuffix(line, "\r")
		if line == "" {
			return "", errors.New("it is empty")
		}
		return line, nil
	})
	if err != nil {
		return "", p11err(ErrPKCS11PIN, err, "PIN file")
	}
	return pin, nil
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
