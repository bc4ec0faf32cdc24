//go:build cgo

package noisetor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/noisetor/noisetor/internal/softhsm"
)

// The tests in this file run against real SoftHSM2 tokens. Each test makes
// its own token directory (internal/softhsm) and points SOFTHSM2_CONF at it:
// SoftHSM reads the configuration, and sees the tokens, only when the module
// is initialised, and the module is finalised whenever the last key using it
// is closed. So every test must Close all its keys (hsmCleanup does).

// PIN files get the file checks of TestFileChecks.
func init() {
	extraFileLoaders = append(extraFileLoaders, fileLoader{"PIN file", secretFile,
		// Distinctive: the check looks for it in errors, which hold random
		// temporary paths ("1234" was once found in one).
		func(*testing.T) []byte { return []byte("pin-Qx7vZ-secret\n") },
		func(p string) error {
			_, err := (&PKCS11Config{Module: "/nonexistent.so", TokenLabel: "t", KeyLabel: "k", PINFile: p}).check(false)
			return err
		}})
}

const (
	hsmPIN   = "8fS1-test-pin"
	hsmSOPIN = "so-3141"
)

var softHSMCheck struct {
	once sync.Once
	err  error
}

// needSoftHSM skips the test when SoftHSM2 is missing, unless
// NOISETOR_REQUIRE_ALL is set (as in CI), where that is a failure.
func needSoftHSM(t testing.TB) {
	t.Helper()
	softHSMCheck.once.Do(func() { softHSMCheck.err = softhsm.Available() })
	if err := softHSMCheck.err; err != nil {
		if os.Getenv("NOISETOR_REQUIRE_ALL") != "" {
			t.Fatalf("NOISETOR_REQUIRE_ALL is set and SoftHSM2 is missing: %v", err)
		}
		t.Skipf("skipping PKCS#11 test: %v (set NOISETOR_REQUIRE_ALL=1 to make this a failure)", err)
	}
}

// hsmStore makes a SoftHSM store with one token per label and points this
// process at it. It must run before the test opens any key.
func hsmStore(t testing.TB, labels ...string) (*softhsm.Store, map[string]*softhsm.Token) {
	t.Helper()
	needSoftHSM(t)
	p11modules.Lock()
	loaded := len(p11modules.m)
	p11modules.Unlock()
	if loaded != 0 {
		t.Fatal("a PKCS#11 module is still loaded: an earlier test did not Close its keys")
	}
	st, err := softhsm.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", st.Conf)
	toks := map[string]*softhsm.Token{}
	for _, l := range labels {
		if toks[l], err = st.InitToken(l, hsmPIN, hsmSOPIN); err != nil {
			t.Fatal(err)
		}
	}
	return st, toks
}

func hsmCfg(st *softhsm.Store, tok *softhsm.Token, keyLabel string) *PKCS11Config {
	return &PKCS11Config{Module: st.Module, TokenLabel: tok.Label, KeyLabel: keyLabel, PIN: tok.PIN}
}

// hsmCloseKey closes k when the test ends.
func hsmCloseKey(t testing.TB, k *PKCS11Key) *PKCS11Key {
	t.Helper()
	t.Cleanup(func() { k.Close() })
	return k
}

func hsmGenerate(t testing.TB, cfg *PKCS11Config) *PKCS11Key {
	t.Helper()
	k, err := GeneratePKCS11Key(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return hsmCloseKey(t, k)
}

func hsmOpen(t testing.TB, cfg *PKCS11Config) *PKCS11Key {
	t.Helper()
	k, err := OpenPKCS11Key(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return hsmCloseKey(t, k)
}

// hsmAdminSession opens a read-write, logged-in session on the token for
// test set-up that the package API deliberately does not offer (importing
// known private keys, making deliberately bad keys). Call done as soon as
// possible: while it is open the process is logged in to the token.
func hsmAdminSession(t testing.TB, st *softhsm.Store, tok *softhsm.Token) (ctx *pkcs11.Ctx, s pkcs11.SessionHandle, done func()) {
	t.Helper()
	mod, err := acquireModule(st.Module, "")
	if err != nil {
		t.Fatal(err)
	}
	slots, err := mod.ctx.GetSlotList(true)
	if err != nil {
		mod.release()
		t.Fatal(err)
	}
	for _, sl := range slots {
		ti, err := mod.ctx.GetTokenInfo(sl)
		if err != nil || ti.Label != tok.Label {
			continue
		}
		s, err := mod.ctx.OpenSession(sl, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			mod.release()
			t.Fatal(err)
		}
		if err := mod.ctx.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil && !isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
			mod.ctx.CloseSession(s)
			mod.release()
			t.Fatal(err)
		}
		var once sync.Once
		done := func() {
			once.Do(func() {
				mod.ctx.CloseSession(s)
				mod.release()
			})
		}
		t.Cleanup(done)
		return mod.ctx, s, done
	}
	mod.release()
	t.Fatalf("token %q not found", tok.Label)
	return nil, 0, nil
}

type hsmImportOpts struct {
	noDerive    bool
	extractable bool
}

// hsmImportKey stores a software key on the token, for tests only (production
// keys are generated on the token): C_CreateObject with CKA_VALUE, in
// SoftHSM's encoding (X25519 as CKK_EC_EDWARDS with the X25519 OID).
func hsmImportKey(t testing.TB, st *softhsm.Store, tok *softhsm.Token, sw *PrivateKey, label string, o hsmImportOpts) {
	t.Helper()
	ctx, s, done := hsmAdminSession(t, st, tok)
	defer done()
	c := sw.PublicKey().Curve()
	ktype, params := uint(ckkECEdwards), oidX25519
	if c == P256 {
		ktype, params = pkcs11.CKK_EC, oidP256
	}
	id := sha256.Sum256([]byte(label))
	if _, err := ctx.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ktype),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params),
		pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, derOctet(sw.PublicKey().Bytes())),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id[:8]),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}); err != nil {
		t.Fatalf("C_CreateObject(public): %v", err)
	}
	if _, err := ctx.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ktype),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, !o.extractable),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, o.extractable),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, !o.noDerive),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, sw.priv.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id[:8]),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}); err != nil {
		t.Fatalf("C_CreateObject(private): %v", err)
	}
}

