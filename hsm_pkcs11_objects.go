//go:build cgo

package noisetor

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
)

// Finding the token, its key objects and their attributes; EC point encodings.

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
