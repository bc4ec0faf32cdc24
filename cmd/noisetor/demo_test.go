package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/tortest"
)

// asCLI makes the test binary act as the noisetor command, so that the demo
// can start its roles by re-executing os.Executable().
const asCLI = "NOISETOR_TEST_BINARY_IS_CLI"

func TestMain(m *testing.M) {
	if os.Getenv(asCLI) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := runContext(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(tortest.Run(m))
}

func requireTor(t *testing.T) {
	t.Helper()
	if err := tortest.Available(); err != nil {
		if os.Getenv("NOISETOR_REQUIRE_ALL") != "" {
			t.Fatalf("NOISETOR_REQUIRE_ALL is set and tor is missing: %v", err)
		}
		t.Skipf("skipping: %v", err)
	}
}

// TestDemo runs the whole custody demo, the README's first command: a
// private Tor network, five role processes with their own tors, a key in
// SoftHSM.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("the demo starts nine tors")
	}
	requireTor(t)
	requireSoftHSM(t)
	t.Setenv(asCLI, "1")
	dir := filepath.Join(t.TempDir(), "demo")

	var out, errb bytes.Buffer
	start := time.Now()
	code := run([]string{"demo", "--dir", dir, "--timeout", "3m"}, strings.NewReader(""), &out, &errb)
	t.Logf("demo ran in %.1fs", time.Since(start).Seconds())
	if code != exitOK {
		t.Fatalf("demo exit status %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	o := out.String()
	for _, want := range []string{
		`in SoftHSM token "cosigner"`,
		"private Tor network (1 authority + 3 relays) ready",
		"Noise_KK_25519_ChaChaPoly_SHA256, peer \"cosigner\"",
		"cosigner replied: co-signed psbt:",
		"Same session at both ends",
		"refused by Tor",
		"SOCKS reply 0xf4",
		"the co-signer counted it among callers that proved no keyring key: its preamble did not verify",
		"[7/7] The watchtower rotates its key",
		"During the overlap the wallet still addresses the old key, and the watchtower answers with it.",
		"Now only the new key works",
		"All steps worked",
	} {
		if !strings.Contains(o, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	// The connection log has every role's attempts, the refusals included.
	for _, re := range []string{
		`cosigner\s+handshake in KK\s+wallet\s+OK`,
		`wallet\s+handshake out KK\s+watchtower\s+OK\s+to relay:syncserver`,
		`watchtower\s+handshake in KK\s+wallet\s+OK`,
		`syncserver\s+relay connect\s+wallet -> watchtower\s+OK`,
		`outsider\s+handshake out KK\s+syncserver\s+FAILED.*client authorization`,
		`cosigner\s+handshakes in\s+\(unknown\)\s+REFUSED\s+1× preamble did not verify`,
		// The watchtower's first run stopped cleanly (SIGTERM) for its restart.
		`syncserver\s+relay unregister\s+watchtower\s+DONE\s+peer closed the control connection`,
	} {
		if !regexp.MustCompile(re).MatchString(o) {
			t.Errorf("connection log lacks /%s/", re)
		}
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", o)
	}

	// Its files are all there; nothing secret is group- or world-readable.
	for _, f := range []string{"cosigner/token.pin", "wallet/wallet.key", "wallet/wallet.auth-key", "watchtower/watchtower-next.key", "cosigner/cosigner.onion-key"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Error(err)
		} else if st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v", f, st.Mode().Perm())
		}
	}
	// No private key material in the logs.
	for _, r := range demoRoles {
		b, _ := os.ReadFile(filepath.Join(dir, r, "log.jsonl"))
		if bytes.Contains(b, []byte("PRIVATE")) || bytes.Contains(b, []byte("NOISETOR-ONION-KEY")) {
			t.Errorf("%s log holds private key material", r)
		}
	}
}

// TestRelayServes runs "noisetor relay" and has a watchtower and a wallet
// meet through it.
func TestRelayServes(t *testing.T) {
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }
	line := make(map[string]string)
	for _, r := range []string{"sync", "wallet", "tower", "other"} {
		res := cli(t, "", "keygen", "-o", j(r+".key"))
		res.want(t, exitOK, "")
		line[r] = res.stdout
	}
	cli(t, line["wallet"]+line["tower"]+line["other"], "keyring", "add", j("sync.keyring"), "-").want(t, exitOK, "")
	addr := freeTCPAddr(t)
	conf := "listen " + addr + "\nkey sync.key\nkeyring sync.keyring\nallow wallet tower\n"
	os.WriteFile(j("relay.conf"), []byte(conf), 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	errw := startRelay(t, ctx, j("relay.conf"))

	config := func(self string, peers ...string) *noisetor.Config {
		k, err := noisetor.LoadPrivateKey(j(self + ".key"))
		if err != nil {
			t.Fatal(err)
		}
		kr, err := noisetor.ParseKeyring(strings.NewReader(strings.Join(peers, "")))
		if err != nil {
			t.Fatal(err)
		}
		return &noisetor.Config{StaticKey: k, Keyring: kr, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	}
	syncLine := strings.TrimSpace(line["sync"]) + " addr=" + addr + "\n"
	tower := &noisetor.RelayClient{Config: config("tower", syncLine, line["wallet"]), Server: "sync"}
	ln, err := tower.Listen(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("hello wallet"))
	}()
	wallet := &noisetor.RelayClient{Config: config("wallet", syncLine, line["tower"]), Server: "sync"}
	c, err := wallet.Dial(ctx, "tower")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, _ := c.Read(buf)
	c.Close()
	if string(buf[:n]) != "hello wallet" {
		t.Errorf("wallet read %q", buf[:n])
	}
	if st := c.ConnectionState(); st.Peer.Name != "tower" {
		t.Errorf("end-to-end peer %q", st.Peer.Name)
	}

	// The policy refuses what it does not allow.
	other := &noisetor.RelayClient{Config: config("other", syncLine, line["tower"]), Server: "sync"}
	if _, err := other.Dial(ctx, "tower"); err == nil {
		t.Error("a peer without an allow rule reached the tower")
	}

	cancel() // the cleanup of startRelay checks that it exits cleanly
	for _, want := range []string{"op=register", "op=connect", "outcome=denied"} {
		if !strings.Contains(errw.String(), want) {
			t.Errorf("relay log lacks %s:\n%s", want, errw)
		}
	}
}

// freeTCPAddr returns a 127.0.0.1 address that was free a moment ago.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestServeConnectTor runs serve on an onion service and connect through
// another tor, both attached to tors of a private Tor network.
func TestServeConnectTor(t *testing.T) {
	n := tortest.Shared(t)
	svcTor := n.NewTor(t, &tortest.TorOptions{Name: "serve"})
	cliTor := n.NewTor(t, &tortest.TorOptions{Name: "connect"})
	dir := t.TempDir()
	j := func(f string) string { return filepath.Join(dir, f) }

	onion := cli(t, "", "onion-key", "-o", j("server.onion-key"), "--port", "9000")
	onion.want(t, exitOK, "")
	auth := cli(t, "", "client-auth-key", "-o", j("client.auth-key"))
	auth.want(t, exitOK, "")
	srv := cli(t, "", "keygen", "-o", j("server.key"), "--addr", strings.TrimSpace(onion.stdout))
	srv.want(t, exitOK, "")
	cl := cli(t, "", "keygen", "-o", j("client.key"))
	cl.want(t, exitOK, "")
	cli(t, "", append([]string{"keyring", "add", j("server.keyring")}, append(strings.Fields(cl.stdout), "--auth", strings.TrimSpace(auth.stdout))...)...).want(t, exitOK, "")
	cli(t, srv.stdout, "keyring", "add", j("client.keyring"), "-").want(t, exitOK, "")

	start := time.Now()
	addr, wait := serve(t, context.Background(), strings.NewReader("over tor"),
		"-k", j("server.key"), "-r", j("server.keyring"), "--tor-control", svcTor.ControlAddr, "--onion-key", j("server.onion-key"))
	t.Logf("onion service published in %.1fs", time.Since(start).Seconds())
	if addr != strings.TrimSpace(onion.stdout) {
		t.Errorf("serving on %s, the onion key's address is %s", addr, onion.stdout)
	}

	// Without its client-auth key the client cannot even find the service.
	r := cli(t, "x", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--tor-control", cliTor.ControlAddr, "--timeout", "30s", "server")
	r.want(t, exitFail, "client authorization")

	start = time.Now()
	r = cli(t, "hello onion", "connect", "-k", j("client.key"), "-r", j("client.keyring"),
		"--tor-control", cliTor.ControlAddr, "--client-auth-key", j("client.auth-key"), "server")
	r.want(t, exitOK, "connected to server")
	t.Logf("connect over tor took %.1fs", time.Since(start).Seconds())
	if r.stdout != "over tor" {
		t.Errorf("client got %q", r.stdout)
	}
	s := wait()
	s.want(t, exitOK, "connected to client")
	if s.stdout != "hello onion" {
		t.Errorf("server got %q", s.stdout)
	}

	// A service without client authorization, reached through a plain
	// SOCKS5 port: the handshake is then the only gate.
	// (A new onion address: the client's tor still holds the descriptor
	// that required client authorization.)
	cli(t, "", "onion-key", "-o", j("open.onion-key")).want(t, exitOK, "")
	addr, wait = serve(t, context.Background(), strings.NewReader("via socks"),
		"-k", j("server.key"), "-r", j("server.keyring"), "--tor-control", svcTor.ControlAddr,
		"--onion-key", j("open.onion-key"), "--no-client-auth")
	// A plain SOCKS port gets no retries: while the new descriptor reaches
	// the directory the client asks, tor may answer 0xF0 (not found), and
	// then answers so at once until it may ask that HSDir again (5 s on a
	// testing network, which has one HSDir): retry for longer than that.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
		r = cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--socks", cliTor.SocksAddr, "--peer", "server", addr)
		if !strings.Contains(r.stderr, "descriptor not found") || time.Now().After(deadline) {
			break
		}
	}
	r.want(t, exitOK, "connected to server at "+addr)
	if r.stdout != "via socks" {
		t.Errorf("client got %q", r.stdout)
	}
	wait().want(t, exitOK, "")
}
