package noisetor

// Declarations shared by the cgo build (hsm_pkcs11.go, the real PKCS#11 key)
// and the pure-Go build (hsm_pkcs11_nocgo.go, which can only refuse).

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
)

// Errors from PKCS#11 keys. Every one of them matches ErrPKCS11 with
// errors.Is; most also match one of the more specific errors below, and a
// failed call into the module also carries a *PKCS11Error.
var (
	// ErrPKCS11 is matched by every error about a PKCS#11 key.
	ErrPKCS11 = errors.New("noisetor: pkcs11 error")
	// ErrPKCS11NotFound: the module, token or key does not exist.
	ErrPKCS11NotFound = errors.New("noisetor: pkcs11: not found")
	// ErrPKCS11PIN: the token refused the PIN, or a PIN is needed and none was given.
	ErrPKCS11PIN = errors.New("noisetor: pkcs11: PIN rejected")
	// ErrPKCS11Unavailable: the token or its session went away (removed,
	// reinitialised, device error). Later operations try to reconnect.
	ErrPKCS11Unavailable = errors.New("noisetor: pkcs11: token unavailable")
	// ErrPKCS11Unsupported: the key type, curve or token is not supported
	// (a token without ECDH, such as tpm2-pkcs11, or behind p11-kit
	// remoting), or this binary was built without cgo.
	ErrPKCS11Unsupported = errors.New("noisetor: pkcs11: not supported")
	// ErrPKCS11KeyPolicy: the key exists but its attributes are refused: it
	// is extractable or not sensitive (it could be read out of the token),
	// or it does not allow derivation (CKA_DERIVE). Make a new key.
	ErrPKCS11KeyPolicy = errors.New("noisetor: pkcs11: key attributes refused")
	// ErrPKCS11Closed: the key has been closed.
	ErrPKCS11Closed = errors.New("noisetor: pkcs11: key is closed")
)

// A PKCS11Error is a PKCS#11 function that returned an error code. Errors
// from PKCS#11 keys wrap it; get it with errors.As.
type PKCS11Error struct {
	Func string // the PKCS#11 function, such as "C_Login"
	Code uint   // its CK_RV, such as 0xA0 (CKR_PIN_INCORRECT)
}

// Error returns, for example, "C_Login: CKR_PIN_INCORRECT".
func (e *PKCS11Error) Error() string { return e.Func + ": " + e.Name() }

// PKCS11Config selects a PKCS#11 module, a token in it, a key on the token
// and the PIN. Its String, Format and LogValue methods never show the PIN.
type PKCS11Config struct {
	// Module is the path of the PKCS#11 module, the shared library the token
	// vendor ships, such as /usr/lib/softhsm/libsofthsm2.so.
	Module string

	// TokenLabel and TokenSerial select the token; set one or both.
	TokenLabel  string
	TokenSerial string

	// KeyLabel and KeyID (CKA_LABEL, CKA_ID) select the key; set one or
	// both. GeneratePKCS11Key gives the new key both, with a random 16-byte
	// ID if KeyID is empty.
	KeyLabel string
	KeyID    []byte

	// PIN is the user PIN. PINFile names a file whose first line is the PIN
	// instead; like a private key file, it must not be readable by group or
	// others. Set at most one. With neither, the token is not logged in to,
	// which works only for tokens that need no login.
	//
	// PIN is not marshalled to JSON, and the print methods below hide it.
	// But fmt cannot call those methods on a PKCS11Config (or a pointer to
	// one) in an unexported field of another struct, and then prints its
	// fields, PIN included; %p and %w do the same. Prefer PINFile.
	PIN     string `json:"-"`
	PINFile string

	// Curve is the curve of a new key for GeneratePKCS11Key (default
	// X25519). For OpenPKCS11Key, when set, the key must be on this curve.
	Curve Curve

	// MaxSessions bounds the token sessions used for DH at once, and so the
	// DH operations in flight on the token. Default: 4.
	MaxSessions int

	// InitParams, when set, is passed to C_Initialize as the pReserved
	// member of CK_C_INITIALIZE_ARGS, a NUL-terminated string. NSS softokn
	// needs it (it fails with CKR_ARGUMENTS_BAD otherwise), for example
	// "configdir='sql:/etc/noisetor/nssdb' certPrefix='' keyPrefix=''
	// secmod='secmod.db' flags=". Other modules ignore it or want it empty.
	// A module is initialised once per process: every key of one module
	// must use the same InitParams.
	InitParams string
}

// String describes the configuration without the PIN.
func (c PKCS11Config) String() string {
	pin := "unset"
	if c.PIN != "" {
		pin = "set"
	}
	return fmt.Sprintf("PKCS11Config{Module:%q TokenLabel:%q TokenSerial:%q KeyLabel:%q KeyID:%x PIN:<%s> PINFile:%q Curve:%v MaxSessions:%d InitParams:%q}",
		c.Module, c.TokenLabel, c.TokenSerial, c.KeyLabel, c.KeyID, pin, c.PINFile, c.Curve, c.MaxSessions, c.InitParams)
}

// GoString is String, so %#v does not show the PIN either.
func (c PKCS11Config) GoString() string { return c.String() }

// Format prints String for every verb.
func (c PKCS11Config) Format(f fmt.State, _ rune) { io.WriteString(f, c.String()) }

// LogValue implements slog.LogValuer, so that log/slog never shows the PIN.
func (c PKCS11Config) LogValue() slog.Value { return slog.StringValue(c.String()) }

// Environment variables read by PKCS11ConfigFromEnv.
const (
	EnvPKCS11Module      = "NOISETOR_PKCS11_MODULE"
	EnvPKCS11Token       = "NOISETOR_PKCS11_TOKEN"        // token label
	EnvPKCS11TokenSerial = "NOISETOR_PKCS11_TOKEN_SERIAL" // token serial number
	EnvPKCS11Key         = "NOISETOR_PKCS11_KEY"          // key label
	EnvPKCS11KeyID       = "NOISETOR_PKCS11_KEY_ID"       // key ID, hex
	EnvPKCS11PIN         = "NOISETOR_PKCS11_PIN"
	EnvPKCS11PINFile     = "NOISETOR_PKCS11_PIN_FILE"
	EnvPKCS11Curve       = "NOISETOR_PKCS11_CURVE" // x25519 or p256
	EnvPKCS11MaxSessions = "NOISETOR_PKCS11_MAX_SESSIONS"
	EnvPKCS11InitParams  = "NOISETOR_PKCS11_INIT_PARAMS" // PKCS11Config.InitParams (NSS)
)
