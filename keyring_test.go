package noisetor

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha3"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// Keys of testdata/keyring/*.txt: the x25519 keys have scalars of 32 bytes
// 0x01 (alice), 0x02 (bob), 0x03 (dave_2), 0x04 (wallet); carol.hsm's P-256
// scalar is 32 bytes 0x01. The client-auth keys are the x25519 public keys of
// scalars 0x06 and 0x07; the onion address is from the ed25519 seed 0x01.
const (
	keyAlice  = "x25519:pOCSkrZRwni5dyxWn1-puxPZBrRqtoyd-dwrRAn4ogk"
	keyBob    = "x25519:zo060cy2M-x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk"
	keyCarol  = "p256:BG_wO5SSQc4drdQ1GeaWDgqFtBppoFwygQOqK84VlMoWPE91OlW_AdxT9sCwx-7ni0DG_30lqW4igrmJzvccFEo"
	keyDave   = "x25519:Xf7dO2vUf2-ijuFdlp1bsOpTd01Ii9r53xxuASSz7yI"
	keyWallet = "x25519:rAGyIJ6GNU-4UyN7XeD0-rE8f8v0M6YcAZNpYX_s8Qs"
	auth6     = "6WZNNZQPSR36GEGCTAW2VJWJCNWBBCQXO7CZI7SER6RX22AXIVLQ"
	auth7     = "CO7E72XK6ICMP7JTLD6JYADSDCA5C5BHQEUCE7WGOTZX677JPNWQ"
	onion1    = "rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5optfad.onion"
	// Real v3 onion addresses (torproject.org, duckduckgo.com).
	onionTor = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"
	onionDDG = "duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion"

	// goldenKeyringFingerprint is the fingerprint of testdata/keyring/valid.txt.
	// If it changes, the fingerprint format changed: that breaks every
	// operator's written-down fingerprint, so bump the domain's version.
	goldenKeyringFingerprint = "31860 00399 31397 47518 95365 88024"
)

// canonicalValid is what WriteTo writes for testdata/keyring/valid.txt.
const canonicalValid = keyringHeader +
	"alice " + keyAlice + " addr=" + onion1 + ":9000 auth=" + auth6 + "\n" +
	"bob " + keyBob + " addr=127.0.0.1:9001\n" +
	"carol.hsm " + keyCarol + " addr=[::1]:9002\n" +
	"dave_2 " + keyDave + " auth=" + auth7 + "\n" +
	"wallet " + keyWallet + " addr=localhost:9003\n"

func mustParseKey(t testing.TB, s string) PublicKey {
	t.Helper()
	k, err := ParsePublicKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func validPeers(t testing.TB) []Peer {
	return []Peer{
		{Name: "alice", PublicKey: mustParseKey(t, keyAlice), Address: onion1 + ":9000", ClientAuth: auth6},
		{Name: "bob", PublicKey: mustParseKey(t, keyBob), Address: "127.0.0.1:9001"},
		{Name: "carol.hsm", PublicKey: mustParseKey(t, keyCarol), Address: "[::1]:9002"},
		{Name: "dave_2", PublicKey: mustParseKey(t, keyDave), ClientAuth: auth7},
		{Name: "wallet", PublicKey: mustParseKey(t, keyWallet), Address: "localhost:9003"},
	}
}

// onionFor computes the v3 onion address of an ed25519 public key from
// rend-spec-v3 §6, for tests.
func onionFor(pub ed25519.PublicKey) string {
	h := sha3.New256()
	h.Write([]byte(".onion checksum"))
	h.Write(pub)
	h.Write([]byte{3})
	raw := append(append(bytes.Clone(pub), h.Sum(nil)[:2]...), 3)
	return strings.ToLower(base32.StdEncoding.EncodeToString(raw)) + ".onion"
}

func TestKeyringTestdataKeys(t *testing.T) {
	for seed, want := range map[byte]string{1: keyAlice, 2: keyBob, 3: keyDave, 4: keyWallet} {
		if got := testKey(t, X25519, seed).PublicKey().String(); got != want {
			t.Errorf("key of seed %d = %s, want %s", seed, got, want)
		}
	}
	if got := testKey(t, P256, 1).PublicKey().String(); got != keyCarol {
		t.Errorf("P-256 key of seed 1 = %s", got)
	}
	for seed, want := range map[byte]string{6: auth6, 7: auth7} {
		raw := testKey(t, X25519, seed).PublicKey().Bytes()
		if got := base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(raw); got != want {
			t.Errorf("auth key of seed %d = %s, want %s", seed, got, want)
		}
	}
	pub := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, 32)).Public().(ed25519.PublicKey)
	if got := onionFor(pub); got != onion1 {
		t.Errorf("onion of seed 1 = %s, want %s", got, onion1)
	}
}

func TestKeyringParseFile(t *testing.T) {
	want := validPeers(t)
	for _, name := range []string{"valid.txt", "reordered.txt"} {
		t.Run(name, func(t *testing.T) {
			k, err := LoadKeyring(filepath.Join("testdata", "keyring", name))
			if err != nil {
				t.Fatal(err)
			}
			if got := k.Peers(); !slices.Equal(got, want) {
				t.Fatalf("Peers() =\n%v\nwant\n%v", got, want)
			}
			if k.Len() != len(want) {
				t.Fatalf("Len() = %d", k.Len())
			}
			var b bytes.Buffer
			n, err := k.WriteTo(&b)
			if err != nil || n != int64(b.Len()) {
				t.Fatalf("WriteTo = %d, %v (wrote %d)", n, err, b.Len())
			}
			if b.String() != canonicalValid {
				t.Fatalf("WriteTo wrote\n%s\nwant\n%s", b.String(), canonicalValid)
			}
			if fp := k.Fingerprint(); fp != goldenKeyringFingerprint {
				t.Fatalf("Fingerprint() = %q, want %q", fp, goldenKeyringFingerprint)
			}
		})
	}
}

