package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/noisetor/noisetor"
)

// relayConfPeers makes a key for each name and gives each the same keyring,
// which lists them all.
func relayConfPeers(t *testing.T, names ...string) map[string]*noisetor.Config {
	t.Helper()
	var ring []noisetor.Peer
	keys := map[string]*noisetor.PrivateKey{}
	for _, n := range names {
		k, err := noisetor.GenerateKey(noisetor.X25519, nil)
		if err != nil {
			t.Fatal(err)
		}
		keys[n] = k
		ring = append(ring, noisetor.Peer{Name: n, PublicKey: k.PublicKey()})
	}
	cfgs := map[string]*noisetor.Config{}
	for n, k := range keys {
		kr, err := noisetor.NewKeyring(ring...)
		if err != nil {
			t.Fatal(err)
		}
		cfgs[n] = &noisetor.Config{StaticKey: k, Keyring: kr, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	}
	return cfgs
}

func TestRelayConfig(t *testing.T) {
	peers := relayConfPeers(t, "sync", "wallet-1", "tower")
	dir := t.TempDir()
	if err := noisetor.SavePrivateKey(filepath.Join(dir, "sync.key"), peers["sync"].StaticKey.(*noisetor.PrivateKey)); err != nil {
		t.Fatal(err)
	}
	if err := peers["sync"].Keyring.Save(filepath.Join(dir, "sync.keyring")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "relay.conf")
	conf := "# sync server\nlisten 127.0.0.1:0\nkey sync.key\nkeyring sync.keyring   # every wallet and watchtower\n" +
		"allow wallet-* tower\naccept-timeout 5s\nping-interval 1m\nmax-sessions 10\n"
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	rc, err := LoadRelayConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if rc.Listen != "127.0.0.1:0" || rc.KeyFile != filepath.Join(dir, "sync.key") || rc.KeyringFile != filepath.Join(dir, "sync.keyring") ||
		len(rc.Rules) != 1 || rc.Rules[0] != (noisetor.RelayRule{From: "wallet-*", To: "tower"}) ||
		rc.AcceptTimeout != 5*time.Second || rc.PingInterval != time.Minute || rc.MaxSessions != 10 {
		t.Fatalf("parsed %+v", rc)
	}
	srv, err := rc.NewServer(nil, peers["sync"].Logger)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := noisetor.Listen("tcp", rc.Listen, srv.Config)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	defer func() { srv.Close(); <-errc }()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := func(name string) *noisetor.RelayClient {
		return &noisetor.RelayClient{Config: peers[name], Server: "sync", Address: ln.Addr().String()}
	}
	tl, err := client("tower").Listen(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	c, err := client("wallet-1").Dial(ctx, "tower")
	if err != nil {
		t.Fatalf("dial through a config-file relay: %v", err)
	}
	c.Close()
	if _, err := client("tower").Dial(ctx, "wallet-1"); !errors.Is(err, noisetor.ErrRelayDenied) {
		t.Errorf("reverse direction: %v", err)
	}

	// With a key from elsewhere (a token), the key file is not needed.
	rc2 := *rc
	rc2.KeyFile = ""
	if _, err := rc2.NewServer(nil, nil); err == nil || !strings.Contains(err.Error(), "no key file") {
		t.Errorf("no key at all: %v", err)
	}
	if s2, err := rc2.NewServer(peers["sync"].StaticKey, nil); err != nil || s2.Config.StaticKey != peers["sync"].StaticKey {
		t.Errorf("NewServer with a given key: %v", err)
	}

	// A config others can write is refused.
	os.Chmod(path, 0o666)
	if _, err := LoadRelayConfig(path); !errors.Is(err, fs.ErrPermission) {
		t.Errorf("group-writable config: %v", err)
	}
	// A rule that matches no keyring peer is refused at NewServer.
	rc.Rules = append(rc.Rules, noisetor.RelayRule{From: "walet-*", To: "tower"})
	if _, err := rc.NewServer(nil, nil); err == nil || !strings.Contains(err.Error(), "matches no peer") {
		t.Errorf("typo rule: %v", err)
	}
}

func TestRelayConfigErrors(t *testing.T) {
	base := "listen 127.0.0.1:7400\nkey k\nkeyring r\n"
	for _, tc := range []struct{ conf, want string }{
		{base, "no allow rules"},
		{"key k\nkeyring r\nallow a b\n", `missing required directive "listen"`},
		{"listen 127.0.0.1:1\nkey k\nallow a b\n", `missing required directive "keyring"`},
		{base + "allow a\n", "<input>:4: allow takes 2 value(s), got 1"},
		{base + "allow a b\nlisten 127.0.0.1:1\n", "<input>:5: listen given twice (first on line 1)"},
		{base + "allow a b\nfrobnicate 1\n", `<input>:5: unknown directive (the line's first word, not shown in case it is a secret; want one of listen, key,`},
		{base + "allow a b\nalow c d\n", `<input>:5: unknown directive (the line's first word, not shown in case it is a secret; did you mean allow?; want`},
		{base + "allow a b\nmax-sessions-per-per 3\n", `did you mean max-sessions-per-peer?`},
		{base + "allow A b\n", "<input>:4: allow: the first pattern is not valid: use peer-name characters"},
		{base + "allow a b\nmax-idle-per-peer x\n", "<input>:5: max-idle-per-peer: want a positive integer"},
		{base + "allow a b\nrequest-timeout 0s\n", "<input>:5: request-timeout: want a positive duration"},
		{"listen 127.0.0.1:http\n", "<input>:1: listen: want host:port, such as 127.0.0.1:7400"},
		{base + "allow a b\naccept-timeout soon\n", "<input>:5: accept-timeout: want a positive duration"},
		{base + "allow a b\nping-interval -1s\n", "<input>:5: ping-interval: want a positive duration"},
		{base + "allow a b\nmax-sessions 0\n", "<input>:5: max-sessions: want a positive integer"},
		{"listen nowhere\n", "<input>:1: listen: "},
		{base + "allow a b\n" + strings.Repeat("#", 5000) + "\n", "<input>:5: "},
	} {
		_, err := ParseRelayConfig(strings.NewReader(tc.conf))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.conf, err, tc.want)
		}
	}
	if c, err := ParseRelayConfig(strings.NewReader(base + "\r\n  # comment\n\tallow * *   # anyone\n")); err != nil || len(c.Rules) != 1 {
		t.Errorf("valid config: %+v, %v", c, err)
	}
}

