package noisetor

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	mathrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// testKey returns the deterministic key whose scalar is 32 bytes of seed.
func testKey(t testing.TB, c Curve, seed byte) *PrivateKey {
	t.Helper()
	k, err := NewPrivateKey(c, bytes.Repeat([]byte{seed}, 32))
	if err != nil {
		t.Fatalf("NewPrivateKey(%v, %#x...): %v", c, seed, err)
	}
	return k
}

var curves = []Curve{X25519, P256}

func TestKeyTextRoundTrip(t *testing.T) {
	for _, c := range curves {
		t.Run(c.String(), func(t *testing.T) {
			k, err := GenerateKey(c, nil)
			if err != nil {
				t.Fatal(err)
			}
			pub := k.PublicKey()
			if pub.Curve() != c || len(pub.Bytes()) != c.publicKeyLen() || pub.IsZero() {
				t.Fatalf("public key %v: curve %v, %d bytes", pub, pub.Curve(), len(pub.Bytes()))
			}
			s := pub.String()
			if !strings.HasPrefix(s, c.String()+":") {
				t.Fatalf("String() = %q, want prefix %q", s, c.String()+":")
			}
			got, err := ParsePublicKey(s)
			if err != nil {
				t.Fatalf("ParsePublicKey(%q): %v", s, err)
			}
			if got != pub {
				t.Fatalf("ParsePublicKey(String()) = %v, want %v", got, pub)
			}
			text, err := pub.MarshalText()
			if err != nil {
				t.Fatal(err)
			}
			var un PublicKey
			if err := un.UnmarshalText(text); err != nil || un != pub {
				t.Fatalf("UnmarshalText(MarshalText()) = %v, %v; want %v", un, err, pub)
			}
			again, err := NewPublicKey(c, pub.Bytes())
			if err != nil || again != pub {
				t.Fatalf("NewPublicKey(Bytes()) = %v, %v; want %v", again, err, pub)
			}

			priv := k.MarshalPrivateText()
			if !bytes.HasPrefix(priv, []byte("NOISETOR-PRIVATE-KEY-"+strings.ToUpper(c.String())+":")) || !bytes.HasSuffix(priv, []byte("\n")) {
				t.Fatalf("MarshalPrivateText has the wrong shape")
			}
			k2, err := ParsePrivateKey(priv)
			if err != nil {
				t.Fatalf("ParsePrivateKey(MarshalPrivateText()): %v", err)
			}
			if k2.PublicKey() != pub {
				t.Fatalf("private key round trip changed the public key")
			}
			if !bytes.Equal(k2.MarshalPrivateText(), priv) {
				t.Fatalf("private key round trip changed the encoding")
			}
		})
	}
}

func TestGenerateKeyDeterministic(t *testing.T) {
	for _, c := range curves {
		seed := [32]byte{1, 2, 3}
		k1, err := GenerateKey(c, mathrand.NewChaCha8(seed))
		if err != nil {
			t.Fatal(err)
		}
		k2, err := GenerateKey(c, mathrand.NewChaCha8(seed))
		if err != nil {
			t.Fatal(err)
		}
		if k1.PublicKey() != k2.PublicKey() {
			t.Errorf("%v: the same randomness gave two different keys", c)
		}
		k3, err := GenerateKey(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		if k3.PublicKey() == k1.PublicKey() {
			t.Errorf("%v: crypto/rand gave the deterministic key", c)
		}
		if _, err := GenerateKey(c, bytes.NewReader(make([]byte, 5))); err == nil {
			t.Errorf("%v: GenerateKey with a short reader succeeded", c)
		}
	}
	if _, err := GenerateKey(Curve(9), nil); !errors.Is(err, ErrBadKey) {
		t.Errorf("GenerateKey(unknown curve) = %v, want ErrBadKey", err)
	}
}

func TestDH(t *testing.T) {
	for _, c := range curves {
		a, b := testKey(t, c, 1), testKey(t, c, 2)
		ab, err := a.DH(b.PublicKey())
		if err != nil {
			t.Fatal(err)
		}
		ba, err := b.DH(a.PublicKey())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ab, ba) || len(ab) != 32 {
			t.Errorf("%v: DH does not agree (%d bytes)", c, len(ab))
		}
	}
	x, p := testKey(t, X25519, 1), testKey(t, P256, 1)
	if _, err := x.DH(p.PublicKey()); !errors.Is(err, ErrBadKey) {
		t.Errorf("X25519 DH with a P-256 key = %v, want ErrBadKey", err)
	}
	if _, err := x.DH(PublicKey{}); !errors.Is(err, ErrBadKey) {
		t.Errorf("DH with the zero key = %v, want ErrBadKey", err)
	}
}