func hsmSoftKey(t testing.TB, c Curve) *PrivateKey {
	t.Helper()
	k, err := GenerateKey(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// hsmCheckDH checks hw.DH against software DH with n random peers.
func hsmCheckDH(t testing.TB, hw StaticKey, n int) {
	t.Helper()
	c := hw.PublicKey().Curve()
	for i := 0; i < n; i++ {
		peer := hsmSoftKey(t, c)
		got, err := hw.DH(peer.PublicKey())
		if err != nil {
			t.Fatal(err)
		}
		want, err := peer.DH(hw.PublicKey())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%v: token DH %x, software %x", c, got, want)
		}
	}
}

func hsmCurves() []Curve { return []Curve{X25519, P256} }

func TestPKCS11GenerateAndOpen(t *testing.T) {
	st, toks := hsmStore(t, "gen")
	tok := toks["gen"]
	for _, c := range hsmCurves() {
		t.Run(c.String(), func(t *testing.T) {
			cfg := hsmCfg(st, tok, "node-"+c.String())
			cfg.Curve = c
			k := hsmGenerate(t, cfg)
			pub := k.PublicKey()
			if pub.Curve() != c || len(pub.Bytes()) != c.publicKeyLen() {
				t.Fatalf("public key %v", pub)
			}
			if len(k.ID()) != 16 || k.Label() != cfg.KeyLabel {
				t.Fatalf("id %x label %q", k.ID(), k.Label())
			}
			hsmCheckDH(t, k, 20)

			// The same key, found by label, by ID, by both, by token serial.
			for _, o := range []*PKCS11Config{
				{Module: st.Module, TokenLabel: tok.Label, KeyLabel: cfg.KeyLabel, PIN: hsmPIN},
				{Module: st.Module, TokenLabel: tok.Label, KeyID: k.ID(), PIN: hsmPIN},
				{Module: st.Module, TokenSerial: tok.Serial, KeyLabel: cfg.KeyLabel, KeyID: k.ID(), PIN: hsmPIN, Curve: c},
			} {
				k2 := hsmOpen(t, o)
				if k2.PublicKey() != pub {
					t.Fatalf("opened %v, generated %v", k2.PublicKey(), pub)
				}
				hsmCheckDH(t, k2, 2)
				k2.Close()
			}

			// On the token: sensitive, never extractable, derive only
			// (SoftHSM's defaults allow decrypt and unwrap), persistent.
			ctx, s, done := hsmAdminSession(t, st, tok)
			defer done()
			hs, err := findObjects(ctx, s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
			}, 2)
			if err != nil || len(hs) != 1 {
				t.Fatalf("find: %v %d", err, len(hs))
			}
			for typ, want := range map[uint]bool{
				pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true,
				pkcs11.CKA_ALWAYS_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false,
				pkcs11.CKA_NEVER_EXTRACTABLE: true, pkcs11.CKA_DERIVE: true, pkcs11.CKA_SIGN: false,
				pkcs11.CKA_SIGN_RECOVER: false, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_UNWRAP: false,
			} {
				v, ok, err := attr(ctx, s, hs[0], typ)
				if err != nil || !ok || ckBool(v) != want {
					t.Errorf("attribute 0x%x = %x (ok %v, err %v), want %v", typ, v, ok, err, want)
				}
			}
			if _, err := ctx.GetAttributeValue(s, hs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); !isRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
				t.Fatalf("reading CKA_VALUE of the private key: %v, want CKR_ATTRIBUTE_SENSITIVE", err)
			}

			// The public key object cannot encrypt, wrap or verify either.
			hs, err = findObjects(ctx, s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
			}, 2)
			if err != nil || len(hs) != 1 {
				t.Fatalf("find public: %v %d", err, len(hs))
			}
			for _, typ := range []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_WRAP, pkcs11.CKA_VERIFY, pkcs11.CKA_VERIFY_RECOVER} {
				if v, ok, err := attr(ctx, s, hs[0], typ); err != nil || (ok && ckBool(v)) {
					t.Errorf("public key attribute 0x%x = %x (ok %v, err %v), want false", typ, v, ok, err)
				}
			}

			// No second key under the same label; the message names the
			// key that is there (not a fresh random ID).
			_, err = GeneratePKCS11Key(cfg)
			if !errors.Is(err, fs.ErrExist) || !errors.Is(err, ErrPKCS11) ||
				!strings.Contains(err.Error(), fmt.Sprintf("%x", k.ID())) || !strings.Contains(err.Error(), "label \""+cfg.KeyLabel) {
				t.Fatalf("duplicate label: %v", err)
			}
			byID := &PKCS11Config{Module: st.Module, TokenLabel: tok.Label, KeyLabel: "other-" + c.String(), KeyID: k.ID(), PIN: hsmPIN}
			if _, err := GeneratePKCS11Key(byID); !errors.Is(err, fs.ErrExist) ||
				!strings.Contains(err.Error(), fmt.Sprintf("id %x (label %q", k.ID(), cfg.KeyLabel)) {
				t.Fatalf("duplicate ID: %v", err)
			}
			// A configured curve must match the key.
			other := X25519
			if c == X25519 {
				other = P256
			}
			wrong := *cfg
			wrong.Curve = other
			if _, err := OpenPKCS11Key(&wrong); !errors.Is(err, ErrPKCS11Unsupported) {
				t.Fatalf("curve mismatch: %v", err)
			}
			// A peer on the other curve is a bad key, before the token sees it.
			if _, err := k.DH(hsmSoftKey(t, other).PublicKey()); !errors.Is(err, ErrBadKey) {
				t.Fatalf("DH with a %v peer: %v", other, err)
			}
		})
	}
}

func TestPKCS11ImportedKeyMatchesSoftware(t *testing.T) {
	st, toks := hsmStore(t, "imp")
	for _, c := range hsmCurves() {
		sw := hsmSoftKey(t, c)
		hsmImportKey(t, st, toks["imp"], sw, "imported-"+c.String(), hsmImportOpts{})
		k := hsmOpen(t, hsmCfg(st, toks["imp"], "imported-"+c.String()))
		if k.PublicKey() != sw.PublicKey() {
			t.Fatalf("token public key %v, software %v", k.PublicKey(), sw.PublicKey())
		}
		for i := 0; i < 20; i++ {
			peer := hsmSoftKey(t, c)
			hw, err := k.DH(peer.PublicKey())
			if err != nil {
				t.Fatal(err)
			}
			want, _ := sw.DH(peer.PublicKey())
			if !bytes.Equal(hw, want) {
				t.Fatalf("%v: token %x, software %x", c, hw, want)
			}
		}
	}
}