// A secret pasted into a relay configuration, as a directive, as the
// listen address, as a pattern or as the key or keyring path, is never
// quoted by the error that rejects it.
func TestRelayConfigNoSecretInErrors(t *testing.T) {
	k, err := noisetor.GenerateKey(noisetor.X25519, nil)
	if err != nil {
		t.Fatal(err)
	}
	privText := strings.TrimSpace(string(k.MarshalPrivateText()))
	_, b64, _ := strings.Cut(privText, ":")
	dir := t.TempDir()
	for _, secret := range []string{privText, b64, "hunter2pin"} {
		base := "listen 127.0.0.1:7400\nkey k\nkeyring r\nallow a b\n"
		for _, conf := range []string{
			base + secret + "\n",
			base + secret + " " + secret + "\n",
			strings.Replace(base, "127.0.0.1:7400", secret, 1),
			strings.Replace(base, "allow a b", "allow "+secret+" b", 1),
		} {
			_, err := ParseRelayConfig(strings.NewReader(conf))
			if err == nil {
				if !strings.Contains(conf, "allow "+secret) { // a valid pattern
					t.Errorf("%q: accepted", conf)
				}
				continue
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("the error quotes the secret: %v", err)
			}
		}
		// As the key or keyring path: the name of a file that does not exist.
		for _, line := range []string{"key", "keyring"} {
			rc, err := ParseRelayConfig(strings.NewReader(base))
			if err != nil {
				t.Fatal(err)
			}
			if line == "key" {
				rc.KeyFile = dir + "/" + secret
			} else {
				rc.KeyringFile = dir + "/" + secret
			}
			var key noisetor.StaticKey
			if line == "keyring" {
				key = k
			}
			_, err = rc.NewServer(key, nil)
			if err == nil || strings.Contains(err.Error(), secret) || !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s path: %v", line, err)
			}
			want := map[string]string{"key": "<input>:2: the key file it names does not exist", "keyring": "<input>:3: the keyring file it names does not exist"}[line]
			if err != nil {
				mustHave(t, err.Error(), want)
			}
		}
	}
}

// FuzzRelayConfigNoEcho: no error of ParseRelayConfig holds a
// secret-shaped run of its input (a long token of base64 characters).
func FuzzRelayConfigNoEcho(f *testing.F) {
	f.Add("listen 127.0.0.1:7400\nkeyring r\nallow a b\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
	f.Add("listen x25519-private:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
	f.Add("allow Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0 b\n")
	f.Fuzz(func(t *testing.T, conf string) {
		_, err := ParseRelayConfig(strings.NewReader(conf))
		if err == nil {
			return
		}
		for _, tok := range strings.FieldsFunc(conf, func(r rune) bool { return r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '#' }) {
			if len(tok) >= 20 && !slices.Contains(relayDirectives, tok) && strings.Contains(err.Error(), tok) {
				t.Fatalf("error %q quotes input %q", err, tok)
			}
		}
	})
}

func TestRelayConfigListenWarning(t *testing.T) {
	peers := relayConfPeers(t, "sync", "wallet", "tower")
	dir := t.TempDir()
	if err := peers["sync"].Keyring.Save(dir + "/sync.keyring"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		listen string
		warn   bool
	}{
		{"127.0.0.1:7400", false}, {"[::1]:7400", false}, {"localhost:7400", false},
		{"0.0.0.0:7400", true}, {":7400", true}, {"[::]:7400", true}, {"192.0.2.7:7400", true}, {"sync.example:7400", true},
	} {
		rc, err := ParseRelayConfig(strings.NewReader("listen " + tc.listen + "\nkeyring " + dir + "/sync.keyring\nallow wallet tower\n"))
		if err != nil {
			t.Fatal(err)
		}
		var logs bytes.Buffer
		if _, err := rc.NewServer(peers["sync"].StaticKey, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
			t.Fatal(err)
		}
		got := strings.Contains(logs.String(), "level=WARN") && strings.Contains(logs.String(), "other hosts can reach")
		if got != tc.warn {
			t.Errorf("listen %s: warning %v, want %v: %q", tc.listen, got, tc.warn, logs.String())
		}
	}
}
