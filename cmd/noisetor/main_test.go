package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/internal/nsstoken"
	"github.com/noisetor/noisetor/internal/softhsm"
)

// result is the outcome of one run of the CLI.
type result struct {
	code           int
	stdout, stderr string
}

// cli runs noisetor with args and stdin in dir.
func cli(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, strings.NewReader(stdin), &out, &errb)
	return result{code, out.String(), errb.String()}
}

func (r result) want(t *testing.T, code int, stderrSubstr string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit status %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
	if stderrSubstr != "" && !strings.Contains(r.stderr, stderrSubstr) {
		t.Fatalf("stderr does not mention %q:\n%s", stderrSubstr, r.stderr)
	}
}

func TestUsage(t *testing.T) {
	r := cli(t, "")
	r.want(t, exitUsage, "Usage:")

	r = cli(t, "", "help")
	r.want(t, exitOK, "")
	for _, c := range []string{"keygen", "pubkey", "fingerprint", "keyring", "onion-key", "serve", "connect", "relay", "demo", "version"} {
		if !strings.Contains(r.stdout, "\n  "+c+" ") {
			t.Errorf("help does not list %s:\n%s", c, r.stdout)
		}
	}
	if strings.Contains(r.stdout, "demo-role") {
		t.Errorf("help lists the hidden demo-role command")
	}
	cli(t, "", "--help").want(t, exitOK, "")
	cli(t, "", "frobnicate").want(t, exitUsage, `unknown command "frobnicate"`)
	cli(t, "", "-o", "x").want(t, exitUsage, "a command must come first")
	cli(t, "", "help", "frobnicate").want(t, exitUsage, "unknown command")

	for _, c := range commands {
		r := cli(t, "", c.name, "--help")
		r.want(t, exitOK, "")
		if !strings.HasPrefix(r.stdout, "Usage: noisetor "+c.name) {
			t.Errorf("%s --help: %q", c.name, r.stdout)
		}
		cli(t, "", c.name, "--no-such-flag").want(t, exitUsage, "flag provided but not defined")
	}
	r = cli(t, "", "version")
	r.want(t, exitOK, "")
	if !strings.HasPrefix(r.stdout, "noisetor ") {
		t.Errorf("version: %q", r.stdout)
	}
}

func TestKeygen(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "cosigner-1.key")

	r := cli(t, "", "keygen", "-o", keyFile, "--addr", "127.0.0.1:9000")
	r.want(t, exitOK, "fingerprint of cosigner-1, to read aloud")
	st, err := os.Stat(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
	// The ceremony line is a keyring line.
	kr, err := noisetor.ParseKeyring(strings.NewReader(r.stdout))
	if err != nil {
		t.Fatalf("ceremony line %q: %v", r.stdout, err)
	}
	p, ok := kr.ByName("cosigner-1")
	if !ok || p.Address != "127.0.0.1:9000" {
		t.Fatalf("ceremony line %q gave %+v", r.stdout, p)
	}
	key, err := noisetor.LoadPrivateKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if key.PublicKey() != p.PublicKey {
		t.Fatalf("ceremony line has %v, key file has %v", p.PublicKey, key.PublicKey())
	}
	if !strings.Contains(r.stderr, key.PublicKey().Fingerprint()) {
		t.Errorf("stderr lacks the fingerprint: %s", r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, "PRIVATE") {
		t.Errorf("keygen printed the private key")
	}

	before, _ := os.ReadFile(keyFile)
	cli(t, "", "keygen", "-o", keyFile).want(t, exitFail, "refusing to overwrite")
	after, _ := os.ReadFile(keyFile)
	if !bytes.Equal(before, after) {
		t.Fatal("keygen overwrote an existing key")
	}

	cli(t, "", "keygen").want(t, exitUsage, "Use -o FILE")
	cli(t, "", "keygen", "-o", filepath.Join(dir, "x.key"), "--curve", "ed448").want(t, exitUsage, "unknown curve")
	cli(t, "", "keygen", "-o", filepath.Join(dir, "Bad Name.key")).want(t, exitUsage, "--name")
	if _, err := os.Stat(filepath.Join(dir, "Bad Name.key")); err == nil {
		t.Error("keygen wrote a key despite a bad name")
	}
	cli(t, "", "keygen", "-o", filepath.Join(dir, "y.key"), "extra").want(t, exitUsage, "unexpected argument")
	cli(t, "", "keygen", "-o", filepath.Join(dir, "nodir", "z.key")).want(t, exitFail, "no such file")

	r = cli(t, "", "keygen", "-o", filepath.Join(dir, "p.key"), "--curve", "p256", "--name", "tower")
	r.want(t, exitOK, "")
	if !strings.HasPrefix(r.stdout, "tower p256:") {
		t.Errorf("p256 ceremony line %q", r.stdout)
	}
}

func TestPubkey(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "w.key")
	line := cli(t, "", "keygen", "-o", keyFile, "--name", "wallet").stdout

	r := cli(t, "", "pubkey", keyFile)
	r.want(t, exitOK, "")
	if want := strings.Fields(line)[1]; strings.TrimSpace(r.stdout) != want {
		t.Errorf("pubkey %q, want %q", r.stdout, want)
	}
	r = cli(t, "", "pubkey", "--name", "wallet", keyFile)
	r.want(t, exitOK, "")
	if r.stdout != line {
		t.Errorf("pubkey --name %q, want %q", r.stdout, line)
	}
	cli(t, "", "pubkey").want(t, exitUsage, "missing the private key file")
	cli(t, "", "pubkey", filepath.Join(dir, "nope")).want(t, exitFail, "no such file")

	os.Chmod(keyFile, 0o644)
	cli(t, "", "pubkey", keyFile).want(t, exitFail, "readable by group or others")

	pub := filepath.Join(dir, "pub")
	os.WriteFile(pub, []byte(strings.Fields(line)[1]+"\n"), 0o600)
	cli(t, "", "pubkey", pub).want(t, exitFail, "this is a public key")
}