// TestKeyringFingerprintSpec recomputes the fingerprint from the text of
// notes/keyring-spec.md: SHA-256 over the domain, a zero byte and the peer
// lines (without the header comment) as WriteTo writes them.
func TestKeyringFingerprintSpec(t *testing.T) {
	lines := strings.TrimPrefix(canonicalValid, keyringHeader)
	if got := fingerprintFromSpec("noisetor keyring fingerprint v1", []byte(lines)); got != goldenKeyringFingerprint {
		t.Fatalf("spec fingerprint = %q, want %q", got, goldenKeyringFingerprint)
	}
	var empty Keyring
	if got, want := empty.Fingerprint(), "34849 74980 07206 63536 34414 42053"; got != want {
		t.Fatalf("empty keyring fingerprint = %q, want %q", got, want)
	}
	var nilk *Keyring
	if nilk.Fingerprint() != empty.Fingerprint() || nilk.Len() != 0 || nilk.Peers() != nil {
		t.Fatal("a nil keyring is not empty")
	}
}

// Any change to any field of any peer changes the fingerprint.
func TestKeyringFingerprintSensitivity(t *testing.T) {
	base, err := NewKeyring(validPeers(t)...)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{base.Fingerprint(): "base"}
	mutate := map[string]func(ps []Peer){
		"rename":       func(ps []Peer) { ps[1].Name = "bob2" },
		"other key":    func(ps []Peer) { ps[1].PublicKey = testKey(t, X25519, 0x11).PublicKey() },
		"swap keys":    func(ps []Peer) { ps[0].PublicKey, ps[1].PublicKey = ps[1].PublicKey, ps[0].PublicKey },
		"other port":   func(ps []Peer) { ps[1].Address = "127.0.0.1:9009" },
		"no address":   func(ps []Peer) { ps[1].Address = "" },
		"other auth":   func(ps []Peer) { ps[0].ClientAuth = auth7 },
		"no auth":      func(ps []Peer) { ps[0].ClientAuth = "" },
		"add auth":     func(ps []Peer) { ps[1].ClientAuth = auth6 },
		"swap address": func(ps []Peer) { ps[1].Address, ps[2].Address = ps[2].Address, ps[1].Address },
	}
	for name, f := range mutate {
		ps := validPeers(t)
		f(ps)
		k, err := NewKeyring(ps...)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		fp := k.Fingerprint()
		if other, ok := seen[fp]; ok {
			t.Errorf("%s: same fingerprint as %s", name, other)
		}
		seen[fp] = name
	}
	// Removing a peer.
	k, _ := NewKeyring(validPeers(t)[1:]...)
	if _, ok := seen[k.Fingerprint()]; ok {
		t.Error("removing a peer kept the fingerprint")
	}
	// The order of Add does not matter.
	ps := validPeers(t)
	slices.Reverse(ps)
	k, _ = NewKeyring(ps...)
	if k.Fingerprint() != base.Fingerprint() {
		t.Error("the order of peers changed the fingerprint")
	}
}

func TestKeyringRoundTrip(t *testing.T) {
	ps := validPeers(t)
	ps = append(ps,
		Peer{Name: "e", PublicKey: testKey(t, P256, 2).PublicKey(), Address: onionTor + ":443"},
		Peer{Name: "f-9.x_y", PublicKey: testKey(t, X25519, 0x21).PublicKey(), Address: "[2001:db8::1]:1"},
		Peer{Name: strings.Repeat("z", 64), PublicKey: testKey(t, X25519, 0x22).PublicKey(), Address: "a-b.example.org:65535"},
	)
	k, err := NewKeyring(ps...)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "peers.txt")
	if err := k.Save(path); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o644 {
		t.Fatalf("saved keyring has mode %v, want 0644", st.Mode().Perm())
	}
	k2, err := LoadKeyring(path)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(k.Peers(), k2.Peers()) || k.Fingerprint() != k2.Fingerprint() {
		t.Fatalf("round trip changed the keyring:\n%v\n%v", k.Peers(), k2.Peers())
	}
	for _, p := range ps {
		if got, ok := k2.ByName(p.Name); !ok || got != p {
			t.Errorf("ByName(%q) = %v, %v", p.Name, got, ok)
		}
		if got, ok := k2.ByKey(p.PublicKey); !ok || got != p {
			t.Errorf("ByKey(%v) = %v, %v", p.PublicKey, got, ok)
		}
		if got, ok := k2.ByAddress(p.Address); ok != (p.Address != "") || (ok && got != p) {
			t.Errorf("ByAddress(%q) = %v, %v", p.Address, got, ok)
		}
	}
	// No temporary files are left behind.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("directory holds %d files after Save", len(ents))
	}
}