// RFC 7748 §6.1 test vector through the software key.
func TestX25519RFC7748(t *testing.T) {
	alice, _ := hex.DecodeString("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	bobPub, _ := hex.DecodeString("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
	want := "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
	k, err := NewPrivateKey(X25519, alice)
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(k.PublicKey().Bytes()); got != "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a" {
		t.Fatalf("public key %s", got)
	}
	pub, err := NewPublicKey(X25519, bobPub)
	if err != nil {
		t.Fatal(err)
	}
	out, err := k.DH(pub)
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(out); got != want {
		t.Fatalf("DH = %s, want %s", got, want)
	}
}

func TestParsePublicKeyRefusesPrivateKey(t *testing.T) {
	for _, c := range curves {
		k := testKey(t, c, 7)
		priv := strings.TrimSpace(string(k.MarshalPrivateText()))
		secret := priv[strings.LastIndexByte(priv, ':')+1:]
		for _, s := range []string{priv, strings.ToLower(priv), priv + "\n"} {
			_, err := ParsePublicKey(s)
			if !errors.Is(err, ErrBadKey) {
				t.Fatalf("%v: ParsePublicKey(private key) = %v, want ErrBadKey", c, err)
			}
			if !strings.Contains(err.Error(), "private key") {
				t.Errorf("%v: error %q does not say it is a private key", c, err)
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("%v: error echoes the private key", c)
			}
			var pk PublicKey
			if err := pk.UnmarshalText([]byte(s)); !errors.Is(err, ErrBadKey) {
				t.Errorf("%v: UnmarshalText(private key) = %v, want ErrBadKey", c, err)
			}
		}
	}
}

func TestParsePrivateKeyRefusesPublicKey(t *testing.T) {
	for _, c := range curves {
		pub := testKey(t, c, 7).PublicKey().String()
		_, err := ParsePrivateKey([]byte(pub + "\n"))
		if !errors.Is(err, ErrBadKey) {
			t.Fatalf("%v: ParsePrivateKey(public key) = %v, want ErrBadKey", c, err)
		}
		if !strings.Contains(err.Error(), "this is a public key") {
			t.Errorf("%v: error %q does not say it is a public key", c, err)
		}
	}
}

func TestParsePublicKeyMalformed(t *testing.T) {
	good := testKey(t, X25519, 1).PublicKey()
	enc := good.String()[len("x25519:"):]
	std := base64.StdEncoding.EncodeToString(good.Bytes())
	p256 := testKey(t, P256, 1).PublicKey()
	compressed := append([]byte{2 | p256.Bytes()[64]&1}, p256.Bytes()[1:33]...)
	notOnCurve := append([]byte{4}, make([]byte, 64)...)
	notOnCurve[64] = 1
	for name, s := range map[string]string{
		"empty":             "",
		"no colon":          "x25519",
		"no key":            "x25519:",
		"unknown curve":     "ed25519:" + enc,
		"upper-case curve":  "X25519:" + enc,
		"padded":            "x25519:" + enc + "=",
		"standard base64":   "x25519:" + std,
		"space":             " " + good.String(),
		"trailing space":    good.String() + " ",
		"short":             "x25519:" + enc[:42],
		"long":              "x25519:" + enc + "AA",
		"wrong curve":       "p256:" + enc,
		"p256 compressed":   "p256:" + base64.RawURLEncoding.EncodeToString(compressed),
		"p256 not on curve": "p256:" + base64.RawURLEncoding.EncodeToString(notOnCurve),
		"p256 infinity":     "p256:AA",
		"non-canonical":     "x25519:" + base64.RawURLEncoding.EncodeToString(setTopBit(good.Bytes())),
		// encoding/base64 skips CR and LF even in Strict mode; one key, one text.
		"LF inside":     "x25519:" + enc[:20] + "\n" + enc[20:],
		"CR inside":     "x25519:" + enc[:20] + "\r" + enc[20:],
		"CRLF inside":   "x25519:" + enc[:20] + "\r\n" + enc[20:],
		"trailing CR":   good.String() + "\r",
		"trailing LF":   good.String() + "\n",
		"trailing CRCR": good.String() + "\r\r",
		"p256 LF":       "p256:" + p256.String()[5:50] + "\n" + p256.String()[50:],
		"unused bits":   "x25519:" + enc[:42] + string(enc[42]+1),
	} {
		t.Run(name, func(t *testing.T) {
			if k, err := ParsePublicKey(s); !errors.Is(err, ErrBadKey) {
				t.Fatalf("ParsePublicKey(%q) = %v, %v; want ErrBadKey", s, k, err)
			}
		})
	}
}

func setTopBit(b []byte) []byte {
	b = bytes.Clone(b)
	b[31] |= 0x80
	return b
}

// p25519 is 2^255 - 19.
var p25519 = new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 255), big.NewInt(19))