func TestKeyring(t *testing.T) {
	dir := t.TempDir()
	ring := filepath.Join(dir, "wallet.keyring")
	var lines []string
	for _, n := range []string{"cosigner", "watchtower", "syncserver", "other"} {
		r := cli(t, "", "keygen", "-o", filepath.Join(dir, n+".key"))
		r.want(t, exitOK, "")
		lines = append(lines, strings.TrimSpace(r.stdout))
	}

	// NAME KEY with flags after the arguments.
	f := strings.Fields(lines[0])
	cli(t, "", "keyring", "add", ring, f[0], f[1], "--addr", "127.0.0.1:9000").want(t, exitOK, "now has 1 peer,")
	// A pasted ceremony line.
	f = strings.Fields(lines[1] + " addr=127.0.0.1:9001")
	cli(t, "", append([]string{"keyring", "add", ring}, f...)...).want(t, exitOK, "added watchtower")
	// Lines on stdin.
	cli(t, lines[2]+"\n"+lines[3]+"\n", "keyring", "add", ring, "-").want(t, exitOK, "now has 4 peers")

	st, _ := os.Stat(ring)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("keyring mode %v, want 0644", st.Mode().Perm())
	}

	// Duplicates and bad input are refused and leave the file alone.
	before, _ := os.ReadFile(ring)
	f = strings.Fields(lines[0])
	cli(t, "", "keyring", "add", ring, "again", f[1]).want(t, exitFail, `already in the keyring as peer "cosigner"`)
	cli(t, "", "keyring", "add", ring, "cosigner", strings.Fields(lines[3])[1]).want(t, exitFail, "already has a peer named")
	cli(t, "", "keyring", "add", ring, "x", "x25519:AAAA").want(t, exitFail, "bad key")
	cli(t, "", "keyring", "add", ring, "x", f[1], "--auth", "nope").want(t, exitFail, `peer "x": auth`)
	cli(t, "", "keyring", "add", ring, "x", f[1], "bogus=1").want(t, exitUsage, "unexpected argument")
	cli(t, "", "keyring", "add", ring, "x").want(t, exitUsage, "missing its public key (after the keyring file and the peer")
	cli(t, "", "keyring", "list", ring, "--addr", "1.2.3.4:5").want(t, exitUsage, "for 'keyring add'")
	cli(t, "", "keyring", "frob", ring).want(t, exitUsage, "unknown keyring subcommand")
	cli(t, "", "keyring").want(t, exitUsage, "missing subcommand")
	after, _ := os.ReadFile(ring)
	if !bytes.Equal(before, after) {
		t.Fatal("a refused add changed the keyring")
	}

	kr, err := noisetor.LoadKeyring(ring)
	if err != nil {
		t.Fatal(err)
	}
	r := cli(t, "", "keyring", "list", ring)
	r.want(t, exitOK, "")
	for _, p := range kr.Peers() {
		if !strings.Contains(r.stdout, p.Name) || !strings.Contains(r.stdout, p.PublicKey.Fingerprint()) {
			t.Errorf("list lacks %s or its fingerprint:\n%s", p.Name, r.stdout)
		}
	}
	if !strings.Contains(r.stdout, "keyring fingerprint: "+kr.Fingerprint()) {
		t.Errorf("list lacks the keyring fingerprint:\n%s", r.stdout)
	}

	r = cli(t, "", "keyring", "check", ring)
	r.want(t, exitOK, "")
	if !strings.Contains(r.stdout, "ok, 4 peers") {
		t.Errorf("check: %q", r.stdout)
	}

	cli(t, "", "keyring", "remove", ring, "other").want(t, exitOK, "now has 3 peers")
	cli(t, "", "keyring", "remove", ring, "other").want(t, exitFail, `no peer named "other"`)

	// A bad line is reported with its line number.
	bad := filepath.Join(dir, "bad.keyring")
	os.WriteFile(bad, []byte("# ok\n"+lines[0]+"\nwatchtower x25519:notakey\n"), 0o644)
	cli(t, "", "keyring", "check", bad).want(t, exitFail, "bad.keyring:3:")
	cli(t, "", "keyring", "list", bad).want(t, exitFail, "bad.keyring:3:")
	os.WriteFile(bad, []byte(lines[0]+"\n"), 0o666)
	os.Chmod(bad, 0o666)
	cli(t, "", "keyring", "check", bad).want(t, exitFail, "")
	cli(t, "", "keyring", "check", filepath.Join(dir, "none")).want(t, exitFail, "no such file")
}