func TestKeyringSave(t *testing.T) {
	k, err := NewKeyring(validPeers(t)...)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "peers.txt")
	t.Run("replaces", func(t *testing.T) {
		if err := os.WriteFile(path, []byte("old\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := k.Save(path); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(path)
		if string(b) != canonicalValid {
			t.Fatalf("saved\n%s", b)
		}
		st, _ := os.Stat(path)
		if st.Mode().Perm() != 0o644 {
			t.Fatalf("mode %v after replacing a 0600 file, want 0644", st.Mode().Perm())
		}
	})
	t.Run("missing directory", func(t *testing.T) {
		if err := k.Save(filepath.Join(dir, "no", "peers.txt")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Save into a missing directory = %v", err)
		}
	})
	t.Run("onto a directory", func(t *testing.T) {
		sub := filepath.Join(dir, "sub")
		os.Mkdir(sub, 0o755)
		os.WriteFile(filepath.Join(sub, "x"), nil, 0o644)
		if err := k.Save(sub); err == nil {
			t.Fatal("Save over a non-empty directory succeeded")
		}
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if strings.Contains(e.Name(), ".tmp-") {
				t.Fatalf("temporary file %s left behind", e.Name())
			}
		}
	})
	t.Run("relative path", func(t *testing.T) {
		t.Chdir(dir)
		if err := k.Save("rel.txt"); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadKeyring("rel.txt"); err != nil {
			t.Fatal(err)
		}
	})
}

func TestLoadKeyringPermissions(t *testing.T) {
	dir := t.TempDir()
	for _, mode := range []os.FileMode{0o664, 0o646, 0o666, 0o622, 0o660} {
		t.Run(fmt.Sprintf("%04o", mode), func(t *testing.T) {
			path := filepath.Join(dir, fmt.Sprintf("k%o", mode))
			os.WriteFile(path, []byte(canonicalValid), 0o600)
			if err := os.Chmod(path, mode); err != nil {
				t.Fatal(err)
			}
			_, err := LoadKeyring(path)
			var ke *KeyringError
			if !errors.Is(err, fs.ErrPermission) || !errors.As(err, &ke) || ke.Path != path || ke.Line != 0 {
				t.Fatalf("LoadKeyring(mode %04o) = %v, want a KeyringError matching fs.ErrPermission", mode, err)
			}
			if !strings.Contains(err.Error(), "chmod 644") {
				t.Errorf("error %q does not say how to fix it", err)
			}
		})
	}
	for _, mode := range []os.FileMode{0o644, 0o600, 0o444, 0o640} {
		path := filepath.Join(dir, fmt.Sprintf("ok%o", mode))
		os.WriteFile(path, []byte(canonicalValid), 0o600)
		os.Chmod(path, mode)
		if _, err := LoadKeyring(path); err != nil {
			t.Errorf("LoadKeyring(mode %04o): %v", mode, err)
		}
	}
	if _, err := LoadKeyring(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) ||
		!strings.HasPrefix(err.Error(), "noisetor: ") {
		t.Errorf("LoadKeyring(missing) = %v, want fs.ErrNotExist", err)
	}
}

func TestLoadKeyringTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.txt")
	big := bytes.Repeat([]byte("# padding padding padding padding padding padding padding padding\n"), (1<<20)/64)
	if err := os.WriteFile(path, append([]byte(canonicalValid), big...), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadKeyring(path)
	var ke *KeyringError
	if !errors.As(err, &ke) || ke.Line != 0 || !strings.Contains(err.Error(), "larger than 1 MiB") {
		t.Fatalf("LoadKeyring(> 1 MiB) = %v", err)
	}
	// Just under the limit is fine.
	if err := os.WriteFile(path, append([]byte(canonicalValid), big[:1<<20-len(canonicalValid)]...), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyring(path); err != nil {
		t.Fatalf("LoadKeyring(1 MiB): %v", err)
	}
}

// lowOrderKeyText returns a low-order X25519 point in key text form.
func lowOrderKeyText(raw []byte) string {
	return "x25519:" + base64.RawURLEncoding.EncodeToString(raw)
}

func TestKeyringMalformed(t *testing.T) {
	const head = "# peers\nalice " + keyAlice + " addr=127.0.0.1:9000 auth=" + auth6 + "\n"
	privAlice := strings.TrimSpace(string(testKey(t, X25519, 1).MarshalPrivateText()))
	onionBad := []byte(onionTor)
	onionBad[10] = 'a' // a typo
	// An onion address of version 2 with a correct checksum.
	v2raw, _ := base32.StdEncoding.DecodeString(strings.ToUpper(strings.TrimSuffix(onionTor, ".onion")))
	v2raw[34] = 2
	h := sha3.New256()
	h.Write([]byte(".onion checksum"))
	h.Write(v2raw[:32])
	h.Write([]byte{2})
	copy(v2raw[32:34], h.Sum(nil))
	onionV2 := strings.ToLower(base32.StdEncoding.EncodeToString(v2raw)) + ".onion"

	type tc struct {
		input string
		line  int
		is    error
		msg   string // a substring of the error, after "peers.txt:<line>: "
	}
	cases := map[string]tc{
		"one field":        {head + "bob\n", 3, ErrBadPeer, "want <name> <public-key>"},
		"upper-case name":  {head + "Bob " + keyBob + "\n", 3, ErrBadPeer, "invalid peer name"},
		"name starts dash": {head + "-bob " + keyBob + "\n", 3, ErrBadPeer, "invalid peer name"},
		"name starts dot":  {head + ".bob " + keyBob + "\n", 3, ErrBadPeer, "invalid peer name"},
		"name too long":    {head + strings.Repeat("b", 65) + " " + keyBob + "\n", 3, ErrBadPeer, "longer than 64"},
		"name non-ascii":   {head + "böb " + keyBob + "\n", 3, ErrBadPeer, "invalid peer name"},
		"name with colon":  {head + "bob: " + keyBob + "\n", 3, ErrBadPeer, "invalid peer name"},
		"bad base64":       {head + "bob x25519:zo060cy2M+x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk\n", 3, ErrBadKey, "public key: bad key"},
		"short key":        {head + "bob x25519:zo060cy2M\n", 3, ErrBadKey, "public key: bad key"},
		"unknown curve":    {head + "bob ed25519:zo060cy2M-x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk\n", 3, ErrBadKey, "unknown curve"},
		"missing key":      {head + "bob addr=127.0.0.1:1\n", 3, ErrBadPeer, "second field must be the public key"},
		"unknown field":    {head + "bob " + keyBob + " port=9000\n", 3, ErrBadPeer, `unknown field "port"`},
		"upper field":      {head + "bob " + keyBob + " ADDR=127.0.0.1:1\n", 3, ErrBadPeer, "unknown field"},
		"bare field":       {head + "bob " + keyBob + " 127.0.0.1:9001\n", 3, ErrBadPeer, "unexpected field"},
		"two keys":         {head + "bob " + keyBob + " " + keyDave + "\n", 3, ErrBadPeer, "unexpected field"},
		"addr twice":       {head + "bob " + keyBob + " addr=127.0.0.1:1 addr=127.0.0.1:2\n", 3, ErrBadPeer, "addr= given twice"},
		"auth twice":       {head + "bob " + keyBob + " auth=" + auth7 + " auth=" + auth7 + "\n", 3, ErrBadPeer, "auth= given twice"},
		"empty addr":       {head + "bob " + keyBob + " addr=\n", 3, ErrBadPeer, "empty addr="},
		"empty auth":       {head + "bob " + keyBob + " auth=\n", 3, ErrBadPeer, "empty auth="},
		"addr no port":     {head + "bob " + keyBob + " addr=127.0.0.1\n", 3, ErrBadPeer, "want host:port"},
		"addr port 0":      {head + "bob " + keyBob + " addr=127.0.0.1:0\n", 3, ErrBadPeer, "port must be"},
		"addr port 65536":  {head + "bob " + keyBob + " addr=127.0.0.1:65536\n", 3, ErrBadPeer, "port must be"},
		"addr port 09000":  {head + "bob " + keyBob + " addr=127.0.0.1:09000\n", 3, ErrBadPeer, "port must be"},
		"addr port name":   {head + "bob " + keyBob + " addr=127.0.0.1:http\n", 3, ErrBadPeer, "port must be"},
		"addr v6 no []":    {head + "bob " + keyBob + " addr=::1:9000\n", 3, ErrBadPeer, "want host:port"},
		"addr v6 zone":     {head + "bob " + keyBob + " addr=[fe80::1%eth0]:9000\n", 3, ErrBadPeer, "zones"},
		"addr empty host":  {head + "bob " + keyBob + " addr=:9000\n", 3, ErrBadPeer, "host must be"},
		"addr underscore":  {head + "bob " + keyBob + " addr=a_b.example:9000\n", 3, ErrBadPeer, "host must be"},
		"addr short ipv4":  {head + "bob " + keyBob + " addr=127.1:9000\n", 3, ErrBadPeer, "host must be"},
		"addr octal ipv4":  {head + "bob " + keyBob + " addr=010.0.0.1:9000\n", 3, ErrBadPeer, "host must be"},
		"addr dash label":  {head + "bob " + keyBob + " addr=-a.example:9000\n", 3, ErrBadPeer, "host must be"},
		"addr trailing .":  {head + "bob " + keyBob + " addr=example.org.:9000\n", 3, ErrBadPeer, "host must be"},
		"onion v2 length":  {head + "bob " + keyBob + " addr=expyuzz4wqqyqhjn.onion:80\n", 3, ErrBadPeer, "56 base32 characters"},
		"onion checksum":   {head + "bob " + keyBob + " addr=" + string(onionBad) + ":80\n", 3, ErrBadPeer, "checksum"},
		"onion version":    {head + "bob " + keyBob + " addr=" + onionV2 + ":80\n", 3, ErrBadPeer, "version 2"},
		"onion subdomain":  {head + "bob " + keyBob + " addr=www." + onionTor + ":80\n", 3, ErrBadPeer, "56 base32 characters"},
		"onion base32":     {head + "bob " + keyBob + " addr=" + strings.Replace(onionTor, "2", "1", 1) + ":80\n", 3, ErrBadPeer, "not valid base32"},
		"auth short":       {head + "bob " + keyBob + " auth=" + auth7[:51] + "\n", 3, ErrBadKey, "52 base32"},
		"auth padded":      {head + "bob " + keyBob + " auth=" + auth7 + "====\n", 3, ErrBadKey, "52 base32"},
		"auth not base32":  {head + "bob " + keyBob + " auth=" + auth7[:51] + "1\n", 3, ErrBadKey, "not a base32"},
		"auth trail bits":  {head + "bob " + keyBob + " auth=" + auth7[:51] + "R\n", 3, ErrBadKey, "not a base32"},
		"auth low order":   {head + "bob " + keyBob + " auth=" + strings.Repeat("A", 52) + "\n", 3, ErrBadKey, "low-order"},
		"auth wrong curve": {head + "bob " + keyBob + " auth=descriptor:ed25519:" + auth7 + "\n", 3, ErrBadKey, "want descriptor:x25519:"},
		"auth_private": {head + "bob " + keyBob + " auth=" + strings.TrimSuffix(onionTor, ".onion") + ":descriptor:x25519:" + auth7 + "\n",
			3, ErrBadKey, ".auth_private"},
		"private key as key":     {head + "bob " + privAlice + "\n", 3, ErrBadKey, "PRIVATE key"},
		"private key lower case": {head + "bob " + strings.ToLower(privAlice) + "\n", 3, ErrBadKey, "PRIVATE key"},
		"private key as name":    {head + privAlice + " " + keyBob + "\n", 3, ErrBadKey, "PRIVATE key"},
		"private key in addr":    {head + "bob " + keyBob + " addr=" + privAlice + "\n", 3, ErrBadKey, "PRIVATE key"},
		"private key in comment": {head + "bob " + keyBob + " # was " + privAlice + "\n", 3, ErrBadKey, "PRIVATE key"},
		"private key alone":      {head + "\n\n" + privAlice + "\n", 5, ErrBadKey, "PRIVATE key"},
		"invalid utf-8":          {head + "# caf\xe9\n", 3, ErrBadPeer, "UTF-8"},
		"CR CR LF":               {head + "bob " + keyBob + "\r\r\n", 3, ErrBadPeer, "stray carriage return"},
		"CR at end of file":      {head + "bob " + keyBob + "\r", 3, ErrBadPeer, "stray carriage return"},
		"CR inside key":          {head + "bob " + keyBob[:20] + "\r" + keyBob[20:] + "\n", 3, ErrBadPeer, "stray carriage return"},
		"CR in comment":          {head + "# x\r\r\n", 3, ErrBadPeer, "stray carriage return"},
		"nul byte":               {head + "bob\x00 " + keyBob + "\n", 3, ErrBadPeer, "invalid peer name"},
		"long line":              {head + "bob " + keyBob + " #" + strings.Repeat("x", 4096) + "\n", 3, ErrBadPeer, "longer than 4096"},
		"duplicate name": {head + "bob " + keyBob + "\n\nwallet " + keyWallet + "\n# x\n\nalice " + keyDave + "\n",
			8, ErrDuplicatePeer, `duplicate name "alice" (first on line 2)`},
		"duplicate key": {head + "bob " + keyBob + "\nalice2 " + keyAlice + "\n",
			4, ErrDuplicatePeer, `duplicate public key (first on line 2, peer "alice")`},
		"duplicate key p256": {head + "c " + keyCarol + "\nd " + keyCarol + "\n",
			4, ErrDuplicatePeer, `duplicate public key (first on line 3, peer "c")`},
		"duplicate address": {head + "bob " + keyBob + " addr=127.0.0.1:9000\n",
			3, ErrDuplicatePeer, `duplicate address 127.0.0.1:9000 (first on line 2, peer "alice")`},
		"duplicate address mapped": {head + "bob " + keyBob + " addr=[::ffff:127.0.0.1]:9000\n",
			3, ErrDuplicatePeer, `duplicate address 127.0.0.1:9000 (first on line 2, peer "alice")`},
		"duplicate onion case": {head + "bob " + keyBob + " addr=" + onionTor + ":80\ndave " + keyDave + " addr=" + strings.ToUpper(onionTor) + ":80\n",
			4, ErrDuplicatePeer, "duplicate address " + onionTor + ":80 (first on line 3"},
		"duplicate host case": {head + "bob " + keyBob + " addr=Example.ORG:80\ndave " + keyDave + " addr=example.org:80\n",
			4, ErrDuplicatePeer, "duplicate address example.org:80"},
	}
	for i, raw := range lowOrderX25519(t) {
		cases[fmt.Sprintf("low order %d %x", i, raw[:2])] = tc{head + "evil " + lowOrderKeyText(raw) + "\n", 3, ErrBadKey, "public key: bad key"}
	}
	// Each valid key also has non-canonical encodings: with bit 255 set,
	// and as u+p for u < 19 (not valid points here).
	cases["non-canonical key"] = tc{head + "evil " + lowOrderKeyText(setTopBit(mustParseKey(t, keyAlice).Bytes())) + "\n", 3, ErrBadKey, "not canonically encoded"}

	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := parseKeyring("peers.txt", strings.NewReader(c.input))
			if err == nil {
				t.Fatal("parsed without error")
			}
			var ke *KeyringError
			if !errors.As(err, &ke) {
				t.Fatalf("error %v is not a *KeyringError", err)
			}
			if ke.Path != "peers.txt" || ke.Line != c.line {
				t.Errorf("error at %s:%d, want peers.txt:%d: %v", ke.Path, ke.Line, c.line, err)
			}
			if !errors.Is(err, c.is) {
				t.Errorf("error %v does not match %v", err, c.is)
			}
			for _, other := range []error{ErrBadPeer, ErrBadKey, ErrDuplicatePeer} {
				if other != c.is && errors.Is(err, other) {
					t.Errorf("error %v also matches %v", err, other)
				}
			}
			prefix := fmt.Sprintf("noisetor: keyring peers.txt:%d: ", c.line)
			if msg := err.Error(); !strings.HasPrefix(msg, prefix) || !strings.Contains(msg[len(prefix):], c.msg) {
				t.Errorf("error %q, want %q followed by ...%s...", msg, prefix, c.msg)
			}
			if strings.Contains(err.Error(), privAlice[len("NOISETOR-PRIVATE-KEY-X25519:"):]) ||
				strings.Count(err.Error(), "noisetor: ") != 1 {
				t.Errorf("bad error text %q", err)
			}
			// The same through ParseKeyring (no path) and LoadKeyring.
			_, err = ParseKeyring(strings.NewReader(c.input))
			if !strings.HasPrefix(fmt.Sprint(err), fmt.Sprintf("noisetor: keyring line %d: ", c.line)) {
				t.Errorf("ParseKeyring error %q", err)
			}
		})
	}
}

