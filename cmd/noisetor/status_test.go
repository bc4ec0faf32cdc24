package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/noisetor/noisetor/internal/metrictest"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/monitor"
)

// waitUntil polls cond for up to 10 seconds.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// metricValues parses the Prometheus text format.
func metricValues(t *testing.T, text string) map[string]float64 {
	t.Helper()
	m, err := metrictest.Parse([]byte(text))
	if err != nil {
		t.Fatalf("metrics do not parse: %v\n%s", err, text)
	}
	return m
}

// A serve with --status-socket and --metrics-listen: after a client's
// handshake and an outsider's refusal, 'noisetor status' shows the client
// connected with its handshake, and the refusal; the socket is 0600; the
// metrics parse and count both; no key appears anywhere; the socket goes
// away with the server.
func TestServeStatus(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	run := j("run")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(run, "status.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stdin, stdinW := io.Pipe() // serve keeps its side open until the test ends
	defer stdinW.Close()
	addr, stderr, wait := serveLog(t, ctx, stdin, "-k", j("server.key"), "-r", j("server.keyring"), "--timeout", "5s",
		"--status-socket", sock, "--metrics-listen", "127.0.0.1:0")

	st, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("status socket mode %v, want a socket with 0600", st.Mode())
	}
	before := cli(t, "", "status", "--socket", sock)
	before.want(t, exitOK, "")
	if !regexp.MustCompile(`(?m)^client +0 +never +0 +0 +-$`).MatchString(before.stdout) {
		t.Errorf("status before any handshake:\n%s", before.stdout)
	}

	// The client connects and stays; an outsider is refused.
	cfg := libConfig(t, j("client.key"), j("client.keyring"))
	cfg.Logger = slog.New(slog.DiscardHandler)
	c, err := (&noisetor.Dialer{Config: cfg, Peer: "server"}).Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitUntil(t, "serve to accept the client", func() bool { return strings.Contains(stderr.String(), "connected to client") })
	cli(t, "hello", "connect", "-k", j("outsider.key"), "-r", j("outsider.keyring"), "--peer", "server", "--timeout", "5s", addr).want(t, exitFail, "")

	var r result
	waitUntil(t, "the refusal in the status", func() bool {
		r = cli(t, "", "status", "--socket", sock)
		return strings.Contains(r.stdout, "refused callers that proved no keyring key: 1")
	})
	r.want(t, exitOK, "")
	if !regexp.MustCompile(`(?m)^client +1 +(just now|\ds ago) \(in, KK\) +1 +0 +-$`).MatchString(r.stdout) {
		t.Errorf("status does not show the client connected:\n%s", r.stdout)
	}
	if !regexp.MustCompile(`(?m)^  preamble did not verify +1$`).MatchString(r.stdout) {
		t.Errorf("status does not show the refusal by reason:\n%s", r.stdout)
	}
	t.Logf("noisetor status:\n%s", r.stdout)

	// --json: the same, machine-readable.
	js := cli(t, "", "status", "--socket", sock, "--json")
	js.want(t, exitOK, "")
	var status monitor.Status
	if err := json.Unmarshal([]byte(js.stdout), &status); err != nil {
		t.Fatalf("status --json: %v\n%s", err, js.stdout)
	}
	if len(status.Peers) != 1 || status.Peers[0].Connections != 1 || status.Peers[0].LastHandshake == nil ||
		time.Since(status.Peers[0].LastHandshake.Time) > time.Minute || status.Refused["preamble did not verify"] != 1 {
		t.Errorf("status --json: %s", js.stdout)
	}

	// The metrics, over the socket and the opt-in TCP address.
	want := map[string]float64{
		`noisetor_handshakes_total{direction="in",outcome="ok",peer="client"}`:     1,
		`noisetor_handshakes_total{direction="in",outcome="failed",peer="client"}`: 0,
		`noisetor_connections{peer="client"}`:                                      1,
		`noisetor_refused_total{reason="preamble did not verify"}`:                 1,
		`noisetor_peer_in_keyring{peer="client"}`:                                  1,
	}
	m := cli(t, "", "status", "--socket", sock, "--metrics")
	m.want(t, exitOK, "")
	url := regexp.MustCompile(`url=(http://\S+/metrics)`).FindStringSubmatch(stderr.String())
	if url == nil {
		t.Fatalf("serve did not log the metrics address:\n%s", stderr)
	}
	resp, err := http.Get(url[1])
	if err != nil {
		t.Fatal(err)
	}
	tcpMetrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp, err := http.Get(strings.TrimSuffix(url[1], "/metrics") + "/status"); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("the metrics address answers /status: %v %v", resp, err)
	}
	for _, text := range []string{m.stdout, string(tcpMetrics)} {
		got := metricValues(t, text)
		for k, v := range want {
			if g, ok := got[k]; !ok || g != v {
				t.Errorf("%s = %v (present: %v), want %v", k, g, ok, v)
			}
		}
		ts := got[`noisetor_last_handshake_timestamp_seconds{peer="client"}`]
		if d := time.Since(time.Unix(int64(ts), 0)); d < 0 || d > time.Minute {
			t.Errorf("noisetor_last_handshake_timestamp_seconds = %v", ts)
		}
	}

	// Public keys are not shown either (and private ones, of course, never).
	for _, k := range []string{"server", "client", "outsider"} {
		key, err := noisetor.LoadPrivateKey(j(k + ".key"))
		if err != nil {
			t.Fatal(err)
		}
		for _, out := range []string{r.stdout, js.stdout, m.stdout, string(tcpMetrics)} {
			if strings.Contains(out, key.PublicKey().String()) || strings.Contains(out, key.PublicKey().Fingerprint()) || strings.Contains(out, "PRIVATE") {
				t.Errorf("the status shows %s's key:\n%s", k, out)
			}
		}
	}

	cancel()
	wait()
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("the status socket outlived serve: %v", err)
	}
	cli(t, "", "status", "--socket", sock).want(t, exitFail, "is a serve or relay running with --status-socket")
}