// Published vectors through the token: RFC 7748 §6.1 for X25519 (no byte
// reversal anywhere) and the P256 vector of WIRE.md §10.
func TestPKCS11KnownVectors(t *testing.T) {
	st, toks := hsmStore(t, "vec")
	unhex := func(s string) []byte {
		b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, v := range []struct {
		curve          Curve
		priv, peer, dh string
	}{
		{X25519,
			"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
			"de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
			"4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"},
		{P256,
			"0101010101010101010101010101010101010101010101010101010101010101",
			"04550f471003f3df97c3df506ac797f6721fb1a1fb7b8f6f83d224498a65c88e24" +
				"136093d7012e509a73715cbd0b00a3cc0ff4b5c01b3ffa196ab1fb327036b8e6",
			"eb459a6b30d70eb4c0ddcd34ea96ed59e8f8d1843c22dd895ab603aa13d9a81d"},
	} {
		sw, err := NewPrivateKey(v.curve, unhex(v.priv))
		if err != nil {
			t.Fatal(err)
		}
		label := "vector-" + v.curve.String()
		hsmImportKey(t, st, toks["vec"], sw, label, hsmImportOpts{})
		k := hsmOpen(t, hsmCfg(st, toks["vec"], label))
		peer, err := NewPublicKey(v.curve, unhex(v.peer))
		if err != nil {
			t.Fatal(err)
		}
		got, err := k.DH(peer)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, unhex(v.dh)) {
			t.Fatalf("%v: token %x, vector %s", v.curve, got, v.dh)
		}
	}
}

// SoftHSM takes the peer's point both raw (as PKCS#11 3.0 says) and
// DER-wrapped (as older tokens want); the key sends it raw and falls back to
// DER only if the token refuses raw. Check both give the same secret.
func TestPKCS11PeerPointEncodings(t *testing.T) {
	st, toks := hsmStore(t, "enc")
	for _, c := range hsmCurves() {
		cfg := hsmCfg(st, toks["enc"], "enc-"+c.String())
		cfg.Curve = c
		k := hsmGenerate(t, cfg)
		peer := hsmSoftKey(t, c)
		want, _ := peer.DH(k.PublicKey())
		for _, der := range []bool{false, true} {
			k.derDER.Store(der)
			got, err := k.DH(peer.PublicKey())
			if err != nil {
				t.Fatalf("%v der=%v: %v", c, der, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%v der=%v: %x, want %x", c, der, got, want)
			}
		}
		t.Logf("%v: SoftHSM 2.6.1 accepts the peer point raw (%d bytes) and DER-wrapped (%d bytes)", c, c.publicKeyLen(), c.publicKeyLen()+2)
	}
}

// hsmRecConn records what one end writes.
type hsmRecConn struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (r *hsmRecConn) Write(b []byte) (int, error) {
	r.mu.Lock()
	r.out.Write(b)
	r.mu.Unlock()
	return r.Conn.Write(b)
}

func (r *hsmRecConn) written() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.out.Bytes())
}

// hsmDetRand is a deterministic stream (SHA-256 in counter mode).
type hsmDetRand struct {
	seed string
	n    int
	buf  []byte
}

