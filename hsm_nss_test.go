//go:build cgo

package noisetor

import (
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/noisetor/noisetor/internal/nsstoken"
)

// The tests in this file run against NSS softokn (libsoftokn3.so, Debian's
// libnss3), a module that differs from SoftHSM where it matters: it needs
// its parameters in C_Initialize's reserved argument, without a password its
// key database needs no login, both of its tokens have the serial number
// 0000000000000000, and before PKCS#11 3.0 support (NSS 3.110) it makes
// X25519 keys as CKK_EC keys with the OID 1.3.6.1.4.1.11591.15.1. They are
// skipped when NSS is not installed.

const nssPIN = "nss-Pw7-test"

// nssDB makes a new NSS database with user PIN pin. Like hsmStore, it must
// run before the test opens any key.
func nssDB(t *testing.T, pin string) *nsstoken.DB {
	t.Helper()
	if _, err := nsstoken.Module(); err != nil {
		t.Skipf("skipping NSS test: %v", err)
	}
	p11modules.Lock()
	loaded := len(p11modules.m)
	p11modules.Unlock()
	if loaded != 0 {
		t.Fatal("a PKCS#11 module is still loaded: an earlier test did not Close its keys")
	}
	db, err := nsstoken.New(t.TempDir(), pin)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func nssCfg(db *nsstoken.DB, keyLabel string) *PKCS11Config {
	return &PKCS11Config{Module: db.Module, InitParams: db.InitParams, TokenLabel: nsstoken.TokenLabel,
		KeyLabel: keyLabel, PIN: db.PIN}
}

// A database without a password: no PIN at all. Keys of both curves are
// made and used; the X25519 key is NSS's own CKK_EC kind and computes
// RFC 7748 X25519.
func TestPKCS11NSSNoLogin(t *testing.T) {
	db := nssDB(t, "")
	for _, c := range hsmCurves() {
		cfg := nssCfg(db, "nss-"+c.String())
		cfg.Curve = c
		k := hsmGenerate(t, cfg)
		if k.PublicKey().Curve() != c {
			t.Fatalf("made a %v key, want %v", k.PublicKey().Curve(), c)
		}
		hsmCheckDH(t, k, 20)
		k2 := hsmOpen(t, cfg)
		if k2.PublicKey() != k.PublicKey() {
			t.Fatalf("opened %v, made %v", k2.PublicKey(), k.PublicKey())
		}
		hsmCheckDH(t, k2, 2)

		// What the key is on the token: derive only, and for X25519 the
		// CKK_EC form with NSS's OID (this NSS has no CKM_EC_MONTGOMERY_*;
		// a newer one would have used it).
		k.st.Lock()
		s := k.loginS
		ctx := k.mod.ctx
		ktype, _, err1 := attr(ctx, s, k.handle, pkcs11.CKA_KEY_TYPE)
		params, _, err2 := attr(ctx, s, k.handle, pkcs11.CKA_EC_PARAMS)
		flags := map[uint]bool{}
		for _, a := range []uint{pkcs11.CKA_DERIVE, pkcs11.CKA_DECRYPT, pkcs11.CKA_UNWRAP, pkcs11.CKA_SIGN, pkcs11.CKA_EXTRACTABLE} {
			v, _, _ := attr(ctx, s, k.handle, a)
			flags[a] = ckBool(v)
		}
		k.st.Unlock()
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		if !flags[pkcs11.CKA_DERIVE] || flags[pkcs11.CKA_DECRYPT] || flags[pkcs11.CKA_UNWRAP] || flags[pkcs11.CKA_SIGN] || flags[pkcs11.CKA_EXTRACTABLE] {
			t.Errorf("%v key attributes %v, want derive only", c, flags)
		}
		if c == X25519 && ckUlong(ktype) == pkcs11.CKK_EC {
			if string(params) != string(oidX25519NSS) {
				t.Errorf("x25519 CKK_EC key with CKA_EC_PARAMS %x", params)
			}
			t.Logf("x25519 key on NSS is CKK_EC with OID 1.3.6.1.4.1.11591.15.1")
		}
		k.Close()
		k2.Close()
	}

	// Both NSS tokens have the same serial: selecting by serial alone is
	// ambiguous, and the advice is to give the label.
	cfg := nssCfg(db, "nss-x25519")
	cfg.TokenLabel, cfg.TokenSerial = "", "0000000000000000"
	_, err := OpenPKCS11Key(cfg)
	if err == nil || !strings.Contains(err.Error(), "select one by label as well") ||
		!strings.Contains(err.Error(), nsstoken.TokenLabel) {
		t.Fatalf("selecting by the shared serial: %v", err)
	}
}

// A database with a password: a PIN is needed, and the wrong or a missing
// one is ErrPKCS11PIN. Without InitParams NSS refuses to initialise, and the
// error says what is missing.
func TestPKCS11NSSLogin(t *testing.T) {
	db := nssDB(t, nssPIN)
	cfg := nssCfg(db, "nss-login")
	k := hsmGenerate(t, cfg)
	hsmCheckDH(t, k, 5)
	k.Close()
	for name, mod := range map[string]func(*PKCS11Config){
		"no PIN":    func(c *PKCS11Config) { c.PIN = "" },
		"wrong PIN": func(c *PKCS11Config) { c.PIN = "nss-wrong" },
	} {
		c := *cfg
		mod(&c)
		if _, err := OpenPKCS11Key(&c); !errors.Is(err, ErrPKCS11PIN) || strings.Contains(err.Error(), nssPIN) {
			t.Errorf("%s: %v", name, err)
		}
	}
	c := *cfg
	c.InitParams = ""
	_, err := OpenPKCS11Key(&c)
	if err == nil || !strings.Contains(err.Error(), "InitParams") {
		t.Fatalf("without InitParams: %v", err)
	}
	t.Logf("without InitParams: %v", err)
	hsmCheckDH(t, hsmOpen(t, cfg), 2)
}