// x25519Ladder is RFC 7748's x-only Montgomery ladder on big integers, with
// the scalar k used as is (no clamping): an implementation independent of
// crypto/ecdh to check the low-order list against.
func x25519Ladder(k, u *big.Int) *big.Int {
	p := p25519
	mod := func(x *big.Int) *big.Int { return x.Mod(x, p) }
	x1 := new(big.Int).Mod(new(big.Int).SetBit(new(big.Int).Set(u), 255, 0), p)
	x2, z2 := big.NewInt(1), big.NewInt(0)
	x3, z3 := new(big.Int).Set(x1), big.NewInt(1)
	swap := uint(0)
	for t := 254; t >= 0; t-- {
		kt := k.Bit(t)
		if swap^kt == 1 {
			x2, x3 = x3, x2
			z2, z3 = z3, z2
		}
		swap = kt
		a := mod(new(big.Int).Add(x2, z2))
		aa := mod(new(big.Int).Mul(a, a))
		b := mod(new(big.Int).Sub(x2, z2))
		bb := mod(new(big.Int).Mul(b, b))
		e := mod(new(big.Int).Sub(aa, bb))
		c := mod(new(big.Int).Add(x3, z3))
		d := mod(new(big.Int).Sub(x3, z3))
		da := mod(new(big.Int).Mul(d, a))
		cb := mod(new(big.Int).Mul(c, b))
		s := mod(new(big.Int).Add(da, cb))
		x3 = mod(new(big.Int).Mul(s, s))
		df := mod(new(big.Int).Sub(da, cb))
		z3 = mod(new(big.Int).Mul(x1, mod(new(big.Int).Mul(df, df))))
		x2 = mod(new(big.Int).Mul(aa, bb))
		z2 = mod(new(big.Int).Mul(e, mod(new(big.Int).Add(aa, mod(new(big.Int).Mul(big.NewInt(121665), e))))))
	}
	if swap == 1 {
		x2, z2 = x3, z3
	}
	inv := new(big.Int).Exp(z2, new(big.Int).Sub(p, big.NewInt(2)), p)
	return mod(new(big.Int).Mul(x2, inv))
}

func leBytes(u *big.Int) []byte {
	b := u.FillBytes(make([]byte, 32))
	for i, j := 0, 31; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	return b
}

func fromLE(b []byte) *big.Int {
	r := bytes.Clone(b)
	for i, j := 0, len(r)-1; i < j; i, j = i+1, j-1 {
		r[i], r[j] = r[j], r[i]
	}
	return new(big.Int).SetBytes(r)
}