func TestFingerprint(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "a.key")
	line := cli(t, "", "keygen", "-o", keyFile).stdout
	key, err := noisetor.LoadPrivateKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	want := key.PublicKey().Fingerprint()
	if !regexp.MustCompile(`^\d{5}( \d{5}){5}$`).MatchString(want) {
		t.Fatalf("fingerprint format %q", want)
	}

	for _, arg := range []string{keyFile, key.PublicKey().String()} {
		r := cli(t, "", "fingerprint", arg)
		r.want(t, exitOK, "")
		if strings.TrimSpace(r.stdout) != want {
			t.Errorf("fingerprint %s = %q, want %q", arg, r.stdout, want)
		}
	}

	ring := filepath.Join(dir, "ring")
	cli(t, line, "keyring", "add", ring, "-").want(t, exitOK, "")
	kr, _ := noisetor.LoadKeyring(ring)
	r := cli(t, "", "fingerprint", ring)
	r.want(t, exitOK, "fingerprint of keyring")
	if strings.TrimSpace(r.stdout) != kr.Fingerprint() {
		t.Errorf("keyring fingerprint %q, want %q", r.stdout, kr.Fingerprint())
	}

	cli(t, "", "fingerprint", "x25519:AAAA").want(t, exitFail, "bad key")
	cli(t, "", "fingerprint", filepath.Join(dir, "none")).want(t, exitFail, "no such file")
	cli(t, "", "fingerprint").want(t, exitUsage, "missing")
	os.Chmod(keyFile, 0o640)
	cli(t, "", "fingerprint", keyFile).want(t, exitFail, "readable by group or others")
}

func TestOnionAndClientAuthKeys(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "svc.onion-key")
	r := cli(t, "", "onion-key", "-o", f, "--port", "9000")
	r.want(t, exitOK, "mode 0600")
	if !regexp.MustCompile(`^[a-z2-7]{56}\.onion:9000\n$`).MatchString(r.stdout) {
		t.Fatalf("onion-key printed %q", r.stdout)
	}
	r2 := cli(t, "", "onion-key", f)
	r2.want(t, exitOK, "")
	if r2.stdout != strings.TrimSuffix(r.stdout, ":9000\n")+"\n" {
		t.Errorf("onion-key FILE = %q, after -o printed %q", r2.stdout, r.stdout)
	}
	cli(t, "", "onion-key", "-o", f).want(t, exitFail, "refusing to overwrite")
	cli(t, "", "onion-key").want(t, exitUsage, "missing")
	cli(t, "", "onion-key", filepath.Join(dir, "none")).want(t, exitFail, "onion-key -o")

	ca := filepath.Join(dir, "wallet.auth")
	r = cli(t, "", "client-auth-key", "-o", ca)
	r.want(t, exitOK, "")
	pub := strings.TrimSpace(r.stdout)
	if !regexp.MustCompile(`^[A-Z2-7]{52}$`).MatchString(pub) {
		t.Fatalf("client-auth-key printed %q", r.stdout)
	}
	// It is accepted as auth= in a keyring.
	kf := filepath.Join(dir, "w.key")
	line := strings.TrimSpace(cli(t, "", "keygen", "-o", kf).stdout)
	cli(t, "", append([]string{"keyring", "add", filepath.Join(dir, "ring")}, append(strings.Fields(line), "--auth", pub)...)...).want(t, exitOK, "")
	cli(t, "", "client-auth-key", "-o", ca).want(t, exitFail, "refusing to overwrite")
}