func (r *hsmDetRand) Read(p []byte) (int, error) {
	for len(r.buf) < len(p) {
		h := sha256.Sum256([]byte(fmt.Sprintf("%s/%d", r.seed, r.n)))
		r.n++
		r.buf = append(r.buf, h[:]...)
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

var hsmDiscardLogger = discardLogger()

// hsmLogBuf collects log output from several goroutines.
type hsmLogBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *hsmLogBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *hsmLogBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// hsmTranscript runs one handshake through the project's own handshake
// entry points with fixed ephemerals and fixed preamble randomness, then one
// record each way, and returns everything each side wrote plus the
// handshake hash.
func hsmTranscript(t testing.TB, pattern Pattern, a, b StaticKey, ea, eb *PrivateKey) (fromA, fromB, hh []byte) {
	t.Helper()
	ring, err := NewKeyring(Peer{Name: "a", PublicKey: a.PublicKey()}, Peer{Name: "b", PublicKey: b.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	at := func() time.Time { return time.Unix(1800000000, 0) } // one hint window for every run
	cfgA := &Config{StaticKey: a, Keyring: ring, Patterns: []Pattern{pattern}, Random: &hsmDetRand{seed: "A"}, Time: at, Logger: hsmDiscardLogger}
	cfgB := &Config{StaticKey: b, Keyring: ring, Patterns: []Pattern{pattern}, Random: &hsmDetRand{seed: "B"}, Time: at, Logger: hsmDiscardLogger}
	p1, p2 := net.Pipe()
	ra, rb := &hsmRecConn{Conn: p1}, &hsmRecConn{Conn: p2}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type res struct {
		c   *Conn
		err error
	}
	done := make(chan res, 1)
	go func() {
		c, err := HandshakeRespond(ctx, rb, cfgB, eb, a.PublicKey())
		if err == nil {
			buf := make([]byte, 64)
			var n int
			if n, err = c.Read(buf); err == nil {
				_, err = c.Write(append([]byte("re: "), buf[:n]...))
			}
		}
		done <- res{c, err}
	}()
	ca, err := HandshakeInitiate(ctx, ra, cfgA, ea, b.PublicKey())
	if err != nil {
		t.Fatalf("%v initiator: %v", pattern, err)
	}
	if _, err := ca.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := ca.Read(buf)
	if err != nil || string(buf[:n]) != "re: hello" {
		t.Fatalf("%v: read %q, %v", pattern, buf[:n], err)
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("%v responder: %v", pattern, r.err)
	}
	sa, sb := ca.ConnectionState(), r.c.ConnectionState()
	if !bytes.Equal(sa.HandshakeHash, sb.HandshakeHash) || sa.Peer.Name != "b" || sb.Peer.Name != "a" {
		t.Fatalf("%v: states %+v / %+v", pattern, sa, sb)
	}
	fromA, fromB = ra.written(), rb.written()
	// Close the pipe first: Close on a Conn would wait for the peer to read
	// its close record.
	p1.Close()
	p2.Close()
	ca.Close()
	r.c.Close()
	return fromA, fromB, sa.HandshakeHash
}

// With the same static keys (imported into the token) and the same
// ephemerals, a handshake with both statics on the token is byte for byte the
// handshake in software.
func TestPKCS11HandshakeEqualsSoftware(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	st, toks := hsmStore(t, "eq")
	for _, c := range hsmCurves() {
		swA, swB := hsmSoftKey(t, c), hsmSoftKey(t, c)
		hsmImportKey(t, st, toks["eq"], swA, "eq-a-"+c.String(), hsmImportOpts{})
		hsmImportKey(t, st, toks["eq"], swB, "eq-b-"+c.String(), hsmImportOpts{})
		hwA := hsmOpen(t, hsmCfg(st, toks["eq"], "eq-a-"+c.String()))
		hwB := hsmOpen(t, hsmCfg(st, toks["eq"], "eq-b-"+c.String()))
		for _, p := range []Pattern{KK, XK} {
			t.Run(c.String()+"/"+p.String(), func(t *testing.T) {
				ea, err := GenerateKey(c, &hsmDetRand{seed: "ea" + c.String()})
				if err != nil {
					t.Fatal(err)
				}
				eb, _ := GenerateKey(c, &hsmDetRand{seed: "eb" + c.String()})
				wantA, wantB, wantH := hsmTranscript(t, p, swA, swB, ea, eb)
				before := hwA.derives.Load() + hwB.derives.Load()
				gotA, gotB, gotH := hsmTranscript(t, p, hwA, hwB, ea, eb)
				ops := hwA.derives.Load() + hwB.derives.Load() - before
				if !bytes.Equal(gotA, wantA) {
					t.Fatalf("initiator bytes differ:\n token    %x\n software %x", gotA, wantA)
				}
				if !bytes.Equal(gotB, wantB) {
					t.Fatalf("responder bytes differ:\n token    %x\n software %x", gotB, wantB)
				}
				if !bytes.Equal(gotH, wantH) {
					t.Fatal("handshake hashes differ")
				}
				// KK: initiator se, responder es, and, on a Config's first
				// use, one ss per pair, which the preamble key and every
				// handshake's ss token use (the initiator's with b, the
				// responder's with both keyring entries). XK: responder es,
				// initiator se.
				wantOps := map[Pattern]int64{KK: 2 + 3, XK: 2}[p]
				if ops != wantOps {
					t.Fatalf("%d token DH operations, want %d", ops, wantOps)
				}
				// And with one side in software, the other on the token.
				mixA, mixB, _ := hsmTranscript(t, p, hwA, swB, ea, eb)
				if !bytes.Equal(mixA, wantA) || !bytes.Equal(mixB, wantB) {
					t.Fatal("mixed token/software transcript differs")
				}
				t.Logf("%d+%d bytes identical, %d token DH operations", len(gotA), len(gotB), ops)
			})
		}
	}
}

func TestPKCS11ConcurrentDH(t *testing.T) {
	st, toks := hsmStore(t, "conc")
	cfg := hsmCfg(st, toks["conc"], "conc")
	cfg.MaxSessions = 3
	k := hsmGenerate(t, cfg)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				peer, _ := GenerateKey(X25519, nil)
				got, err := k.DH(peer.PublicKey())
				if err != nil {
					errs <- err
					return
				}
				want, _ := peer.DH(k.PublicKey())
				if !bytes.Equal(got, want) {
					errs <- fmt.Errorf("mismatch")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	k.st.Lock()
	idle := len(k.idle)
	k.st.Unlock()
	if idle > 3 {
		t.Fatalf("%d idle sessions, MaxSessions is 3", idle)
	}
}

func TestPKCS11FaultWrongModule(t *testing.T) {
	st, toks := hsmStore(t, "mod")
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.so")
	os.WriteFile(garbage, []byte("not a shared library"), 0o644)
	for name, path := range map[string]string{
		"missing":   filepath.Join(dir, "nonexistent.so"),
		"garbage":   garbage,
		"directory": dir,
	} {
		cfg := hsmCfg(st, toks["mod"], "k")
		cfg.Module = path
		_, err := OpenPKCS11Key(cfg)
		if !errors.Is(err, ErrPKCS11NotFound) || !errors.Is(err, ErrPKCS11) || !strings.Contains(err.Error(), path) {
			t.Fatalf("%s: %v", name, err)
		}
		if strings.Contains(err.Error(), hsmPIN) {
			t.Fatalf("%s: PIN in error: %v", name, err)
		}
		t.Logf("%s: %v", name, err)
	}
	if _, err := OpenPKCS11Key(&PKCS11Config{TokenLabel: "x", KeyLabel: "y"}); err == nil || !strings.Contains(err.Error(), EnvPKCS11Module) {
		t.Fatalf("no module: %v", err)
	}
}

func TestPKCS11FaultTokenAbsent(t *testing.T) {
	st, toks := hsmStore(t, "present")
	for _, cfg := range []*PKCS11Config{
		{Module: st.Module, TokenLabel: "absent", KeyLabel: "k", PIN: hsmPIN},
		{Module: st.Module, TokenSerial: "0000000000000000", KeyLabel: "k", PIN: hsmPIN},
		{Module: st.Module, TokenLabel: "present", TokenSerial: "0000000000000000", KeyLabel: "k", PIN: hsmPIN},
	} {
		_, err := OpenPKCS11Key(cfg)
		if !errors.Is(err, ErrPKCS11NotFound) || !strings.Contains(err.Error(), `"present"`) {
			t.Fatalf("%v: %v", cfg, err)
		}
		t.Log(err)
	}
	_ = toks
}

func TestPKCS11FaultWrongPIN(t *testing.T) {
	st, toks := hsmStore(t, "pin")
	tok := toks["pin"]
	hsmImportKey(t, st, tok, hsmSoftKey(t, X25519), "k", hsmImportOpts{})
	const wrong = "wrong-PIN-7319"
	check := func(err error, what string) {
		t.Helper()
		var pe *PKCS11Error
		if !errors.Is(err, ErrPKCS11PIN) || !errors.As(err, &pe) || pe.Code != pkcs11.CKR_PIN_INCORRECT ||
			!strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
			t.Fatalf("%s: %v", what, err)
		}
		if strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), hsmPIN) {
			t.Fatalf("%s: the PIN is in the error: %v", what, err)
		}
		t.Logf("%s: %v", what, err)
	}
	cfg := hsmCfg(st, tok, "k")
	cfg.PIN = wrong
	_, err := OpenPKCS11Key(cfg)
	check(err, "wrong PIN")

	// From a PIN file.
	pinFile := filepath.Join(t.TempDir(), "pin")
	os.WriteFile(pinFile, []byte(wrong+"\n"), 0o600)
	cfg = hsmCfg(st, tok, "k")
	cfg.PIN, cfg.PINFile = "", pinFile
	_, err = OpenPKCS11Key(cfg)
	check(err, "wrong PIN from file")

	// While another key holds the token logged in, C_Login says only
	// CKR_USER_ALREADY_LOGGED_IN; the wrong PIN must still be refused.
	good := hsmOpen(t, hsmCfg(st, tok, "k"))
	cfg = hsmCfg(st, tok, "k")
	cfg.PIN = wrong
	_, err = OpenPKCS11Key(cfg)
	check(err, "wrong PIN while logged in")
	cfg.PIN = hsmPIN
	hsmOpen(t, cfg).Close()
	hsmCheckDH(t, good, 1)

	// No PIN for a token that needs one.
	cfg.PIN = ""
	if _, err := OpenPKCS11Key(cfg); !errors.Is(err, ErrPKCS11PIN) {
		t.Fatalf("no PIN: %v", err)
	}
	// A PIN file others can read.
	os.Chmod(pinFile, 0o644)
	cfg.PINFile = pinFile
	if _, err := OpenPKCS11Key(cfg); !errors.Is(err, ErrKeyFilePermissions) || strings.Contains(err.Error(), wrong) {
		t.Fatalf("readable PIN file: %v", err)
	}
	cfg.PIN = hsmPIN
	if _, err := OpenPKCS11Key(cfg); err == nil || strings.Contains(err.Error(), hsmPIN) {
		t.Fatalf("PIN and PIN file: %v", err)
	}
}

func TestPKCS11FaultBadKeys(t *testing.T) {
	st, toks := hsmStore(t, "keys")
	tok := toks["keys"]
	hsmImportKey(t, st, tok, hsmSoftKey(t, X25519), "no-derive", hsmImportOpts{noDerive: true})
	hsmImportKey(t, st, tok, hsmSoftKey(t, P256), "no-derive-p256", hsmImportOpts{noDerive: true})
	hsmImportKey(t, st, tok, hsmSoftKey(t, X25519), "extractable", hsmImportOpts{extractable: true})
	hsmImportKey(t, st, tok, hsmSoftKey(t, X25519), "twin", hsmImportOpts{})
	hsmImportKey(t, st, tok, hsmSoftKey(t, X25519), "twin", hsmImportOpts{})

	// An Ed25519 signing key made on the token.
	ctx, s, done := hsmAdminSession(t, st, tok)
	oidEd25519 := []byte{0x06, 0x03, 0x2b, 0x65, 0x70}
	if _, _, err := ctx.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmECEdwardsKeyPairGen, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidEd25519),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "ed25519"),
		}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "ed25519"),
		}); err != nil {
		t.Fatal(err)
	}
	done()

	for _, tc := range []struct {
		label string
		kind  error
		msg   string
	}{
		{"missing", ErrPKCS11NotFound, `no private key "missing"`},
		{"no-derive", ErrPKCS11KeyPolicy, "CKA_DERIVE is false"},
		{"no-derive-p256", ErrPKCS11KeyPolicy, "CKA_DERIVE is false"},
		{"extractable", ErrPKCS11KeyPolicy, "CKA_EXTRACTABLE is true"},
		{"twin", nil, "more than one private key"},
		{"ed25519", ErrPKCS11Unsupported, "Edwards (signing) key"},
	} {
		_, err := OpenPKCS11Key(hsmCfg(st, tok, tc.label))
		if err == nil || !errors.Is(err, ErrPKCS11) || (tc.kind != nil && !errors.Is(err, tc.kind)) ||
			!strings.Contains(err.Error(), tc.msg) || strings.Contains(err.Error(), hsmPIN) {
			t.Fatalf("%s: %v", tc.label, err)
		}
		t.Logf("%s: %v", tc.label, err)
	}
	// Without its derive check, the token itself refuses: the check only
	// gives a clearer message.
	ctx, s, done = hsmAdminSession(t, st, tok)
	defer done()
	hs, _ := findObjects(ctx, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "no-derive"),
	}, 1)
	k := &PKCS11Key{&pkcs11Key{mod: &p11module{ctx: ctx}}}
	if _, err := k.deriveRaw(s, hs[0], X25519, basePoint(X25519)); !isRV(err, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED) {
		t.Fatalf("C_DeriveKey on a key without CKA_DERIVE: %v", err)
	}
}