func TestKeyringErrorMessage(t *testing.T) {
	// The exact form operators see.
	_, err := LoadKeyring("testdata/keyring/dup-name.txt")
	want := `noisetor: keyring testdata/keyring/dup-name.txt:8: duplicate name "wallet" (first on line 4)`
	if err == nil || err.Error() != want {
		t.Errorf("LoadKeyring(dup-name.txt) = %v\nwant %s", err, want)
	}
	for _, tc := range []struct {
		file string
		line int
		is   error
	}{{"low-order.txt", 3, ErrBadKey}, {"private-key.txt", 2, ErrBadKey}} {
		_, err := LoadKeyring("testdata/keyring/" + tc.file)
		var ke *KeyringError
		if !errors.As(err, &ke) || ke.Line != tc.line || !errors.Is(err, tc.is) {
			t.Errorf("LoadKeyring(%s) = %v, want line %d, %v", tc.file, err, tc.line, tc.is)
		}
	}
	for _, tc := range []struct {
		e    KeyringError
		want string
	}{
		{KeyringError{Path: "p", Line: 3, Err: errors.New("x")}, "noisetor: keyring p:3: x"},
		{KeyringError{Path: "p", Err: errors.New("x")}, "noisetor: keyring p: x"},
		{KeyringError{Line: 3, Err: errors.New("x")}, "noisetor: keyring line 3: x"},
		{KeyringError{Err: errors.New("x")}, "noisetor: keyring: x"},
	} {
		if got := tc.e.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
	}
}