// notifyWriter collects output and reports the first match of re.
type notifyWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	re    *regexp.Regexp
	match chan string
}

func newNotifyWriter(re string) *notifyWriter {
	return &notifyWriter{re: regexp.MustCompile(re), match: make(chan string, 1)}
}

func (w *notifyWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.re != nil {
		if m := w.re.FindStringSubmatch(w.buf.String()); m != nil {
			w.match <- m[len(m)-1]
			w.re = nil
		}
	}
	return len(p), nil
}

func (w *notifyWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// ceremony makes keys and keyrings for a server and a client in dir, as two
// operators would with the CLI.
func ceremony(t *testing.T, dir string) {
	t.Helper()
	srv := cli(t, "", "keygen", "-o", filepath.Join(dir, "server.key"))
	srv.want(t, exitOK, "")
	cl := cli(t, "", "keygen", "-o", filepath.Join(dir, "client.key"))
	cl.want(t, exitOK, "")
	cli(t, "", "keygen", "-o", filepath.Join(dir, "outsider.key")).want(t, exitOK, "")
	cli(t, cl.stdout, "keyring", "add", filepath.Join(dir, "server.keyring"), "-").want(t, exitOK, "")
	cli(t, srv.stdout, "keyring", "add", filepath.Join(dir, "client.keyring"), "-").want(t, exitOK, "")
	cli(t, srv.stdout, "keyring", "add", filepath.Join(dir, "outsider.keyring"), "-").want(t, exitOK, "")
}

// serve starts "noisetor serve" and returns its address and a function that
// waits for its result.
func serve(t *testing.T, ctx context.Context, stdin io.Reader, args ...string) (addr string, wait func() result) {
	addr, _, wait = serveLog(t, ctx, stdin, args...)
	return addr, wait
}

// serveLog is serve that also returns the live standard error.
func serveLog(t *testing.T, ctx context.Context, stdin io.Reader, args ...string) (addr string, stderr *notifyWriter, wait func() result) {
	t.Helper()
	var out bytes.Buffer
	errw := newNotifyWriter(`listening on (\S+) `)
	done := make(chan int, 1)
	go func() {
		done <- runContext(ctx, append([]string{"serve", "-l", "127.0.0.1:0"}, args...), stdin, &out, errw)
	}()
	select {
	case addr = <-errw.match:
	case code := <-done:
		t.Fatalf("serve exited with %d: %s", code, errw)
	case <-time.After(90 * time.Second):
		// As long as serve's own --timeout: over Tor, "listening" follows
		// a descriptor upload or (--via) a dial and a registration, which
		// a loaded machine or tor's 5 s HSDir requery can stretch.
		t.Fatalf("serve did not start listening: %s", errw)
	}
	return addr, errw, func() result {
		select {
		case code := <-done:
			return result{code, out.String(), errw.String()}
		case <-time.After(30 * time.Second):
			t.Fatalf("serve did not exit: %s", errw)
			return result{}
		}
	}
}

func TestServeConnect(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }

	// A large payload crosses many frames in each direction.
	toClient := strings.Repeat("from the server\n", 20000)
	toServer := strings.Repeat("from the client\n", 10000)
	addr, wait := serve(t, context.Background(), strings.NewReader(toClient),
		"-k", j("server.key"), "-r", j("server.keyring"))

	r := cli(t, toServer, "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--peer", "server", addr)
	r.want(t, exitOK, "connected to server")
	if r.stdout != toClient {
		t.Errorf("client received %d bytes, want %d", len(r.stdout), len(toClient))
	}
	if !strings.Contains(r.stderr, "direction=out") || !strings.Contains(r.stderr, "outcome=ok") {
		t.Errorf("client did not log the attempt: %s", r.stderr)
	}
	s := wait()
	s.want(t, exitOK, "connected to client (KK, ChaChaPoly; its key's fingerprint ")
	if s.stdout != toServer {
		t.Errorf("server received %d bytes, want %d", len(s.stdout), len(toServer))
	}
	if !strings.Contains(s.stderr, "direction=in") || !strings.Contains(s.stderr, "peer=client") {
		t.Errorf("server did not log the attempt: %s", s.stderr)
	}

	// XK and AES-GCM, the peer named through its keyring address.
	addr, wait = serve(t, context.Background(), strings.NewReader("pong"),
		"-k", j("server.key"), "-r", j("server.keyring"), "--pattern", "kk,xk", "--cipher", "aesgcm,chachapoly")
	cli(t, "", "keyring", "remove", j("client.keyring"), "server").want(t, exitOK, "")
	srvLine := cli(t, "", "pubkey", "--name", "server", j("server.key")).stdout
	cli(t, srvLine, "keyring", "add", j("client.keyring"), "-").want(t, exitOK, "")
	cli(t, "", "keyring", "remove", j("client.keyring"), "server").want(t, exitOK, "")
	f := strings.Fields(srvLine)
	cli(t, "", "keyring", "add", j("client.keyring"), f[0], f[1], "--addr", addr).want(t, exitOK, "")
	r = cli(t, "ping", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--pattern", "xk", "--cipher", "aesgcm", "server")
	r.want(t, exitOK, "(XK, AESGCM; ")
	if r.stdout != "pong" {
		t.Errorf("client got %q", r.stdout)
	}
	if s := wait(); s.stdout != "ping" || s.code != exitOK {
		t.Errorf("server: %+v", s)
	}
}

func TestServeRefusesOutsider(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, stderr, wait := serveLog(t, ctx, strings.NewReader(""), "-k", j("server.key"), "-r", j("server.keyring"), "--timeout", "5s")

	r := cli(t, "hello", "connect", "-k", j("outsider.key"), "-r", j("outsider.keyring"), "--peer", "server", "--timeout", "5s", addr)
	r.want(t, exitFail, "")
	if r.stdout != "" {
		t.Errorf("outsider received %q", r.stdout)
	}
	// The server logs the refusal and keeps waiting for a keyring peer.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(stderr.String(), "refused callers that proved no keyring key"); {
		if time.Now().After(deadline) {
			t.Fatalf("server did not log the refused outsider:\n%s", stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	s := wait()
	s.want(t, exitFail, "interrupted")
	if !strings.Contains(s.stderr, `"reasons.preamble did not verify"=1`) {
		t.Errorf("server did not log the refused outsider:\n%s", s.stderr)
	}
}

func TestConnectErrors(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "nobody").want(t, exitFail, "neither a peer")
	cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "server").want(t, exitFail, "has no addr=")
	cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "127.0.0.1:1").want(t, exitFail, "no keyring peer has address")
	cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--peer", "server", "127.0.0.1:1").want(t, exitFail, "refused")
	cli(t, "", "connect", "-k", j("client.key"), "127.0.0.1:1").want(t, exitUsage, "missing -r")
	cli(t, "", "connect", "-r", j("client.keyring"), "127.0.0.1:1").want(t, exitUsage, "which key?")
	cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--pattern", "nn", "x:1").want(t, exitUsage, "unknown pattern")
	cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--client-auth-key", "f", "--peer", "server", "x:1").want(t, exitUsage, "needs --tor-data")
	cli(t, "", "serve", "-k", j("server.key"), "-r", j("server.keyring"), "--onion-key", j("o")).want(t, exitUsage, "needs a tor")
	cli(t, "", "serve", "-k", j("server.key"), "-r", j("server.keyring"), "-l", "256.0.0.1:1").want(t, exitFail, "")
}