// A token without ECDH for a key (tpm2-pkcs11; a module behind p11-kit
// remoting) answers the base-point probe with one of these codes: that is
// "not supported", not a generic failure. SoftHSM has ECDH for every key it
// can hold, so the codes are fed to the classifier directly.
func TestPKCS11NoECDHIsUnsupported(t *testing.T) {
	for _, rv := range []uint{pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_FUNCTION_NOT_SUPPORTED, pkcs11.CKR_KEY_TYPE_INCONSISTENT} {
		if !noECDH(&sessionErr{&PKCS11Error{Func: "C_DeriveKey", Code: rv}}) {
			t.Errorf("C_DeriveKey %s is not classified as no ECDH", pkcs11.Error(rv))
		}
	}
	for _, err := range []error{
		&PKCS11Error{Func: "C_DeriveKey", Code: pkcs11.CKR_DEVICE_ERROR},
		&PKCS11Error{Func: "C_DeriveKey", Code: pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED},
		&PKCS11Error{Func: "C_GetAttributeValue", Code: pkcs11.CKR_FUNCTION_NOT_SUPPORTED},
		errors.New("C_DeriveKey: CKR_MECHANISM_INVALID"),
	} {
		if noECDH(err) {
			t.Errorf("%v classified as no ECDH", err)
		}
	}
}

// A token without ECDH (here SoftHSM allowed only key generation, as
// tpm2-pkcs11 and p11-kit remoting lack it) holding a good key: the
// base-point probe fails with CKR_MECHANISM_INVALID, which is
// ErrPKCS11Unsupported, and so is generating a key there.
func TestPKCS11TokenWithoutECDH(t *testing.T) {
	st, toks := hsmStore(t, "noecdh")
	for _, c := range hsmCurves() {
		cfg := hsmCfg(st, toks["noecdh"], "k-"+c.String())
		cfg.Curve = c
		hsmGenerate(t, cfg).Close()
	}
	conf, err := st.WriteConf("no-ecdh.conf", "slots.mechanisms = CKM_EC_KEY_PAIR_GEN,CKM_EC_EDWARDS_KEY_PAIR_GEN,CKM_SHA256")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	for _, c := range hsmCurves() {
		_, err := OpenPKCS11Key(hsmCfg(st, toks["noecdh"], "k-"+c.String()))
		if !errors.Is(err, ErrPKCS11Unsupported) || !isRV(err, pkcs11.CKR_MECHANISM_INVALID) ||
			!strings.Contains(err.Error(), "cannot do ECDH") {
			t.Fatalf("%v key on a token without ECDH: %v", c, err)
		}
		t.Logf("%v: %v", c, err)
	}
	if _, err := GeneratePKCS11Key(hsmCfg(st, toks["noecdh"], "new")); !errors.Is(err, ErrPKCS11Unsupported) {
		t.Fatalf("generating on a token without ECDH: %v", err)
	}
}

