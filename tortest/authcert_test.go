package tortest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testTor returns the tor that Start would run by default: the system tor,
// or in an embedtor build the embedded one.
func testTor(t *testing.T) torExe {
	t.Helper()
	tor, err := findTor("")
	if err != nil {
		if required() {
			t.Fatalf("%v (required: %s is set)", err, requiredBy())
		}
		t.Skip(err)
	}
	return tor
}

// loadAuthorityKeys has tor load an authority's v3 signing key and
// certificate from keysDir, as an authority does when it starts (tor
// --list-fingerprint on an authority configuration runs the same key
// initialization and exits), and returns tor's output and whether it
// accepted them.
func loadAuthorityKeys(t *testing.T, tor torExe, dataDir, v3ident string) (string, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A private address needs TestingTorNetwork, which needs a DirAuthority
	// line; the relay fingerprint in it is made up (tor adds itself).
	cmd := tor.command(ctx, "--list-fingerprint", "--DataDirectory", dataDir, "--TestingTorNetwork", "1",
		"--DirAuthority", "auth orport=1 no-v2 v3ident="+v3ident+" 127.0.0.1:7000 "+strings.Repeat("00", 20),
		"--ORPort", "127.0.0.1:1", "--DirPort", "127.0.0.1:2", "--Address", "127.0.0.1", "--ContactInfo", "auth@tortest.invalid",
		"--AuthoritativeDirectory", "1", "--V3AuthoritativeDirectory", "1",
		"--GeoIPFile", "", "--GeoIPv6File", "",
		"--ignore-missing-torrc", "-f", filepath.Join(dataDir, "no-torrc"))
	out, err := cmd.CombinedOutput()
	return string(out), err == nil
}

// TestAuthorityCertificate: tor accepts the certificate and signing key
// that writeAuthorityKeys makes, and refuses them when either signature is
// broken or the signing key is not the certified one.
func TestAuthorityCertificate(t *testing.T) {
	tor := testTor(t)
	newDataDir := func(t *testing.T) (dataDir, keys string) {
		dataDir = t.TempDir()
		keys = filepath.Join(dataDir, "keys")
		if err := os.Mkdir(keys, 0o700); err != nil {
			t.Fatal(err)
		}
		return dataDir, keys
	}
	dataDir, keys := newDataDir(t)
	fp, err := writeAuthorityKeys(keys, "127.0.0.1:7000", time.Now(), 365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPath := filepath.Join(keys, "authority_certificate")
	if got, err := fieldAfter(certPath, "fingerprint"); err != nil || got != fp {
		t.Errorf("certificate fingerprint %q (%v), writeAuthorityKeys returned %q", got, err, fp)
	}
	for _, f := range []string{"authority_signing_key", "authority_certificate"} {
		if st, err := os.Stat(filepath.Join(keys, f)); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, %v; want mode 0600", f, st.Mode(), err)
		}
	}
	if _, err := os.Stat(filepath.Join(keys, "authority_identity_key")); !os.IsNotExist(err) {
		t.Errorf("the identity key was written (%v)", err)
	}
	out, ok := loadAuthorityKeys(t, tor, dataDir, fp)
	if !ok {
		t.Fatalf("tor refused the certificate:\n%s", out)
	}
	cert, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatal(err)
	}
	signingKey, err := os.ReadFile(filepath.Join(keys, "authority_signing_key"))
	if err != nil {
		t.Fatal(err)
	}

	// flip changes the last byte of the named PEM object of the certificate.
	flip := func(typ string) []byte {
		begin := []byte("-----BEGIN " + typ + "-----\n")
		i := bytes.Index(cert, begin)
		if i < 0 {
			t.Fatalf("no %s in the certificate", typ)
		}
		blk, rest := pem.Decode(cert[i:])
		if blk == nil {
			t.Fatalf("%s does not decode", typ)
		}
		blk.Bytes[len(blk.Bytes)-1] ^= 1
		return append(append(append([]byte(nil), cert[:i]...), pem.EncodeToMemory(blk)...), rest...)
	}
	otherKey, err := rsa.GenerateKey(rand.Reader, authSigningBits)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, want    string
		cert, signing []byte
	}{
		{"certification signature", "Unable to parse certificate", flip("SIGNATURE"), signingKey},
		{"cross-certificate", "Unable to parse certificate", flip("ID SIGNATURE"), signingKey},
		{"other signing key", "does not match signing key in certificate", cert,
			pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(otherKey)})},
	} {
		t.Run(c.name, func(t *testing.T) {
			dataDir, keys := newDataDir(t)
			if err := os.WriteFile(filepath.Join(keys, "authority_certificate"), c.cert, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(keys, "authority_signing_key"), c.signing, 0o600); err != nil {
				t.Fatal(err)
			}
			out, ok := loadAuthorityKeys(t, tor, dataDir, fp)
			if ok || !strings.Contains(out, c.want) {
				t.Fatalf("tor accepted it or said something else (ok %v, want %q):\n%s", ok, c.want, out)
			}
		})
	}
}
