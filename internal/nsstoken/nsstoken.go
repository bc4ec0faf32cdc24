//go:build cgo

// Package nsstoken creates throw-away NSS softokn databases for tests: the
// PKCS#11 module of Mozilla's NSS (libsoftokn3.so, Debian package libnss3)
// over a new key database in a directory of its own, never the user's.
//
// NSS is initialised once per process, with the database directory in
// C_Initialize's reserved argument (InitParams). New initialises it, sets
// the PIN and finalises it again, so call it before any key of the module is
// opened in the process, and open the keys with the database's InitParams.
package nsstoken

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// ErrNotInstalled is returned when libsoftokn3.so cannot be found.
var ErrNotInstalled = errors.New("nsstoken: NSS softokn is not installed (Debian/Ubuntu: apt-get install libnss3)")

// ModuleEnv names an environment variable that overrides the module path.
const ModuleEnv = "NSS_SOFTOKN_MODULE"

// TokenLabel is the label of the token that holds the database's keys. (The
// module's other token, "NSS Generic Crypto Services", has only session
// objects.) Both report the serial number "0000000000000000".
const TokenLabel = "NSS Certificate DB"

// Module returns the path of libsoftokn3.so: $NSS_SOFTOKN_MODULE if set, else
// the first of the usual install locations that exists.
func Module() (string, error) {
	if p := os.Getenv(ModuleEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%w: %s=%s: %v", ErrNotInstalled, ModuleEnv, p, err)
		}
		return p, nil
	}
	c, _ := filepath.Glob("/usr/lib/*-linux-gnu*/libsoftokn3.so")
	c = append(c, "/usr/lib64/libsoftokn3.so", "/usr/lib/libsoftokn3.so", "/usr/lib/nss/libsoftokn3.so")
	for _, p := range c {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: libsoftokn3.so not found on %s (set %s)", ErrNotInstalled, runtime.GOOS, ModuleEnv)
}

// A DB is an NSS key database with its user PIN set.
type DB struct {
	Dir        string // the database directory (cert9.db, key4.db)
	Module     string // path of libsoftokn3.so
	InitParams string // for PKCS11Config.InitParams
	PIN        string // the user PIN; "" makes a token that needs no login
}

// New creates a database in dir (created if needed; it must not hold a
// database yet) with user PIN pin.
func New(dir, pin string) (*DB, error) {
	mod, err := Module()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("nsstoken: %w", err)
	}
	if strings.ContainsAny(dir, "'\"") {
		return nil, fmt.Errorf("nsstoken: directory %q has a quote in it", dir)
	}
	db := &DB{
		Dir:        dir,
		Module:     mod,
		InitParams: fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags=", dir),
		PIN:        pin,
	}
	ctx := pkcs11.New(mod)
	if ctx == nil {
		return nil, fmt.Errorf("nsstoken: cannot load %s", mod)
	}
	defer ctx.Destroy()
	params := append([]byte(db.InitParams), 0)
	err = ctx.Initialize(pkcs11.InitializeWithReserved(unsafe.Pointer(&params[0])))
	runtime.KeepAlive(params)
	if err != nil {
		return nil, fmt.Errorf("nsstoken: C_Initialize: %w (is the module already in use in this process?)", err)
	}
	defer ctx.Finalize()
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return nil, fmt.Errorf("nsstoken: C_GetSlotList: %w", err)
	}
	for _, sl := range slots {
		ti, err := ctx.GetTokenInfo(sl)
		if err != nil || ti.Label != TokenLabel {
			continue
		}
		s, err := ctx.OpenSession(sl, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return nil, fmt.Errorf("nsstoken: C_OpenSession: %w", err)
		}
		defer ctx.CloseSession(s)
		// A new database has an empty security-officer password.
		if err := ctx.Login(s, pkcs11.CKU_SO, ""); err != nil {
			return nil, fmt.Errorf("nsstoken: C_Login(SO): %w (is %s a new database?)", err, dir)
		}
		if err := ctx.InitPIN(s, pin); err != nil {
			return nil, fmt.Errorf("nsstoken: C_InitPIN: %w", err)
		}
		if err := ctx.Logout(s); err != nil {
			return nil, fmt.Errorf("nsstoken: C_Logout: %w", err)
		}
		return db, nil
	}
	return nil, fmt.Errorf("nsstoken: no token %q in %s", TokenLabel, mod)
}