// lowOrderX25519 lists every 32-byte encoding of a u-coordinate of small
// order on Curve25519 or its twist: 0, 1, p-1, the two points of order 8,
// the non-canonical p and p+1, and each of these with bit 255 set (which
// RFC 7748 ignores). The same list as libsodium's blacklist, doubled.
func lowOrderX25519(t testing.TB) [][]byte {
	u8a, _ := new(big.Int).SetString("325606250916557431795983626356110631294008115727848805560023387167927233504", 10)
	u8b, _ := new(big.Int).SetString("39382357235489614581723060781553021112529911719440698176882885853963445705823", 10)
	us := []*big.Int{
		big.NewInt(0), big.NewInt(1), new(big.Int).Sub(p25519, big.NewInt(1)), u8a, u8b,
		new(big.Int).Set(p25519), new(big.Int).Add(p25519, big.NewInt(1)),
	}
	var out [][]byte
	for _, u := range us {
		out = append(out, leBytes(u), setTopBit(leBytes(u)))
	}
	if len(out) != 14 {
		t.Fatal("low-order list is wrong")
	}
	return out
}

func TestLowOrderPointsRejected(t *testing.T) {
	eight := big.NewInt(8)
	for _, raw := range lowOrderX25519(t) {
		t.Run(hex.EncodeToString(raw), func(t *testing.T) {
			// Independently confirm that the point is of small order.
			if x25519Ladder(eight, fromLE(raw)).Sign() != 0 {
				t.Fatalf("[8]u != 0: the test's list is wrong")
			}
			if k, err := NewPublicKey(X25519, raw); !errors.Is(err, ErrBadKey) {
				t.Fatalf("NewPublicKey(low order) = %v, %v; want ErrBadKey", k, err)
			}
			s := "x25519:" + base64.RawURLEncoding.EncodeToString(raw)
			if k, err := ParsePublicKey(s); !errors.Is(err, ErrBadKey) {
				t.Fatalf("ParsePublicKey(low order) = %v, %v; want ErrBadKey", k, err)
			}
		})
	}
	// The ladder agrees with crypto/ecdh on an ordinary point.
	if x25519Ladder(eight, big.NewInt(9)).Sign() == 0 {
		t.Fatal("ladder: [8]9 = 0")
	}
}

// TestX25519Canonical checks NewPublicKey against the big-integer model:
// accepted iff u < p (bit 255 clear) and u is not of small order.
func TestX25519Canonical(t *testing.T) {
	eight := big.NewInt(8)
	var cands [][]byte
	for i := int64(0); i < 40; i++ {
		cands = append(cands, leBytes(big.NewInt(i)))
		cands = append(cands, leBytes(new(big.Int).Sub(p25519, big.NewInt(i+1))))
		cands = append(cands, leBytes(new(big.Int).Add(p25519, big.NewInt(i%19))))
	}
	rng := mathrand.New(mathrand.NewChaCha8([32]byte{7}))
	for range 200 {
		b := make([]byte, 32)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		cands = append(cands, b)
	}
	good := testKey(t, X25519, 3).PublicKey().Bytes()
	cands = append(cands, good, setTopBit(good))
	for _, raw := range cands {
		for _, r := range [][]byte{raw, setTopBit(raw)} {
			u := fromLE(r)
			want := r[31]&0x80 == 0 && u.Cmp(p25519) < 0 && x25519Ladder(eight, u).Sign() != 0
			_, err := NewPublicKey(X25519, r)
			if (err == nil) != want {
				t.Errorf("NewPublicKey(%x) error = %v, want accepted=%v", r, err, want)
			}
			if err != nil && !errors.Is(err, ErrBadKey) {
				t.Errorf("NewPublicKey(%x) error %v is not ErrBadKey", r, err)
			}
		}
	}
}