func TestStatusErrors(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	cli(t, "", "status").want(t, exitUsage, "missing --socket")
	cli(t, "", "status", "--socket", "x", "--json", "--metrics").want(t, exitUsage, "not both")
	// A directory others may enter is refused before anything listens.
	open := j("open")
	os.Mkdir(open, 0o755)
	os.Chmod(open, 0o755)
	cli(t, "", "serve", "-k", j("server.key"), "-r", j("server.keyring"), "-l", "127.0.0.1:0",
		"--status-socket", filepath.Join(open, "s")).want(t, exitFail, "chmod 700")
}

// The table: a failure and why, a removed peer, the onion service, and
// control characters from the socket made harmless.
func TestPrintStatus(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	st := &monitor.Status{Time: now, Started: now.Add(-time.Hour), Refused: map[string]uint64{"no preamble": 3, "preamble did not verify": 2},
		Peers: []monitor.Peer{
			{Name: "cosigner", InKeyring: true, Handshakes: monitor.Counts{OutOK: 4, OutFailed: 1},
				LastHandshake: &monitor.Attempt{Time: now.Add(-90 * time.Second), Direction: "out", Pattern: "XK"},
				LastFailure:   &monitor.Attempt{Time: now.Add(-10 * time.Second), Direction: "out", Error: "dialing cosigner: connection refused\x1b[2J"}},
			{Name: "old-tower", Connections: 0, Handshakes: monitor.Counts{InOK: 1},
				LastHandshake: &monitor.Attempt{Time: now.Add(-time.Minute), Direction: "in", Pattern: "KK"}},
		},
		Onion: &monitor.Onion{Address: "abc.onion", State: "unreachable", Publications: 2, LastUpload: now.Add(-5 * time.Minute),
			LastCheck: now.Add(-time.Second), LastReached: now.Add(-20 * time.Minute), CheckFailures: 2, Error: "no echo", Republished: 1},
	}
	var b strings.Builder
	printStatus(&b, st)
	out := b.String()
	t.Logf("\n%s", out)
	for _, re := range []string{
		`(?m)^status at 2030-01-02T03:04:05Z \(monitoring for 1h0m0s\)$`,
		`(?m)^cosigner +0 +1m30s ago \(out, XK\) +4 +1 +10s ago \(out\): dialing cosigner: connection refused\?\[2J$`,
		`(?m)^old-tower \(removed\) +0 +1m0s ago \(in, KK\) +1 +0 +-$`,
		`(?m)^\(removed: no longer in the keyring`,
		`(?m)^refused callers that proved no keyring key: 5$`,
		`(?m)^  no preamble +3$`,
		`(?m)^onion service abc.onion: unreachable$`,
		`(?m)^  published 2 times, last upload 5m0s ago; republished by the checks 1 times$`,
		`(?m)^  last check 1s ago, last reached 20m0s ago; 2 failed in a row: no echo$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("no match for %s", re)
		}
	}
	if strings.Contains(out, "\x1b") {
		t.Error("an escape character reached the terminal")
	}
}

// relay --status-socket: a registered watchtower shows as connected.
func TestRelayStatus(t *testing.T) {
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }
	line := make(map[string]string)
	for _, r := range []string{"sync", "wallet", "tower"} {
		res := cli(t, "", "keygen", "-o", j(r+".key"))
		res.want(t, exitOK, "")
		line[r] = res.stdout
	}
	cli(t, line["wallet"]+line["tower"], "keyring", "add", j("sync.keyring"), "-").want(t, exitOK, "")
	os.WriteFile(j("relay.conf"), []byte("listen 127.0.0.1:0\nkey sync.key\nkeyring sync.keyring\nallow wallet tower\n"), 0o600)
	os.Mkdir(j("run"), 0o700)
	sock := j("run/s")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errw := newNotifyWriter(`serving on (\S+) `)
	done := make(chan int, 1)
	go func() {
		done <- runContext(ctx, []string{"relay", "--status-socket", sock, j("relay.conf")}, strings.NewReader(""), io.Discard, errw)
	}()
	var addr string
	select {
	case addr = <-errw.match:
	case c := <-done:
		t.Fatalf("relay exited with %d: %s", c, errw)
	case <-time.After(10 * time.Second):
		t.Fatalf("relay did not start: %s", errw)
	}
	k, _ := noisetor.LoadPrivateKey(j("tower.key"))
	kr, _ := noisetor.ParseKeyring(strings.NewReader(strings.TrimSpace(line["sync"]) + " addr=" + addr + "\n" + line["wallet"]))
	tower := &noisetor.RelayClient{Config: &noisetor.Config{StaticKey: k, Keyring: kr, Logger: slog.New(slog.DiscardHandler)}, Server: "sync"}
	ln, err := tower.Listen(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var r result
	waitUntil(t, "the tower in the status", func() bool {
		r = cli(t, "", "status", "--socket", sock)
		return regexp.MustCompile(`(?m)^tower +1 +(just now|\ds ago) \(in, KK\) +1 +0 +-$`).MatchString(r.stdout)
	})
	if !regexp.MustCompile(`(?m)^wallet +0 +never +0 +0 +-$`).MatchString(r.stdout) {
		t.Errorf("relay status:\n%s", r.stdout)
	}
	mustMatch := func(out string, res ...string) {
		t.Helper()
		for _, re := range res {
			if !regexp.MustCompile(re).MatchString(out) {
				t.Errorf("relay status lacks /%s/:\n%s", re, out)
			}
		}
	}
	mustMatch(r.stdout, `(?m)^relay: peers registered: 1; sessions open or being set up: 0$`, `(?m)^  tower +registered (just now|\ds ago)$`)

	// A relayed session, held open, is counted.
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	wk, _ := noisetor.LoadPrivateKey(j("wallet.key"))
	wkr, _ := noisetor.ParseKeyring(strings.NewReader(strings.TrimSpace(line["sync"]) + " addr=" + addr + "\n" + line["tower"]))
	wallet := &noisetor.RelayClient{Config: &noisetor.Config{StaticKey: wk, Keyring: wkr, Logger: slog.New(slog.DiscardHandler)}, Server: "sync"}
	c, err := wallet.Dial(ctx, "tower")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r = cli(t, "", "status", "--socket", sock)
	mustMatch(r.stdout, `(?m)^relay: peers registered: 1; sessions open or being set up: 1$`)
	r = cli(t, "", "status", "--socket", sock, "--metrics")
	mustMatch(r.stdout, `(?m)^noisetor_relay_registered\{peer="tower"\} 1$`, `(?m)^noisetor_relay_registered\{peer="wallet"\} 0$`, `(?m)^noisetor_relay_sessions 1$`)
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not stop")
	}
}