// Values that fail validation are never quoted in errors: a secret pasted
// into the wrong place must not end up in a log.
func TestKeyringErrorsDoNotEchoInput(t *testing.T) {
	secret := base64.RawURLEncoding.EncodeToString(bytes.Repeat([]byte{0xa7, 0x13, 0x5c}, 11)) // looks like a raw key
	b32secret := base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(bytes.Repeat([]byte{0xa7}, 32))
	for name, line := range map[string]string{
		"as name":         secret + " " + keyBob,
		"as key":          "bob " + secret,
		"as curve key":    "bob x25519:" + secret,
		"as field":        "bob " + keyBob + " " + secret,
		"as field name":   "bob " + keyBob + " " + secret + "=1",
		"as field value":  "bob " + keyBob + " foo=" + secret,
		"as addr":         "bob " + keyBob + " addr=" + secret,
		"as addr port":    "bob " + keyBob + " addr=a:" + secret,
		"as auth":         "bob " + keyBob + " auth=" + secret,
		"as auth private": "bob " + keyBob + " auth=" + strings.TrimSuffix(onionTor, ".onion") + ":descriptor:x25519:" + b32secret,
		"as onion":        "bob " + keyBob + " addr=" + strings.ToLower(b32secret) + "abcd.onion:80",
	} {
		_, err := ParseKeyring(strings.NewReader(line + "\n"))
		if err == nil {
			t.Errorf("%s: parsed", name)
			continue
		}
		if strings.Contains(err.Error(), secret[4:30]) || strings.Contains(strings.ToUpper(err.Error()), b32secret[4:30]) {
			t.Errorf("%s: error echoes the input: %v", name, err)
		}
	}
}

func TestKeyringAdd(t *testing.T) {
	var k Keyring // the zero value is usable
	alice := Peer{Name: "alice", PublicKey: mustParseKey(t, keyAlice), Address: "LOCALHOST:9000", ClientAuth: "descriptor:x25519:" + strings.ToLower(auth6)}
	if err := k.Add(alice); err != nil {
		t.Fatal(err)
	}
	got, ok := k.ByName("alice")
	if !ok || got.Address != "localhost:9000" || got.ClientAuth != auth6 {
		t.Fatalf("Add did not normalise: %+v", got)
	}
	for name, tc := range map[string]struct {
		p   Peer
		is  error
		msg string
	}{
		"same name":      {Peer{Name: "alice", PublicKey: mustParseKey(t, keyBob)}, ErrDuplicatePeer, `noisetor: the keyring already has a peer named "alice"`},
		"same key":       {Peer{Name: "bob", PublicKey: mustParseKey(t, keyAlice)}, ErrDuplicatePeer, `noisetor: peer "bob": its public key is already in the keyring as peer "alice"`},
		"same address":   {Peer{Name: "bob", PublicKey: mustParseKey(t, keyBob), Address: "localhost:9000"}, ErrDuplicatePeer, `noisetor: peer "bob": address localhost:9000 is already in the keyring as peer "alice"`},
		"no key":         {Peer{Name: "bob"}, ErrBadKey, `noisetor: peer "bob" has no public key`},
		"bad name":       {Peer{Name: "Bob", PublicKey: mustParseKey(t, keyBob)}, ErrBadPeer, "noisetor: invalid peer name"},
		"empty name":     {Peer{PublicKey: mustParseKey(t, keyBob)}, ErrBadPeer, "noisetor: empty peer name"},
		"bad address":    {Peer{Name: "bob", PublicKey: mustParseKey(t, keyBob), Address: "bob"}, ErrBadPeer, `noisetor: peer "bob": address: want host:port`},
		"bad auth":       {Peer{Name: "bob", PublicKey: mustParseKey(t, keyBob), ClientAuth: "x"}, ErrBadKey, `noisetor: peer "bob": auth: bad key`},
		"low-order auth": {Peer{Name: "bob", PublicKey: mustParseKey(t, keyBob), ClientAuth: strings.Repeat("A", 52)}, ErrBadKey, "low-order"},
	} {
		t.Run(name, func(t *testing.T) {
			err := k.Add(tc.p)
			if !errors.Is(err, tc.is) || !strings.Contains(fmt.Sprint(err), tc.msg) {
				t.Fatalf("Add = %v, want %v containing %q", err, tc.is, tc.msg)
			}
			var ke *KeyringError
			if errors.As(err, &ke) {
				t.Fatalf("Add returned a KeyringError")
			}
			if k.Len() != 1 {
				t.Fatalf("a failed Add changed the keyring")
			}
		})
	}
	// Peers without addresses do not collide with each other.
	for i, key := range []string{keyBob, keyDave, keyCarol} {
		if err := k.Add(Peer{Name: fmt.Sprint("p", i), PublicKey: mustParseKey(t, key)}); err != nil {
			t.Fatal(err)
		}
	}
	if k.Len() != 4 {
		t.Fatalf("Len() = %d", k.Len())
	}
	if _, err := NewKeyring(validPeers(t)[0], validPeers(t)[0]); !errors.Is(err, ErrDuplicatePeer) {
		t.Fatalf("NewKeyring(duplicates) = %v", err)
	}
	// Mutating a returned slice does not change the keyring.
	ps := k.Peers()
	ps[0].Name = "mallory"
	if _, ok := k.ByName("mallory"); ok {
		t.Fatal("Peers() aliases the keyring")
	}
}

