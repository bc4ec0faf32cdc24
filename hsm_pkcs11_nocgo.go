//go:build !cgo

package noisetor

// PKCS#11 needs cgo (github.com/miekg/pkcs11 loads the module with dlopen).
// This file gives pure-Go builds the same API, whose constructors fail with
// an error matching ErrPKCS11Unsupported. Shared declarations are in hsm.go.

import (
	"fmt"
	"os"
	"strings"
)

// PKCS11Available reports whether this binary can use PKCS#11 tokens: false,
// it was built without cgo.
func PKCS11Available() bool { return false }

// errNoCgo is returned by every PKCS#11 constructor in a build without cgo.
var errNoCgo = fmt.Errorf("%w: PKCS#11 keys are not available: this binary was built without cgo (CGO_ENABLED=0); rebuild with CGO_ENABLED=1 and a C compiler", ErrPKCS11Unsupported)

// Name returns the hexadecimal return value (names need the cgo build).
func (e *PKCS11Error) Name() string { return fmt.Sprintf("CKR_0x%X", e.Code) }

// PKCS11ConfigFromEnv returns nil, nil when no NOISETOR_PKCS11_* variable is
// set, and otherwise an error: this build cannot use PKCS#11.
func PKCS11ConfigFromEnv() (*PKCS11Config, error) {
	for _, kv := range os.Environ() {
		if name, v, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "NOISETOR_PKCS11_") && v != "" {
			return nil, errNoCgo
		}
	}
	return nil, nil
}

// A PKCS11Key is a StaticKey in a PKCS#11 token. This build cannot make one.
type PKCS11Key struct{ _ int }

// OpenPKCS11Key fails: this binary was built without cgo.
func OpenPKCS11Key(*PKCS11Config) (*PKCS11Key, error) { return nil, errNoCgo }

// GeneratePKCS11Key fails: this binary was built without cgo.
func GeneratePKCS11Key(*PKCS11Config) (*PKCS11Key, error) { return nil, errNoCgo }

// PublicKey returns the zero PublicKey.
func (k *PKCS11Key) PublicKey() PublicKey { return PublicKey{} }

// DH fails: this binary was built without cgo.
func (k *PKCS11Key) DH(PublicKey) ([]byte, error) { return nil, errNoCgo }

// ID returns nil.
func (k *PKCS11Key) ID() []byte { return nil }

// Label returns "".
func (k *PKCS11Key) Label() string { return "" }

// Close does nothing.
func (k *PKCS11Key) Close() error { return nil }

// String describes the key.
func (k PKCS11Key) String() string { return "noisetor.PKCS11Key(unavailable: built without cgo)" }

var _ StaticKey = (*PKCS11Key)(nil)
