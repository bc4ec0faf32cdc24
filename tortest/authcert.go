package tortest

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The key sizes tor-gencert uses. tor accepts any size for both.
const (
	authIdentityBits = 3072
	authSigningBits  = 2048
)

// writeAuthorityKeys does for the embedded tor what tor-gencert does for the
// system one: it creates a directory authority's v3 identity key and signing
// key, and writes the signing key and the key certificate (dir-spec,
// "Directory authority key certificates", dir-key-certificate-version 3)
// into keysDir as authority_signing_key and authority_certificate. It
// returns the identity fingerprint, the v3ident of the DirAuthority line.
//
// The identity key signs the certificate and is then dropped: nothing ever
// re-certifies a test authority, so it is not written. tor checks the
// result when the authority starts (both signatures, the fingerprint, and
// that the signing key matches the certificate) and refuses to run on a bad
// one, so a mistake here stops the network rather than going unnoticed.
func writeAuthorityKeys(keysDir, dirAddr string, now time.Time, lifetime time.Duration) (fingerprint string, err error) {
	type result struct {
		k   *rsa.PrivateKey
		err error
	}
	idc := make(chan result, 1)
	go func() {
		k, err := rsa.GenerateKey(rand.Reader, authIdentityBits)
		idc <- result{k, err}
	}()
	signing, err := rsa.GenerateKey(rand.Reader, authSigningBits)
	id := <-idc
	if err == nil {
		err = id.err
	}
	if err != nil {
		return "", fmt.Errorf("tortest: generating the authority's keys: %w", err)
	}
	cert, fingerprint, err := authorityCertificate(id.k, signing, dirAddr, now, lifetime)
	if err != nil {
		return "", err
	}
	sk := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(signing)})
	if err := os.WriteFile(filepath.Join(keysDir, "authority_signing_key"), sk, 0o600); err != nil {
		return "", fmt.Errorf("tortest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(keysDir, "authority_certificate"), cert, 0o600); err != nil {
		return "", fmt.Errorf("tortest: %w", err)
	}
	return fingerprint, nil
}

// authorityCertificate returns the key certificate in which identity
// certifies signing, and the identity fingerprint.
//
// Both signatures are tor's RSA signatures: PKCS #1 v1.5 padding around a
// bare SHA-1 digest, without the DigestInfo of a standard PKCS #1
// signature (rsa.SignPKCS1v15 with hash 0).
func authorityCertificate(identity, signing *rsa.PrivateKey, dirAddr string, now time.Time, lifetime time.Duration) (cert []byte, fingerprint string, err error) {
	idDER := x509.MarshalPKCS1PublicKey(&identity.PublicKey)
	idDigest := sha1.Sum(idDER) // H(KP_auth_id_rsa)
	fingerprint = strings.ToUpper(hex.EncodeToString(idDigest[:]))
	const isoTime = "2006-01-02 15:04:05"
	var b bytes.Buffer
	b.WriteString("dir-key-certificate-version 3\n")
	if dirAddr != "" {
		b.WriteString("dir-address " + dirAddr + "\n")
	}
	b.WriteString("fingerprint " + fingerprint + "\n")
	b.WriteString("dir-key-published " + now.UTC().Format(isoTime) + "\n")
	b.WriteString("dir-key-expires " + now.Add(lifetime).UTC().Format(isoTime) + "\n")
	b.WriteString("dir-identity-key\n")
	pem.Encode(&b, &pem.Block{Type: "RSA PUBLIC KEY", Bytes: idDER})
	b.WriteString("dir-signing-key\n")
	pem.Encode(&b, &pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&signing.PublicKey)})

	// The cross-certificate: the signing key signs the identity digest, so
	// that an identity key cannot claim someone else's signing key.
	cross, err := rsa.SignPKCS1v15(rand.Reader, signing, crypto.Hash(0), idDigest[:])
	if err != nil {
		return nil, "", fmt.Errorf("tortest: signing the authority's cross-certificate: %w", err)
	}
	b.WriteString("dir-key-crosscert\n")
	pem.Encode(&b, &pem.Block{Type: "ID SIGNATURE", Bytes: cross})

	// The certification covers everything up to and including this line.
	b.WriteString("dir-key-certification\n")
	digest := sha1.Sum(b.Bytes())
	sig, err := rsa.SignPKCS1v15(rand.Reader, identity, crypto.Hash(0), digest[:])
	if err != nil {
		return nil, "", fmt.Errorf("tortest: signing the authority's certificate: %w", err)
	}
	pem.Encode(&b, &pem.Block{Type: "SIGNATURE", Bytes: sig})
	return b.Bytes(), fingerprint, nil
}
