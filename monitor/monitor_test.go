package monitor

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noisetor/noisetor/internal/metrictest"

	"github.com/noisetor/noisetor"
)

// privateDir returns a new directory of mode 0700 with a short path.
func privateDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestListenUnix(t *testing.T) {
	dir := privateDir(t)
	sock := filepath.Join(dir, "status.sock")
	l, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", st.Mode())
	}
	go http.Serve(l, http.NotFoundHandler())

	// A socket in use is not taken over.
	if _, err := ListenUnix(sock); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second ListenUnix: %v", err)
	}
	l.Close()
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("Close left the socket: %v", err)
	}

	// A stale socket (its process died without closing it) is replaced.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err = ListenUnix(sock)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	l.Close()

	// Anything else at the path stays.
	os.WriteFile(sock, []byte("x"), 0o600)
	if _, err := ListenUnix(sock); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("over a file: %v", err)
	}
	os.Remove(sock)

	// A directory others may enter is refused, and so is one under a
	// directory others may write.
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o700)
	os.Chmod(open, 0o750)
	if _, err := ListenUnix(filepath.Join(open, "s")); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("in a 0750 directory: %v", err)
	}
	writable := filepath.Join(dir, "w")
	os.Mkdir(writable, 0o700)
	os.Mkdir(filepath.Join(writable, "p"), 0o700)
	os.Chmod(writable, 0o777)
	if _, err := ListenUnix(filepath.Join(writable, "p", "s")); err == nil || !strings.Contains(err.Error(), "lets others write it") {
		t.Errorf("under a 0777 directory: %v", err)
	}
	if _, err := ListenUnix(filepath.Join(dir, strings.Repeat("x", 120))); err == nil || !strings.Contains(err.Error(), "shorter") {
		t.Errorf("long path: %v", err)
	}
}

// testPeers makes a server and a client config that know each other.
func testPeers(t *testing.T) (srv, cl *noisetor.Config) {
	t.Helper()
	ks, _ := noisetor.GenerateKey(noisetor.X25519, nil)
	kc, _ := noisetor.GenerateKey(noisetor.X25519, nil)
	rs, _ := noisetor.NewKeyring(noisetor.Peer{Name: "client", PublicKey: kc.PublicKey()})
	rc, _ := noisetor.NewKeyring(noisetor.Peer{Name: "server", PublicKey: ks.PublicKey()})
	return &noisetor.Config{StaticKey: ks, Keyring: rs, Logger: discard()}, &noisetor.Config{StaticKey: kc, Keyring: rc, Logger: discard()}
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Status and metrics over the socket after a handshake, with the values.
func TestMonitorOverSocket(t *testing.T) {
	srv, cl := testPeers(t)
	ln, err := noisetor.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()
	c, err := (&noisetor.Dialer{Config: cl, Peer: "server"}).Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc := <-accepted
	defer sc.Close()

	sock := filepath.Join(privateDir(t), "s")
	l, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: New(srv, nil).Handler(), ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(l)
	defer hs.Close()

	ctx := context.Background()
	st, err := FetchStatus(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Peers) != 1 {
		t.Fatalf("status: %+v", st)
	}
	p := st.Peers[0]
	if p.Name != "client" || p.Connections != 1 || p.Handshakes != (Counts{InOK: 1}) || p.LastHandshake == nil ||
		p.LastHandshake.Direction != "in" || p.LastHandshake.Pattern != "KK" || p.LastFailure != nil || !p.InKeyring {
		t.Errorf("peer: %+v", p)
	}
	if st.Onion != nil || len(st.Refused) != 0 {
		t.Errorf("status: %+v", st)
	}

	b, err := FetchMetrics(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	fams := parseMetrics(t, b)
	want := map[string]float64{
		`noisetor_handshakes_total{direction="in",outcome="ok",peer="client"}`:      1,
		`noisetor_handshakes_total{direction="out",outcome="failed",peer="client"}`: 0,
		`noisetor_connections{peer="client"}`:                                       1,
		`noisetor_peer_in_keyring{peer="client"}`:                                   1,
	}
	for k, v := range want {
		if got, ok := fams[k]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}
	if ts := fams[`noisetor_last_handshake_timestamp_seconds{peer="client"}`]; time.Since(time.Unix(int64(ts), 0)) > time.Minute {
		t.Errorf("last handshake timestamp %v", ts)
	}
	if _, ok := fams[`noisetor_last_failure_timestamp_seconds{peer="client"}`]; ok {
		t.Error("a failure timestamp without a failure")
	}
	if _, err := FetchMetrics(ctx, filepath.Join(filepath.Dir(sock), "nothing")); err == nil {
		t.Error("fetched from no socket")
	}
}

// parseMetrics parses the text format and flattens it to name{labels} ->
// value, labels in name order.
func parseMetrics(t *testing.T, b []byte) map[string]float64 {
	t.Helper()
	m, err := metrictest.Parse(b)
	if err != nil {
		t.Fatalf("metrics do not parse: %v\n%s", err, b)
	}
	return m
}