// Two tokens with the same label: the advice is to add the serial, and the
// message lists the serials to choose from.
func TestPKCS11AmbiguousToken(t *testing.T) {
	st, toks := hsmStore(t, "twin")
	tok2, err := st.InitToken("twin", hsmPIN, hsmSOPIN)
	if err != nil {
		t.Fatal(err)
	}
	_, err = OpenPKCS11Key(hsmCfg(st, toks["twin"], "k"))
	if err == nil || !strings.Contains(err.Error(), "2 tokens with label \"twin\"") ||
		!strings.Contains(err.Error(), "select one by serial as well") ||
		!strings.Contains(err.Error(), toks["twin"].Serial) || !strings.Contains(err.Error(), tok2.Serial) {
		t.Fatalf("two tokens with one label: %v", err)
	}
	cfg := hsmCfg(st, tok2, "k")
	cfg.TokenSerial = tok2.Serial
	hsmGenerate(t, cfg)
}

// A session that fails with a session error is dropped, not reused; the
// next DH logs in again on a fresh session and finds the key again.
func TestPKCS11SessionsClosedUnderKey(t *testing.T) {
	st, toks := hsmStore(t, "sess")
	k := hsmGenerate(t, hsmCfg(st, toks["sess"], "sess"))
	for i := 0; i < 8; i++ { // fill the pool
		hsmCheckDH(t, k, 1)
	}
	// C_CloseAllSessions ends every session of the process on the token, and
	// with them the login: what a token reset looks like.
	if err := k.mod.ctx.CloseAllSessions(k.slot); err != nil {
		t.Fatal(err)
	}
	hsmCheckDH(t, k, 20)
	if n := k.reconnects.Load(); n != 1 {
		t.Fatalf("%d reconnects, want 1 (stale sessions must be dropped, not retried one by one)", n)
	}
}

// When the PIN changes under a running key, logging in again fails once and
// is never retried: tokens lock the PIN after a few wrong tries.
func TestPKCS11PINChangedIsNotRetried(t *testing.T) {
	st, toks := hsmStore(t, "pinchg")
	tok := toks["pinchg"]
	k := hsmGenerate(t, hsmCfg(st, tok, "node"))
	k.retryEvery = time.Millisecond
	hsmCheckDH(t, k, 1)
	ctx, s, done := hsmAdminSession(t, st, tok)
	if err := ctx.SetPIN(s, tok.PIN, "new-pin-4242"); err != nil {
		t.Fatal(err)
	}
	if err := ctx.CloseAllSessions(k.slot); err != nil { // logs the process out
		t.Fatal(err)
	}
	done()
	peer := hsmSoftKey(t, X25519).PublicKey()
	_, err := k.DH(peer)
	if !errors.Is(err, ErrPKCS11PIN) || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") ||
		strings.Contains(err.Error(), tok.PIN) || strings.Contains(err.Error(), "new-pin-4242") {
		t.Fatalf("DH after the PIN changed: %v", err)
	}
	t.Log(err)
	n := k.reconnects.Load()
	time.Sleep(5 * time.Millisecond)
	for i := 0; i < 5; i++ {
		if _, err := k.DH(peer); !errors.Is(err, ErrPKCS11PIN) {
			t.Fatalf("DH %d: %v", i, err)
		}
	}
	if k.reconnects.Load() != n {
		t.Fatalf("%d more login attempts with a refused PIN", k.reconnects.Load()-n)
	}
}

// The token goes away under a running key: DH fails with a clear error and
// no crash, fails fast while it stays away, and works again when the same key
// is back. A different key under the same label is refused.
func TestPKCS11TokenGoneMidRun(t *testing.T) {
	st, toks := hsmStore(t, "gone", "deleted")
	tok := toks["gone"]
	sw := hsmSoftKey(t, X25519)
	hsmImportKey(t, st, tok, sw, "node", hsmImportOpts{})
	k := hsmOpen(t, hsmCfg(st, tok, "node"))
	k.retryEvery = 200 * time.Millisecond
	hsmCheckDH(t, k, 2)

	// Re-initialising the token wipes the key.
	if err := st.Reinit(tok); err != nil {
		t.Fatal(err)
	}
	peer := hsmSoftKey(t, X25519)
	_, err := k.DH(peer.PublicKey())
	if !errors.Is(err, ErrPKCS11Unavailable) || !errors.Is(err, ErrPKCS11NotFound) || !strings.Contains(err.Error(), `"node"`) {
		t.Fatalf("DH after the key vanished: %v", err)
	}
	t.Logf("after re-init: %v", err)
	// Within the retry interval DH fails fast, without touching the token.
	start := time.Now()
	before := k.reconnects.Load()
	for i := 0; i < 100; i++ {
		if _, err := k.DH(peer.PublicKey()); err == nil {
			t.Fatal("DH succeeded with the key gone")
		}
	}
	if k.reconnects.Load() != before || time.Since(start) > 150*time.Millisecond {
		t.Fatalf("100 failing DH calls took %v and %d reconnects", time.Since(start), k.reconnects.Load()-before)
	}

	// A different key under the same label is not the same identity.
	hsmImportKey(t, st, tok, hsmSoftKey(t, X25519), "node", hsmImportOpts{})
	time.Sleep(250 * time.Millisecond)
	if _, err := k.DH(peer.PublicKey()); err == nil || !strings.Contains(err.Error(), "different key") {
		t.Fatalf("DH with a replaced key: %v", err)
	}
	// The same key comes back: DH works again.
	if err := st.Reinit(tok); err != nil {
		t.Fatal(err)
	}
	hsmImportKey(t, st, tok, sw, "node", hsmImportOpts{})
	time.Sleep(250 * time.Millisecond)
	hsmCheckDH(t, k, 5)

	// A token deleted outright (its directory removed) does not come back
	// to a running SoftHSM, but DH must fail cleanly, every time.
	k2 := hsmGenerate(t, hsmCfg(st, toks["deleted"], "node2"))
	hsmCheckDH(t, k2, 1)
	if err := st.DeleteToken(toks["deleted"]); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		_, err := k2.DH(peer.PublicKey())
		if !errors.Is(err, ErrPKCS11Unavailable) || strings.Contains(err.Error(), hsmPIN) {
			t.Fatalf("DH on a deleted token: %v", err)
		}
		if i == 0 {
			t.Logf("deleted token: %v", err)
		}
	}
	// The other key on the same module is unaffected.
	hsmCheckDH(t, k, 2)
}

