//go:build cgo

package noisetor

import (
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// PKCS#11 errors: the return codes, their names and the error kinds they map to.

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
	return e.msg + ": " + unprefixed(e.cause)
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