func TestNewPublicKeyWrongLengthOrCurve(t *testing.T) {
	for _, tc := range []struct {
		c   Curve
		raw []byte
	}{
		{X25519, make([]byte, 31)}, {X25519, make([]byte, 33)}, {X25519, nil},
		{P256, testKey(t, X25519, 1).PublicKey().Bytes()}, {Curve(0), make([]byte, 32)}, {Curve(3), make([]byte, 32)},
	} {
		if _, err := NewPublicKey(tc.c, tc.raw); !errors.Is(err, ErrBadKey) {
			t.Errorf("NewPublicKey(%v, %d bytes) = %v, want ErrBadKey", tc.c, len(tc.raw), err)
		}
	}
}

func TestP256KeyRoundTrip(t *testing.T) {
	k := testKey(t, P256, 1)
	pub := k.PublicKey()
	if pub.String() != "p256:BG_wO5SSQc4drdQ1GeaWDgqFtBppoFwygQOqK84VlMoWPE91OlW_AdxT9sCwx-7ni0DG_30lqW4igrmJzvccFEo" {
		t.Fatalf("P-256 public key of scalar 0x0101... is %v", pub)
	}
	if pub.Bytes()[0] != 4 || len(pub.Bytes()) != 65 {
		t.Fatalf("P-256 public key is not an uncompressed point")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "p256.key")
	if err := SavePrivateKey(path, k); err != nil {
		t.Fatal(err)
	}
	k2, err := LoadPrivateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if k2.PublicKey() != pub {
		t.Fatal("P-256 key changed on save and load")
	}
	// Scalars out of range are refused: zero and the group order.
	n, _ := hex.DecodeString("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")
	for _, s := range [][]byte{make([]byte, 32), n} {
		if _, err := NewPrivateKey(P256, s); !errors.Is(err, ErrBadKey) {
			t.Errorf("NewPrivateKey(P256, %x) = %v, want ErrBadKey", s, err)
		}
	}
}

func TestSavePrivateKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "static.key")
	k := testKey(t, X25519, 9)
	if err := SavePrivateKey(path, k); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("saved key has mode %v, want 0600", st.Mode().Perm())
	}
	k2, err := LoadPrivateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if k2.PublicKey() != k.PublicKey() {
		t.Fatal("key changed on save and load")
	}

	t.Run("refuses to overwrite", func(t *testing.T) {
		before, _ := os.ReadFile(path)
		err := SavePrivateKey(path, testKey(t, X25519, 10))
		if err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
			t.Fatalf("SavePrivateKey over an existing key = %v", err)
		}
		after, _ := os.ReadFile(path)
		if !bytes.Equal(before, after) {
			t.Fatal("the existing key file was changed")
		}
	})

	for _, mode := range []os.FileMode{0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o666} {
		t.Run(fmt.Sprintf("refuses mode %04o", mode), func(t *testing.T) {
			p := filepath.Join(dir, fmt.Sprintf("k%o", mode))
			if err := SavePrivateKey(p, k); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, mode); err != nil {
				t.Fatal(err)
			}
			_, err := LoadPrivateKey(p)
			if !errors.Is(err, ErrKeyFilePermissions) {
				t.Fatalf("LoadPrivateKey(mode %04o) = %v, want ErrKeyFilePermissions", mode, err)
			}
			if !strings.Contains(err.Error(), "chmod 600") {
				t.Errorf("error %q does not say how to fix it", err)
			}
		})
	}
	for _, mode := range []os.FileMode{0o600, 0o400} {
		p := filepath.Join(dir, fmt.Sprintf("ok%o", mode))
		if err := SavePrivateKey(p, k); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		if _, err := LoadPrivateKey(p); err != nil {
			t.Errorf("LoadPrivateKey(mode %04o): %v", mode, err)
		}
	}

	t.Run("public key file", func(t *testing.T) {
		p := filepath.Join(dir, "pub.key")
		if err := os.WriteFile(p, []byte(k.PublicKey().String()+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := LoadPrivateKey(p)
		if !errors.Is(err, ErrBadKey) || !strings.Contains(err.Error(), "this is a public key") {
			t.Fatalf("LoadPrivateKey(public key file) = %v", err)
		}
	})
	t.Run("missing", func(t *testing.T) {
		if _, err := LoadPrivateKey(filepath.Join(dir, "nope")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("LoadPrivateKey(missing) = %v, want ErrNotExist", err)
		}
	})
	t.Run("no directory", func(t *testing.T) {
		if err := SavePrivateKey(filepath.Join(dir, "nope", "k"), k); err == nil {
			t.Fatal("SavePrivateKey into a missing directory succeeded")
		}
	})
}

// p256N is the order of the P-256 group, base64url: not a valid scalar.
var p256N = base64.RawURLEncoding.EncodeToString([]byte{
	0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51})

func TestParsePrivateKeyMalformed(t *testing.T) {
	k := testKey(t, X25519, 9)
	text := strings.TrimSpace(string(k.MarshalPrivateText()))
	secret := text[strings.LastIndexByte(text, ':')+1:]
	for name, s := range map[string]string{
		"empty":         "",
		"no colon":      "NOISETOR-PRIVATE-KEY-X25519",
		"unknown curve": "NOISETOR-PRIVATE-KEY-ED25519:" + secret,
		"short":         "NOISETOR-PRIVATE-KEY-X25519:" + secret[:40],
		"padded":        text + "=",
		"garbage":       "hello " + secret,
		"p256 zero":     "NOISETOR-PRIVATE-KEY-P256:" + base64.RawURLEncoding.EncodeToString(make([]byte, 32)),
		"p256 n":        "NOISETOR-PRIVATE-KEY-P256:" + p256N,
		"LF inside":     text[:40] + "\n" + text[40:],
		"CR inside":     text[:40] + "\r" + text[40:],
		"curve secret":  "NOISETOR-PRIVATE-KEY-" + secret + ":" + secret,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParsePrivateKey([]byte(s))
			if !errors.Is(err, ErrBadKey) {
				t.Fatalf("ParsePrivateKey = %v, want ErrBadKey", err)
			}
			if strings.Contains(strings.ToLower(err.Error()), strings.ToLower(secret[:20])) {
				t.Fatalf("error echoes the private key: %v", err)
			}
		})
	}
}