func TestRelayCheck(t *testing.T) {
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }
	w := cli(t, "", "keygen", "-o", j("wallet.key")).stdout
	tw := cli(t, "", "keygen", "-o", j("tower.key")).stdout
	cli(t, "", "keygen", "-o", j("sync.key")).want(t, exitOK, "")
	cli(t, w+tw, "keyring", "add", j("sync.keyring"), "-").want(t, exitOK, "")
	conf := "listen 127.0.0.1:0\nkey sync.key\nkeyring sync.keyring\nallow wallet tower\n"
	os.WriteFile(j("relay.conf"), []byte(conf), 0o600)
	r := cli(t, "", "relay", "--check", j("relay.conf"))
	r.want(t, exitOK, "")
	if !strings.Contains(r.stdout, "ok; 2 peers") {
		t.Errorf("relay --check: %q", r.stdout)
	}
	os.WriteFile(j("bad.conf"), []byte(conf+"allow wallet nobody\n"), 0o600)
	cli(t, "", "relay", "--check", j("bad.conf")).want(t, exitFail, "nobody")
	os.WriteFile(j("bad2.conf"), []byte("listen\n"), 0o600)
	cli(t, "", "relay", j("bad2.conf")).want(t, exitFail, "")
	cli(t, "", "relay").want(t, exitUsage, "missing the configuration file")
}