func TestKeyringLookups(t *testing.T) {
	k, err := NewKeyring(validPeers(t)...)
	if err != nil {
		t.Fatal(err)
	}
	alice := validPeers(t)[0]
	for _, addr := range []string{onion1 + ":9000", strings.ToUpper(onion1) + ":9000"} {
		if p, ok := k.ByAddress(addr); !ok || p != alice {
			t.Errorf("ByAddress(%q) = %v, %v", addr, p, ok)
		}
	}
	bob := validPeers(t)[1]
	for _, addr := range []string{"127.0.0.1:9001", "[::ffff:127.0.0.1]:9001", "[127.0.0.1]:9001"} {
		if p, ok := k.ByAddress(addr); !ok || p != bob {
			t.Errorf("ByAddress(%q) = %v, %v", addr, p, ok)
		}
	}
	if p, ok := k.ByAddress("[0::1]:9002"); !ok || p.Name != "carol.hsm" {
		t.Errorf("ByAddress([0::1]:9002) = %v, %v", p, ok)
	}
	for _, addr := range []string{"127.0.0.1:9000", "127.0.0.1", "", "localhost:9003x", onion1, "[::1]:09002"} {
		if p, ok := k.ByAddress(addr); ok {
			t.Errorf("ByAddress(%q) found %v", addr, p)
		}
	}
	for _, name := range []string{"", "ALICE", "alice ", "carol"} {
		if p, ok := k.ByName(name); ok {
			t.Errorf("ByName(%q) found %v", name, p)
		}
	}
	if p, ok := k.ByKey(PublicKey{}); ok {
		t.Errorf("ByKey(zero) found %v", p)
	}
	if p, ok := k.ByKey(testKey(t, X25519, 0x42).PublicKey()); ok {
		t.Errorf("ByKey(unknown) found %v", p)
	}
	// A P-256 key and an X25519 key never match each other.
	if p, ok := k.ByKey(testKey(t, X25519, 1).PublicKey()); !ok || p.Name != "alice" {
		t.Errorf("ByKey(alice) = %v, %v", p, ok)
	}
	var nilk *Keyring
	if _, ok := nilk.ByName("alice"); ok {
		t.Error("nil keyring found a name")
	}
	if _, ok := nilk.ByKey(alice.PublicKey); ok {
		t.Error("nil keyring found a key")
	}
	if _, ok := nilk.ByAddress(alice.Address); ok {
		t.Error("nil keyring found an address")
	}
}

func TestOnionAddresses(t *testing.T) {
	for _, o := range []string{onionTor, onionDDG, onion1} {
		if err := checkOnion(o); err != nil {
			t.Errorf("checkOnion(%s): %v", o, err)
		}
	}
	for seed := byte(0); seed < 20; seed++ {
		pub := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, 32)).Public().(ed25519.PublicKey)
		if err := checkOnion(onionFor(pub)); err != nil {
			t.Errorf("checkOnion(%s): %v", onionFor(pub), err)
		}
	}
	// Every single-character substitution is checked exactly: accepted only
	// if it is itself a valid address. The checksum has 16 bits, so about one
	// typo in 65536 is a valid address: onionTor has one such neighbour.
	const alphabet = "abcdefghijklmnopqrstuvwxyz234567"
	accepted := 0
	for i := range 56 {
		for j := range alphabet {
			b := []byte(onionTor)
			if b[i] == alphabet[j] {
				continue
			}
			b[i] = alphabet[j]
			raw, err := base32.StdEncoding.DecodeString(strings.ToUpper(string(b[:56])))
			valid := err == nil && raw[34] == 3 && onionFor(raw[:32]) == string(b)
			if err := checkOnion(string(b)); (err == nil) != valid {
				t.Errorf("checkOnion(%s) = %v, want valid=%v", b, err, valid)
			}
			if valid {
				accepted++
			}
		}
	}
	if accepted > 3 {
		t.Errorf("%d of 1736 typos are valid addresses", accepted)
	}
}

