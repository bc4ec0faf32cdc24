//go:build cgo

package noisetor

// PKCS#11 3.0 values that github.com/miekg/pkcs11 v1.1.2 (PKCS#11 2.40
// headers) lacks. From the OASIS PKCS#11 3.0 pkcs11t.h.
const (
	ckkECEdwards              = 0x00000040 // CKK_EC_EDWARDS
	ckkECMontgomery           = 0x00000041 // CKK_EC_MONTGOMERY
	ckmECEdwardsKeyPairGen    = 0x00001055 // CKM_EC_EDWARDS_KEY_PAIR_GEN
	ckmECMontgomeryKeyPairGen = 0x00001056 // CKM_EC_MONTGOMERY_KEY_PAIR_GEN
)

// CKA_EC_PARAMS values. The namedCurve OID form is what key generation sends;
// the PrintableString forms are what PKCS#11 3.0 also allows, and what SoftHSM
// 2.6 reports on the private half of an X25519 key.
var (
	oidX25519 = []byte{0x06, 0x03, 0x2b, 0x65, 0x6e}                               // 1.3.101.110
	oidP256   = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // 1.2.840.10045.3.1.7
	// NSS (before PKCS#11 3.0 support, and still for CKK_EC keys) names
	// Curve25519 by the GnuPG OID 1.3.6.1.4.1.11591.15.1.
	oidX25519NSS   = []byte{0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01}
	nameX25519     = append([]byte{0x13, 0x0a}, "curve25519"...)
	nameX25519Alt  = append([]byte{0x13, 0x06}, "X25519"...)
	nameP256       = append([]byte{0x13, 0x0a}, "prime256v1"...)
	nameP256Alt    = append([]byte{0x13, 0x09}, "secp256r1"...)
	nameP256NIST   = append([]byte{0x13, 0x05}, "P-256"...)
	ecParamsX25519 = [][]byte{oidX25519, nameX25519, nameX25519Alt}
	ecParamsP256   = [][]byte{oidP256, nameP256, nameP256Alt, nameP256NIST}
)