func TestPKCS11CloseAndModuleSharing(t *testing.T) {
	st, toks := hsmStore(t, "share1", "share2")
	a := hsmGenerate(t, hsmCfg(st, toks["share1"], "a"))
	b := hsmGenerate(t, hsmCfg(st, toks["share2"], "b"))
	c := hsmOpen(t, hsmCfg(st, toks["share1"], "a"))
	if a.mod != b.mod || a.mod != c.mod {
		t.Fatal("keys of one module do not share it")
	}
	// Closing one key neither finalises the module nor logs the token out.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	hsmCheckDH(t, b, 2)
	hsmCheckDH(t, c, 2)
	if _, err := a.DH(c.PublicKey()); !errors.Is(err, ErrPKCS11Closed) {
		t.Fatalf("DH after Close: %v", err)
	}

	// Close while DH calls are running: they finish or fail cleanly.
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			peer, _ := GenerateKey(X25519, nil)
			for i := 0; i < 50; i++ {
				if _, err := c.DH(peer.PublicKey()); err != nil {
					if !errors.Is(err, ErrPKCS11Closed) {
						t.Error(err)
					}
					return
				}
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	c.Close()
	wg.Wait()
	b.Close()
	p11modules.Lock()
	n := len(p11modules.m)
	p11modules.Unlock()
	if n != 0 {
		t.Fatalf("%d modules still loaded after every key was closed", n)
	}
}

func TestPKCS11ConfigFromEnv(t *testing.T) {
	for _, v := range []string{EnvPKCS11Module, EnvPKCS11Token, EnvPKCS11TokenSerial, EnvPKCS11Key, EnvPKCS11KeyID,
		EnvPKCS11PIN, EnvPKCS11PINFile, EnvPKCS11Curve, EnvPKCS11MaxSessions, EnvPKCS11InitParams} {
		t.Setenv(v, "")
	}
	if cfg, err := PKCS11ConfigFromEnv(); cfg != nil || err != nil {
		t.Fatalf("nothing set: %v %v", cfg, err)
	}
	// Without a module the rest is still read (a caller may have the
	// module from elsewhere, such as a command-line flag); opening says
	// what is missing.
	t.Setenv(EnvPKCS11Token, "tok")
	cfg, err := PKCS11ConfigFromEnv()
	if err != nil || cfg == nil || cfg.TokenLabel != "tok" || cfg.Module != "" {
		t.Fatalf("no module: %v, %v", cfg, err)
	}
	if _, err := OpenPKCS11Key(cfg); err == nil || !strings.Contains(err.Error(), EnvPKCS11Module) {
		t.Fatalf("opening without a module: %v", err)
	}
	t.Setenv(EnvPKCS11Module, "/usr/lib/softhsm/libsofthsm2.so")
	t.Setenv(EnvPKCS11Key, "node")
	t.Setenv(EnvPKCS11KeyID, "0a:0b:0c")
	t.Setenv(EnvPKCS11PIN, "env-pin-5521")
	t.Setenv(EnvPKCS11Curve, "P256")
	t.Setenv(EnvPKCS11MaxSessions, "2")
	t.Setenv(EnvPKCS11InitParams, "configdir='sql:/x'")
	cfg, err = PKCS11ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	want := PKCS11Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "tok", KeyLabel: "node",
		KeyID: []byte{10, 11, 12}, PIN: "env-pin-5521", Curve: P256, MaxSessions: 2, InitParams: "configdir='sql:/x'"}
	if cfg.String() != want.String() || cfg.PIN != want.PIN {
		t.Fatalf("got %v\nwant %v", cfg, want)
	}
	// The PIN never shows in any rendering of the config.
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("cfg", "pkcs11", cfg, "value", *cfg)
	slog.New(slog.NewTextHandler(&logs, nil)).Info("cfg", "pkcs11", cfg)
	for _, s := range []string{fmt.Sprint(cfg), fmt.Sprintf("%+v %#v %s %q", cfg, cfg, *cfg, cfg), logs.String()} {
		if strings.Contains(s, "env-pin-5521") {
			t.Fatalf("PIN shown: %s", s)
		}
	}
	for name, val := range map[string]string{EnvPKCS11KeyID: "xyz", EnvPKCS11Curve: "ed448", EnvPKCS11MaxSessions: "0"} {
		t.Run(name, func(t *testing.T) {
			t.Setenv(name, val)
			if _, err := PKCS11ConfigFromEnv(); err == nil || !errors.Is(err, ErrPKCS11) || !strings.Contains(err.Error(), name) {
				t.Fatalf("%s=%s: %v", name, val, err)
			}
		})
	}
}

func TestPKCS11KeyFormatHidesPIN(t *testing.T) {
	st, toks := hsmStore(t, "fmt")
	k := hsmGenerate(t, hsmCfg(st, toks["fmt"], "fmt"))
	for _, s := range []string{fmt.Sprint(k), fmt.Sprint(*k), fmt.Sprintf("%+v %#v %v", k, k, []StaticKey{k})} {
		if strings.Contains(s, hsmPIN) || !strings.Contains(s, k.PublicKey().String()) {
			t.Fatalf("rendering: %s", s)
		}
	}
	// Every verb, dereferenced too (fmt.Sprintf("%+v", *k) used to print
	// the PIN kept for reconnecting), and fmt's method-less printing.
	checkNeverPrinted(t, map[string]any{"*PKCS11Key": k, "PKCS11Key": *k, "StaticKey": StaticKey(k),
		"Config": Config{StaticKey: k}}, [][]byte{[]byte(hsmPIN)}, true)
	var zero PKCS11Key
	if s := fmt.Sprint(zero); s != "noisetor.PKCS11Key(<none>)" {
		t.Errorf("zero PKCS11Key prints %q", s)
	}
}