func TestKeyringConcurrent(t *testing.T) {
	k, err := NewKeyring(validPeers(t)...)
	if err != nil {
		t.Fatal(err)
	}
	const writers, perWriter = 4, 25
	keys := make([][]PublicKey, writers)
	for w := range keys {
		for i := range perWriter {
			keys[w] = append(keys[w], testKey(t, X25519, byte(0x40+w*perWriter+i)).PublicKey())
		}
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range writers {
		wg.Go(func() {
			for i, key := range keys[w] {
				p := Peer{Name: fmt.Sprintf("w%d-%d", w, i), PublicKey: key, Address: fmt.Sprintf("10.0.%d.%d:9000", w, i+1)}
				if err := k.Add(p); err != nil {
					t.Error(err)
				}
			}
		})
	}
	// Racing Adds of one name: exactly one wins.
	var wins sync.Map
	for i := range 8 {
		wg.Go(func() {
			err := k.Add(Peer{Name: "race", PublicKey: testKey(t, X25519, byte(0xd0+i)).PublicKey()})
			if err == nil {
				wins.Store(i, true)
			} else if !errors.Is(err, ErrDuplicatePeer) {
				t.Error(err)
			}
		})
	}
	var readers sync.WaitGroup
	for range 4 {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, ok := k.ByName("alice"); !ok {
					t.Error("alice vanished")
				}
				k.ByKey(mustParseKey(t, keyBob))
				k.ByAddress("127.0.0.1:9001")
				ps := k.Peers()
				if !slices.IsSortedFunc(ps, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) }) {
					t.Error("Peers() not sorted")
				}
				k.Fingerprint()
				var b bytes.Buffer
				k.WriteTo(&b)
				k.Len()
			}
		})
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	n := 0
	wins.Range(func(_, _ any) bool { n++; return true })
	if n != 1 {
		t.Fatalf("%d concurrent Adds of one name succeeded", n)
	}
	if want := len(validPeers(t)) + writers*perWriter + 1; k.Len() != want {
		t.Fatalf("Len() = %d, want %d", k.Len(), want)
	}
	var b bytes.Buffer
	k.WriteTo(&b)
	k2, err := ParseKeyring(&b)
	if err != nil || k2.Fingerprint() != k.Fingerprint() {
		t.Fatalf("round trip after concurrent use: %v", err)
	}
}

var fuzzSeeds = []string{
	"",
	"\n\n# only comments\n",
	"alice " + keyAlice + "\n",
	"alice " + keyAlice,
	"alice " + keyAlice + " addr=[::1]:1 auth=" + auth6 + "\r\n",
	"alice\t" + keyAlice + "\taddr=" + onionTor + ":80 # c\n",
	"alice " + keyAlice + "\nalice " + keyBob + "\n",
	"alice " + keyAlice + "\nbob " + keyAlice + "\n",
	"a " + keyAlice + " addr=h:1\nb " + keyBob + " addr=H:1\n",
	"a " + keyAlice + " auth=descriptor:x25519:" + auth7 + "\n",
	"a " + keyAlice + " addr=[::ffff:10.0.0.1]:5\n",
	"a x25519:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
	"a NOISETOR-PRIVATE-KEY-X25519:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE\n",
	"\ufeffa " + keyCarol + "\n",
	"a " + keyAlice + " foo=bar\n",
	"a " + keyAlice + " addr=\n",
	"a#b " + keyAlice + "\n",
	"# caf\xe9\n",
}

// FuzzParseKeyring checks that the parser never panics, that what it accepts
// survives WriteTo and ParseKeyring unchanged, and that its errors are well
// formed. Its seeds (the files in testdata/keyring too) run as a plain test.
func FuzzParseKeyring(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "keyring", "*.txt"))
	if err != nil || len(files) == 0 {
		f.Fatalf("no seed files: %v", err)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		k, err := ParseKeyring(bytes.NewReader(data))
		if err != nil {
			var ke *KeyringError
			if !errors.As(err, &ke) {
				t.Fatalf("error %v is not a *KeyringError", err)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "noisetor: keyring ") || len(msg) > 400 || strings.Count(msg, "\n") != 0 {
				t.Fatalf("bad error text %q", msg)
			}
			n := 0
			for _, e := range []error{ErrBadPeer, ErrBadKey, ErrDuplicatePeer} {
				if errors.Is(err, e) {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("error %v matches %d kinds", err, n)
			}
			return
		}
		if bytes.Contains(bytes.ToUpper(data), []byte(privateKeyPrefix)) {
			t.Fatal("accepted a file holding a private key")
		}
		var b bytes.Buffer
		if _, err := k.WriteTo(&b); err != nil {
			t.Fatal(err)
		}
		k2, err := ParseKeyring(bytes.NewReader(b.Bytes()))
		if err != nil {
			t.Fatalf("WriteTo output does not parse: %v\n%s", err, b.Bytes())
		}
		if !slices.Equal(k.Peers(), k2.Peers()) || k.Fingerprint() != k2.Fingerprint() {
			t.Fatalf("round trip changed the keyring")
		}
		var b2 bytes.Buffer
		k2.WriteTo(&b2)
		if !bytes.Equal(b.Bytes(), b2.Bytes()) {
			t.Fatalf("WriteTo is not stable")
		}
		for _, p := range k.Peers() {
			if q, ok := k.ByName(p.Name); !ok || q != p {
				t.Fatalf("ByName(%q) = %v, %v", p.Name, q, ok)
			}
			if q, ok := k.ByKey(p.PublicKey); !ok || q != p {
				t.Fatalf("ByKey(%v) = %v, %v", p.PublicKey, q, ok)
			}
			if p.Address != "" {
				if q, ok := k.ByAddress(p.Address); !ok || q != p {
					t.Fatalf("ByAddress(%q) = %v, %v", p.Address, q, ok)
				}
			}
			// Every peer can be added to a fresh keyring as is.
			if _, err := NewKeyring(p); err != nil {
				t.Fatalf("NewKeyring(%v): %v", p, err)
			}
		}
	})
}