// requireSoftHSM skips the test when SoftHSM2 is missing, unless
// NOISETOR_REQUIRE_ALL is set.
func requireSoftHSM(t *testing.T) {
	t.Helper()
	if err := softhsm.Available(); err != nil {
		if os.Getenv("NOISETOR_REQUIRE_ALL") != "" {
			t.Fatalf("NOISETOR_REQUIRE_ALL is set and SoftHSM2 is missing: %v", err)
		}
		t.Skipf("skipping: %v", err)
	}
}

func TestKeygenPKCS11(t *testing.T) {
	requireSoftHSM(t)
	dir := t.TempDir()
	store, err := softhsm.NewStore(filepath.Join(dir, "hsm"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.InitToken("ceremony", "123456", "654321"); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", store.Conf)
	pinFile := filepath.Join(dir, "pin")
	os.WriteFile(pinFile, []byte("123456\n"), 0o600)
	t.Setenv(noisetor.EnvPKCS11Module, store.Module)
	t.Setenv(noisetor.EnvPKCS11Token, "ceremony")
	t.Setenv(noisetor.EnvPKCS11PINFile, pinFile)

	r := cli(t, "", "keygen", "--pkcs11", "--pkcs11-key", "cosigner")
	r.want(t, exitOK, "never leaves the token")
	if !strings.HasPrefix(r.stdout, "cosigner x25519:") {
		t.Fatalf("ceremony line %q", r.stdout)
	}
	cli(t, "", "keygen", "--pkcs11", "--pkcs11-key", "cosigner").want(t, exitFail, "already has")
	p := cli(t, "", "pubkey", "--pkcs11", "--pkcs11-key", "cosigner", "--name", "cosigner")
	p.want(t, exitOK, "")
	if p.stdout != r.stdout {
		t.Errorf("pubkey %q, keygen %q", p.stdout, r.stdout)
	}
	r = cli(t, "", "keygen", "--pkcs11", "--pkcs11-key", "tower", "--curve", "p256")
	r.want(t, exitOK, "")
	if !strings.HasPrefix(r.stdout, "tower p256:") {
		t.Errorf("p256 ceremony line %q", r.stdout)
	}

	// A token key serves a link: the server's key is on the token.
	cli(t, "", "keygen", "-o", filepath.Join(dir, "client.key")).want(t, exitOK, "")
	cl := cli(t, "", "pubkey", "--name", "client", filepath.Join(dir, "client.key")).stdout
	cli(t, cl, "keyring", "add", filepath.Join(dir, "server.keyring"), "-").want(t, exitOK, "")
	srvLine := cli(t, "", "pubkey", "--pkcs11", "--pkcs11-key", "cosigner", "--name", "server").stdout
	cli(t, srvLine, "keyring", "add", filepath.Join(dir, "client.keyring"), "-").want(t, exitOK, "")
	addr, wait := serve(t, context.Background(), strings.NewReader("signed"),
		"--pkcs11", "--pkcs11-key", "cosigner", "-r", filepath.Join(dir, "server.keyring"))
	c := cli(t, "psbt", "connect", "-k", filepath.Join(dir, "client.key"), "-r", filepath.Join(dir, "client.keyring"), "--peer", "server", addr)
	c.want(t, exitOK, "")
	if c.stdout != "signed" {
		t.Errorf("client got %q", c.stdout)
	}
	if s := wait(); s.code != exitOK || s.stdout != "psbt" {
		t.Errorf("server: %+v", s)
	}

	cli(t, "", "pubkey", "--pkcs11", "--pkcs11-key", "missing").want(t, exitFail, "")
	os.WriteFile(pinFile, []byte("000000\n"), 0o600)
	cli(t, "", "pubkey", "--pkcs11", "--pkcs11-key", "cosigner").want(t, exitFail, "PIN")
	t.Setenv(noisetor.EnvPKCS11PINFile, "")
	cli(t, "", "pubkey", "--pkcs11", "--pkcs11-key", "cosigner").want(t, exitFail, "needs a PIN and none is configured")
	cli(t, "", "keygen", "--pkcs11", "-o", filepath.Join(dir, "k")).want(t, exitUsage, "stays on the token")
}

// A secret pasted into the wrong argument is never echoed (issue: the
// fingerprint command printed a pasted private key in its error).
func TestErrorsDoNotEchoSecrets(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "a.key")
	cli(t, "", "keygen", "-o", keyFile).want(t, exitOK, "")
	text, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	priv := strings.TrimSpace(string(text))
	secret := priv[strings.IndexByte(priv, ':')+1:]
	pub := strings.Fields(cli(t, "", "pubkey", "--name", "a", keyFile).stdout)[1]
	ring := filepath.Join(dir, "ring")
	cli(t, "a "+pub+"\n", "keyring", "add", ring, "-").want(t, exitOK, "")
	const pin = "482916"
	for _, args := range [][]string{
		{"fingerprint", priv},
		{"fingerprint", strings.ToLower(priv)},
		{"fingerprint", secret},
		{"fingerprint", "x25519:" + secret + "x"},
		{"fingerprint", secret + ":" + secret},
		{priv},
		{"help", secret},
		{"-" + secret},
		{"keygen", "-o", filepath.Join(dir, "b.key"), "--curve", secret},
		{"keygen", "-o", filepath.Join(dir, "c.key"), secret},
		{"keyring", secret, ring},
		{"keyring", "add", ring, secret, pub},
		{"keyring", "add", ring, priv, pub},
		{"keyring", "add", ring, "b", priv},
		{"keyring", "add", ring, "b", secret},
		{"keyring", "add", ring, "b", pub, secret},
		{"keyring", "add", ring, "b", pub, "addr=" + secret},
		{"keyring", "remove", ring, secret},
		{"keyring", "remove", ring, pin},
		{"pubkey", keyFile, pin},
		{"fingerprint", ring, pin},
		{"fingerprint", secret + strings.Repeat("A", 300)}, // "file name too long" names the file
		{"pubkey", secret},
		{"pubkey", priv},
		{"keyring", "list", secret},
		{"keyring", "check", secret},
		{"serve", "-k", secret, "-r", ring},
		{"connect", "-k=" + secret, "-r", ring, "--peer", "a", "127.0.0.1:1"},
		{"connect", "-k", keyFile, "-r", secret, "--peer", "a", "127.0.0.1:1"},
		{"keygen", "--curve=" + secret},
	} {
		r := cli(t, "", args...)
		if r.code == exitOK {
			t.Errorf("%q succeeded", args)
			continue
		}
		out := strings.ToLower(r.stdout + r.stderr)
		for _, s := range []string{secret[:20], pin} {
			if strings.Contains(out, strings.ToLower(s)) {
				t.Errorf("noisetor %q echoes the secret:\n%s%s", args, r.stdout, r.stderr)
			}
		}
	}
	r := cli(t, "", "fingerprint", priv)
	r.want(t, exitFail, "secret key")
	// A path that merely contains "noisetor-" is a path.
	d := filepath.Join(dir, "noisetor-demo-x")
	os.Mkdir(d, 0o700)
	cli(t, "a "+pub+"\n", "keyring", "add", filepath.Join(d, "ring"), "-").want(t, exitOK, "")
	cli(t, "", "fingerprint", filepath.Join(d, "ring")).want(t, exitOK, "fingerprint of keyring")
}

// The NOISETOR_PKCS11_* environment and the --pkcs11-* flags combine:
// $NOISETOR_PKCS11_CURVE applies unless --curve is given, --pkcs11-module
// keeps the rest of the environment, and a malformed variable is reported
// even when a flag is given.
func TestPKCS11EnvAndFlags(t *testing.T) {
	requireSoftHSM(t)
	dir := t.TempDir()
	store, err := softhsm.NewStore(filepath.Join(dir, "hsm"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.InitToken("envtok", "123456", "654321"); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", store.Conf)
	pinFile := filepath.Join(dir, "pin")
	os.WriteFile(pinFile, []byte("123456\n"), 0o600)
	for _, v := range []string{noisetor.EnvPKCS11KeyID, noisetor.EnvPKCS11TokenSerial, noisetor.EnvPKCS11PIN,
		noisetor.EnvPKCS11MaxSessions, noisetor.EnvPKCS11InitParams} {
		t.Setenv(v, "")
	}
	t.Setenv(noisetor.EnvPKCS11Token, "envtok")
	t.Setenv(noisetor.EnvPKCS11PINFile, pinFile)

	// The module only on the command line; token, PIN file and curve from
	// the environment.
	t.Setenv(noisetor.EnvPKCS11Module, "")
	t.Setenv(noisetor.EnvPKCS11Curve, "p256")
	r := cli(t, "", "keygen", "--pkcs11", "--pkcs11-module", store.Module, "--pkcs11-key", "tower")
	r.want(t, exitOK, "")
	if !strings.HasPrefix(r.stdout, "tower p256:") {
		t.Fatalf("with %s=p256, keygen made %q", noisetor.EnvPKCS11Curve, r.stdout)
	}
	p := cli(t, "", "pubkey", "--pkcs11", "--pkcs11-module", store.Module, "--pkcs11-key", "tower", "--name", "tower")
	p.want(t, exitOK, "")
	if p.stdout != r.stdout {
		t.Errorf("pubkey %q, keygen %q", p.stdout, r.stdout)
	}
	// --curve wins over the environment.
	r = cli(t, "", "keygen", "--pkcs11", "--pkcs11-module", store.Module, "--pkcs11-key", "x", "--curve", "x25519")
	r.want(t, exitOK, "")
	if !strings.HasPrefix(r.stdout, "x x25519:") {
		t.Fatalf("with --curve x25519, keygen made %q", r.stdout)
	}
	// A malformed variable is an error, flags or not.
	t.Setenv(noisetor.EnvPKCS11KeyID, "not-hex")
	cli(t, "", "pubkey", "--pkcs11", "--pkcs11-module", store.Module, "--pkcs11-key", "tower").
		want(t, exitFail, noisetor.EnvPKCS11KeyID)
	t.Setenv(noisetor.EnvPKCS11KeyID, "")
	t.Setenv(noisetor.EnvPKCS11Curve, "ed448")
	cli(t, "", "keygen", "--pkcs11", "--pkcs11-module", store.Module, "--pkcs11-key", "y", "--curve", "x25519").
		want(t, exitFail, noisetor.EnvPKCS11Curve)
	t.Setenv(noisetor.EnvPKCS11Curve, "")

	// No PIN for a token that needs one: the token says so, and the CLI
	// says how to give it.
	t.Setenv(noisetor.EnvPKCS11PINFile, "")
	cli(t, "", "pubkey", "--pkcs11", "--pkcs11-module", store.Module, "--pkcs11-key", "tower").
		want(t, exitFail, "needs a PIN and none is configured")
}

// A token that needs no login (an NSS database without a password) works
// with no PIN: keygen, pubkey and a link served with the token key.
func TestPKCS11NoLoginToken(t *testing.T) {
	if _, err := nsstoken.Module(); err != nil {
		t.Skipf("skipping: %v", err)
	}
	dir := t.TempDir()
	db, err := nsstoken.New(filepath.Join(dir, "nss"), "")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{noisetor.EnvPKCS11KeyID, noisetor.EnvPKCS11TokenSerial, noisetor.EnvPKCS11PIN,
		noisetor.EnvPKCS11PINFile, noisetor.EnvPKCS11MaxSessions, noisetor.EnvPKCS11Curve} {
		t.Setenv(v, "")
	}
	t.Setenv(noisetor.EnvPKCS11Module, db.Module)
	t.Setenv(noisetor.EnvPKCS11InitParams, db.InitParams)
	t.Setenv(noisetor.EnvPKCS11Token, nsstoken.TokenLabel)
	r := cli(t, "", "keygen", "--pkcs11", "--pkcs11-key", "nss-server", "--name", "server")
	r.want(t, exitOK, "never leaves the token")
	p := cli(t, "", "pubkey", "--pkcs11", "--pkcs11-key", "nss-server", "--name", "server")
	p.want(t, exitOK, "")
	if p.stdout != r.stdout || !strings.HasPrefix(p.stdout, "server x25519:") {
		t.Fatalf("pubkey %q, keygen %q", p.stdout, r.stdout)
	}
	cli(t, "", "keygen", "-o", filepath.Join(dir, "client.key")).want(t, exitOK, "")
	cl := cli(t, "", "pubkey", "--name", "client", filepath.Join(dir, "client.key")).stdout
	cli(t, cl, "keyring", "add", filepath.Join(dir, "server.keyring"), "-").want(t, exitOK, "")
	cli(t, r.stdout, "keyring", "add", filepath.Join(dir, "client.keyring"), "-").want(t, exitOK, "")
	addr, wait := serve(t, context.Background(), strings.NewReader("signed"),
		"--pkcs11", "--pkcs11-key", "nss-server", "-r", filepath.Join(dir, "server.keyring"))
	c := cli(t, "psbt", "connect", "-k", filepath.Join(dir, "client.key"), "-r", filepath.Join(dir, "client.keyring"), "--peer", "server", addr)
	c.want(t, exitOK, "")
	if c.stdout != "signed" {
		t.Errorf("client got %q", c.stdout)
	}
	if s := wait(); s.code != exitOK || s.stdout != "psbt" {
		t.Errorf("server: %+v", s)
	}
}