// A listener whose static key is on the token: when the token goes away,
// new handshakes fail cleanly (logged, no crash), connections already
// established keep working because they no longer need the token, a listener
// with a software key in the same process is not affected, and when the key
// is back new handshakes work again.
func TestPKCS11ListenerTokenGone(t *testing.T) {
	st, toks := hsmStore(t, "srv")
	tok := toks["srv"]
	serverSW := hsmSoftKey(t, X25519)
	hsmImportKey(t, st, tok, serverSW, "server", hsmImportOpts{})
	serverKey := hsmOpen(t, hsmCfg(st, tok, "server"))
	serverKey.retryEvery = 100 * time.Millisecond
	client := hsmSoftKey(t, X25519)
	softServer := hsmSoftKey(t, X25519)

	ring, err := NewKeyring(
		Peer{Name: "server", PublicKey: serverKey.PublicKey()},
		Peer{Name: "soft", PublicKey: softServer.PublicKey()},
		Peer{Name: "client", PublicKey: client.PublicKey()},
	)
	if err != nil {
		t.Fatal(err)
	}
	logs := &hsmLogBuf{}
	serve := func(key StaticKey, logs io.Writer) string {
		logger := slog.New(slog.NewTextHandler(logs, nil))
		ln, err := Listen("tcp", "127.0.0.1:0", &Config{StaticKey: key, Keyring: ring, Logger: logger, HandshakeTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					io.Copy(c, c)
				}()
			}
		}()
		return ln.Addr().String()
	}
	addr, softAddr := serve(serverKey, logs), serve(softServer, io.Discard)
	clientCfg := &Config{StaticKey: client, Keyring: ring, Logger: hsmDiscardLogger, HandshakeTimeout: 10 * time.Second}
	dial := func(peer, addr string) (*Conn, error) {
		d := &Dialer{Config: clientCfg, Peer: peer}
		c, err := d.DialContext(context.Background(), "tcp", addr)
		if err != nil {
			return nil, err
		}
		return c.(*Conn), nil
	}
	echo := func(c *Conn, msg string) error {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if string(buf) != msg {
			return fmt.Errorf("echo %q", buf)
		}
		return nil
	}

	established, err := dial("server", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer established.Close()
	if err := echo(established, "before"); err != nil {
		t.Fatal(err)
	}

	if err := st.Reinit(tok); err != nil { // the key is gone
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if c, err := dial("server", addr); err == nil {
			c.Close()
			t.Fatal("handshake succeeded with the server key gone")
		}
	}
	// The handshakes failed because of the token, not the client.
	serverKey.st.Lock()
	keyErr := serverKey.failErr
	serverKey.st.Unlock()
	if !errors.Is(keyErr, ErrPKCS11NotFound) {
		t.Fatalf("server key state after the failed handshakes: %v", keyErr)
	}
	if err := echo(established, "during"); err != nil {
		t.Fatalf("established connection broke when the token went away: %v", err)
	}
	soft, err := dial("soft", softAddr)
	if err != nil {
		t.Fatalf("software-key listener: %v", err)
	}
	if err := echo(soft, "soft"); err != nil {
		t.Fatal(err)
	}
	soft.Close()

	hsmImportKey(t, st, tok, serverSW, "server", hsmImportOpts{})
	time.Sleep(150 * time.Millisecond)
	again, err := dial("server", addr)
	if err != nil {
		t.Fatalf("handshake after the key came back: %v", err)
	}
	if err := echo(again, "after"); err != nil {
		t.Fatal(err)
	}
	again.Close()

	time.Sleep(50 * time.Millisecond) // let the server log
	l := logs.String()
	if strings.Count(l, "outcome=failed") < 3 || strings.Count(l, "outcome=ok") < 2 || strings.Contains(l, hsmPIN) {
		t.Fatalf("server log: want 3 failed and 2 good handshakes, never the PIN:\n%s", l)
	}
	if !strings.Contains(l, "our static key failed: noisetor: pkcs11: DH with key") {
		t.Fatalf("the server log does not name the token failure:\n%s", l)
	}
}

// BenchmarkDH compares DH on SoftHSM with DH in software, one goroutine.
// BenchmarkDHParallel does the same from 4×GOMAXPROCS goroutines (the token
// key with MaxSessions 8).
func BenchmarkDH(b *testing.B)         { hsmBenchDH(b, false) }
func BenchmarkDHParallel(b *testing.B) { hsmBenchDH(b, true) }

func hsmBenchDH(b *testing.B, parallel bool) {
	st, toks := hsmStore(b, "bench")
	keys := map[string]StaticKey{}
	for _, c := range hsmCurves() {
		cfg := hsmCfg(st, toks["bench"], "bench-"+c.String())
		cfg.Curve, cfg.MaxSessions = c, 8
		keys["softhsm-"+c.String()] = hsmGenerate(b, cfg)
		keys["software-"+c.String()] = hsmSoftKey(b, c)
	}
	for _, name := range []string{"softhsm-x25519", "softhsm-p256", "software-x25519", "software-p256"} {
		k := keys[name]
		peer := hsmSoftKey(b, k.PublicKey().Curve()).PublicKey()
		b.Run(name, func(b *testing.B) {
			if parallel {
				b.SetParallelism(4)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := k.DH(peer); err != nil {
							b.Error(err)
							return
						}
					}
				})
			} else {
				for i := 0; i < b.N; i++ {
					if _, err := k.DH(peer); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "DH/s")
		})
	}
}

// BenchmarkHandshakePKCS11 runs whole handshakes (both ends in this process,
// over net.Pipe) with both static keys on SoftHSM and in software.
func BenchmarkHandshakePKCS11(b *testing.B) {
	st, toks := hsmStore(b, "hsbench")
	for _, c := range hsmCurves() {
		var hw [2]StaticKey
		for i := range hw {
			cfg := hsmCfg(st, toks["hsbench"], fmt.Sprintf("hs-%v-%d", c, i))
			cfg.Curve = c
			hw[i] = hsmGenerate(b, cfg)
		}
		sw := [2]StaticKey{hsmSoftKey(b, c), hsmSoftKey(b, c)}
		for _, p := range []Pattern{KK, XK} {
			for _, kind := range []string{"softhsm", "software"} {
				keys := hw
				if kind == "software" {
					keys = sw
				}
				b.Run(fmt.Sprintf("%s-%v-%v", kind, c, p), func(b *testing.B) {
					ring, _ := NewKeyring(Peer{Name: "a", PublicKey: keys[0].PublicKey()}, Peer{Name: "b", PublicKey: keys[1].PublicKey()})
					cfgA := &Config{StaticKey: keys[0], Keyring: ring, Patterns: []Pattern{p}, Logger: hsmDiscardLogger}
					cfgB := &Config{StaticKey: keys[1], Keyring: ring, Patterns: []Pattern{p}, Logger: hsmDiscardLogger}
					ctx := context.Background()
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						c1, c2 := net.Pipe()
						srv := Server(c2, cfgB)
						errc := make(chan error, 1)
						go func() { errc <- srv.HandshakeContext(ctx) }()
						cl := Client(c1, cfgA, "b")
						if err := cl.HandshakeContext(ctx); err != nil {
							b.Fatal(err)
						}
						if err := <-errc; err != nil {
							b.Fatal(err)
						}
						// Close the pipe first, so that Close does not wait
						// for the peer to read a close record.
						c1.Close()
						c2.Close()
						cl.Close()
						srv.Close()
					}
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
				})
			}
		}
	}
}