// secretForms returns encodings of k's scalar that must never appear in output.
func secretForms(t *testing.T, k *PrivateKey) []string {
	text := strings.TrimSpace(string(k.MarshalPrivateText()))
	scalar, err := base64.RawURLEncoding.DecodeString(text[strings.LastIndexByte(text, ':')+1:])
	if err != nil {
		t.Fatal(err)
	}
	return []string{
		base64.RawURLEncoding.EncodeToString(scalar),
		base64.StdEncoding.EncodeToString(scalar)[:40],
		hex.EncodeToString(scalar),
		strings.ToUpper(hex.EncodeToString(scalar)),
		string(scalar),
		strings.Trim(fmt.Sprint(scalar), "[]"),
		fmt.Sprintf("%#v", scalar)[len("[]byte{"):60],
	}
}

func TestPrivateKeyNeverPrinted(t *testing.T) {
	for _, c := range curves {
		k, err := GenerateKey(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		forms := secretForms(t, k)
		check := func(what, out string) {
			t.Helper()
			for _, f := range forms {
				if strings.Contains(out, f) {
					t.Errorf("%v: %s reveals the private key: %q", c, what, out)
				}
			}
		}
		type exported struct{ K *PrivateKey }
		type unexported struct{ k *PrivateKey }
		type iface struct{ S StaticKey }
		values := map[string]any{
			"*PrivateKey":          k,
			"PrivateKey":           *k,
			"struct{K}":            exported{k},
			"struct{k}":            unexported{k},
			"struct{StaticKey}":    iface{k},
			"*struct{StaticKey}":   &iface{k},
			"[]StaticKey":          []StaticKey{k},
			"map[string]StaticKey": map[string]StaticKey{"a": k},
		}
		for name, v := range values {
			for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d", "%T", "%p"} {
				check(name+" "+verb, fmt.Sprintf(verb, v))
			}
			check(name+" Sprint", fmt.Sprint(v))
			check(name+" Sprintln", fmt.Sprintln(v))
		}
		if s := fmt.Sprint(k); !strings.Contains(s, k.PublicKey().String()) {
			t.Errorf("%%v of a key = %q, want its public key", s)
		}
		var b bytes.Buffer
		for _, h := range []slog.Handler{slog.NewTextHandler(&b, nil), slog.NewJSONHandler(&b, nil)} {
			slog.New(h).Info("key", "key", k, "static", StaticKey(k), "cfg", &Config{StaticKey: k})
		}
		check("slog", b.String())
		j, err := json.Marshal(k) //lint:ignore SA9005 the point: no fields reach JSON either
		if err == nil {
			check("json", string(j))
		}
		j, err = json.Marshal(iface{k})
		if err == nil {
			check("json", string(j))
		}
	}
}

// The fingerprint format is specified in WIRE.md; this reimplements it from
// the text, independently of fingerprint().
func fingerprintFromSpec(domain string, data []byte) string {
	sum := sha256.Sum256(append(append([]byte(domain), 0), data...))
	var groups []string
	for i := 0; i < 6; i++ {
		var v uint64
		for _, b := range sum[5*i : 5*i+5] {
			v = v<<8 | uint64(b)
		}
		groups = append(groups, fmt.Sprintf("%05d", v%100000))
	}
	return strings.Join(groups, " ")
}

func TestPublicKeyFingerprint(t *testing.T) {
	golden := map[string]string{
		"x25519:pOCSkrZRwni5dyxWn1-puxPZBrRqtoyd-dwrRAn4ogk": "59973 77600 95985 98592 28383 47091",
		"x25519:zo060cy2M-x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk": "30182 57974 77939 89649 67880 22750",
	}
	for s, want := range golden {
		k, err := ParsePublicKey(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := k.Fingerprint(); got != want {
			t.Errorf("Fingerprint(%s) = %q, want %q (the format must not change)", s, got, want)
		}
		if got := fingerprintFromSpec("noisetor key fingerprint v1", []byte(s)); got != want {
			t.Errorf("spec fingerprint of %s = %q, want %q", s, got, want)
		}
	}
	if testKey(t, X25519, 1).PublicKey().String() != "x25519:pOCSkrZRwni5dyxWn1-puxPZBrRqtoyd-dwrRAn4ogk" {
		t.Error("key of scalar 0x0101... changed")
	}
	// Every key gets a different fingerprint, of the documented shape.
	seen := map[string]bool{}
	for i := 1; i < 50; i++ {
		for _, c := range curves {
			fp := testKey(t, c, byte(i)).PublicKey().Fingerprint()
			if len(fp) != 35 || strings.Count(fp, " ") != 5 || strings.Trim(fp, "0123456789 ") != "" {
				t.Fatalf("fingerprint %q has the wrong shape", fp)
			}
			if seen[fp] {
				t.Fatalf("fingerprint %q repeated", fp)
			}
			seen[fp] = true
		}
	}
	if fingerprintFromSpec("x", nil) != fingerprint("x", nil) {
		t.Error("fingerprint() differs from the spec")
	}
}

// The Tor keys are secrets too: no fmt verb on the key or its value may show
// the private bytes in any encoding.
func TestTorKeysNeverPrinted(t *testing.T) {
	ok, err := GenerateOnionKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	ck, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string][]byte{"onion key": ok.expanded[:32], "client-auth key": ck.priv.Bytes()}
	values := map[string]any{"*OnionKey": ok, "OnionKey": *ok, "*ClientAuthKey": ck, "ClientAuthKey": *ck}
	for name, v := range values {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
			out := fmt.Sprintf(verb, v)
			for what, sec := range secrets {
				for _, form := range []string{hex.EncodeToString(sec), strings.ToUpper(hex.EncodeToString(sec)),
					fmt.Sprint(sec), base64.StdEncoding.EncodeToString(sec)} {
					if strings.Contains(out, form) {
						t.Errorf("%s %s reveals the %s: %q", name, verb, what, out)
					}
				}
			}
		}
	}
}
