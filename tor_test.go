package noisetor

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noisetor/noisetor/tortest"
)

// The Tor tests run on a private Tor network on 127.0.0.1 (package
// tortest), started by the first test that needs it and shared by all.
// Without tor installed they are skipped, unless NOISETOR_REQUIRE_ALL is set.

func TestMain(m *testing.M) {
	if probes := os.Getenv(torProbeEnv); probes != "" {
		// A copy of this binary run as another local user (TestTorLocalUser).
		torRunProbes(probes)
		os.Exit(0)
	}
	code := m.Run()
	torCloseShared()
	if err := tortest.CloseShared(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	if leaks := torGoroutines(); len(leaks) > 0 {
		fmt.Fprintf(os.Stderr, "goroutines of the Tor code still running after every Tor was closed:\n%s\n", strings.Join(leaks, "\n\n"))
		code = 1
	}
	torPrintTimings()
	os.Exit(code)
}

// ---- helpers ----------------------------------------------------------------

// torTimings collects the measurements that TestMain prints.
var torTimings struct {
	mu    sync.Mutex
	lines []string
}

func torRecord(t testing.TB, format string, args ...any) {
	t.Helper()
	s := fmt.Sprintf(format, args...)
	t.Log(s)
	torTimings.mu.Lock()
	torTimings.lines = append(torTimings.lines, s)
	torTimings.mu.Unlock()
}

func torPrintTimings() {
	torTimings.mu.Lock()
	defer torTimings.mu.Unlock()
	if len(torTimings.lines) > 0 {
		fmt.Printf("tor timings (private network on 127.0.0.1):\n  %s\n", strings.Join(torTimings.lines, "\n  "))
	}
}

// torLogWriter passes log lines to t.Log until t ends.
type torLogWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *torLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

func torTestLogger(t testing.TB) *slog.Logger {
	w := &torLogWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// torStartPair starts two owned tors at once.
func torStartPair(t testing.TB, n *tortest.Network, dirA, dirB string, logA, logB *slog.Logger) (a, b *Tor, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	start := time.Now()
	var errA, errB error
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		a, errA = StartTor(ctx, &TorConfig{DataDir: dirA, Torrc: n.TorrcLines(), Logger: logA})
	}()
	go func() {
		defer wg.Done()
		b, errB = StartTor(ctx, &TorConfig{DataDir: dirB, Torrc: n.TorrcLines(), Logger: logB})
	}()
	wg.Wait()
	if errA != nil || errB != nil {
		if a != nil {
			a.Close()
		}
		if b != nil {
			b.Close()
		}
		t.Fatalf("StartTor: %v / %v", errA, errB)
	}
	return a, b, time.Since(start)
}

// torShared is a service tor and a client tor shared by the tests that
// do not stop them.
var torShared struct {
	mu       sync.Mutex
	srv, cli *Tor
	dir      string
	logs     *torBuffer
}

func torPair(t *testing.T) (srv, cli *Tor) {
	t.Helper()
	n := tortest.Shared(t)
	torShared.mu.Lock()
	defer torShared.mu.Unlock()
	if torShared.srv == nil {
		dir, err := os.MkdirTemp("", "noisetor-tortest-")
		if err != nil {
			t.Fatal(err)
		}
		torShared.dir = dir
		torShared.logs = &torBuffer{}
		log := slog.New(slog.NewTextHandler(torShared.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		var d time.Duration
		torShared.srv, torShared.cli, d = torStartPair(t, n, filepath.Join(dir, "service"), filepath.Join(dir, "client"), log, log)
		torRecord(t, "private network start (1 authority + 3 relays, keys included): %.1fs", n.StartupTime.Seconds())
		torRecord(t, "StartTor, service and client tors in parallel, to 100%% bootstrap: %.1fs", d.Seconds())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("shared tors' log:\n%s", torTail(torShared.logs.String(), 6000))
		}
	})
	return torShared.srv, torShared.cli
}

func torCloseShared() {
	torShared.mu.Lock()
	defer torShared.mu.Unlock()
	if torShared.srv != nil {
		torShared.srv.Close()
		torShared.cli.Close()
		os.RemoveAll(torShared.dir)
		torShared.srv, torShared.cli = nil, nil
	}
}

func torTail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// torBuffer is a log sink safe for concurrent use.
type torBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *torBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *torBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func torStaticKey(t testing.TB) *PrivateKey {
	t.Helper()
	k := mustKey(t)
	return k
}

// torPID returns the pid of the tor that tr is connected to.
func torPID(tr *Tor) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.sess == nil {
		return 0
	}
	return tr.sess.pid
}

// torGoroutines lists the goroutines running code of the Tor integration
// (tor*.go), waiting up to a second for goroutines on their way out.
func torGoroutines() []string {
	var leaks []string
	for range 50 {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		leaks = leaks[:0]
		for _, g := range strings.Split(string(buf), "\n\n") {
			for _, f := range []string{"noisetor.(*Tor)", "noisetor.(*torSession)", "noisetor.(*torControl)", "noisetor.(*OnionListener)", "noisetor.(*TorDialer)"} {
				if strings.Contains(g, f) {
					leaks = append(leaks, g)
					break
				}
			}
		}
		if len(leaks) == 0 {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return leaks
}

// torServeEcho echoes every connection of l back to it.
func torServeEcho(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() { defer c.Close(); io.Copy(c, c) }()
	}
}

// torFirstByte dials addr, writes one line and reads its echo; it returns
// the connection and the time from dialing to the first byte of the reply.
func torFirstByte(ctx context.Context, d ContextDialer, addr string) (net.Conn, time.Duration, error) {
	start := time.Now()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		c.Close()
		return nil, 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, 0, err
	}
	return c, time.Since(start), nil
}

// torEcho checks a full echo round trip on c, after the rest of the
// "ping\n" echo that torFirstByte left unread.
func torEcho(t testing.TB, c net.Conn, msg []byte) {
	t.Helper()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	rest := make([]byte, len("ing\n"))
	if _, err := io.ReadFull(c, rest); err != nil || string(rest) != "ing\n" {
		t.Fatalf("echo of ping: %q, %v", rest, err)
	}
	go c.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("echo: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("echo: data differs")
	}
}

// torWaitUp waits until tr is connected to a bootstrapped tor.
func torWaitUp(t testing.TB, tr *Tor, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		_, err := tr.session(ctx)
		cancel()
		if err == nil {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("tor not back after %v: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// torWaitPublications waits until l has been published n times.
func torWaitPublications(t testing.TB, l *OnionListener, n int, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		l.mu.Lock()
		c := l.pubCount
		l.mu.Unlock()
		if c >= n {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("onion service published %d times after %v, want %d", c, timeout, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// torPeers is a service ("server") and a client ("wallet") that know each
// other, with the wallet's onion client-authorization key in the server's
// keyring and the server's onion address in the wallet's.
type torPeers struct {
	onionKey  *OnionKey
	addr      string
	clientKey *ClientAuthKey
	server    *Config
	wallet    *Config
	logs      *torBuffer
}

func newTorPeers(t testing.TB, port int) *torPeers {
	t.Helper()
	ok, err := GenerateOnionKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	cak, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	sk := mustKey(t)
	wk := mustKey(t)
	addr := fmt.Sprintf("%s:%d", ok.Address(), port)
	skr, err := NewKeyring(Peer{Name: "server", PublicKey: sk.PublicKey()},
		Peer{Name: "wallet", PublicKey: wk.PublicKey(), ClientAuth: cak.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	wkr, err := NewKeyring(Peer{Name: "server", PublicKey: sk.PublicKey(), Address: addr},
		Peer{Name: "wallet", PublicKey: wk.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	logs := &torBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	return &torPeers{
		onionKey: ok, addr: addr, clientKey: cak, logs: logs,
		server: &Config{StaticKey: sk, Keyring: skr, Patterns: []Pattern{KK, XK}, Logger: log},
		wallet: &Config{StaticKey: wk, Keyring: wkr, Logger: log},
	}
}

// ---- tests without tor ------------------------------------------------------

func TestTorOnionKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "onion.key")
	k, created, err := LoadOrCreateOnionKey(path)
	if err != nil || !created {
		t.Fatalf("LoadOrCreateOnionKey: %v, created %v", err, created)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
	k2, created, err := LoadOrCreateOnionKey(path)
	if err != nil || created || k2.Address() != k.Address() {
		t.Fatalf("reload: %v, created %v, %s vs %s", err, created, k2.Address(), k.Address())
	}
	// The address is a valid v3 onion address (the keyring checks the
	// checksum and version).
	if _, err := NewKeyring(Peer{Name: "s", PublicKey: torStaticKey(t).PublicKey(), Address: k.Address() + ":443"}); err != nil {
		t.Fatalf("keyring refuses the onion address: %v", err)
	}
	if err := SaveOnionKey(path, k); err == nil {
		t.Error("SaveOnionKey overwrote a key")
	}
	os.Chmod(path, 0o640)
	if _, err := LoadOnionKey(path); !errors.Is(err, ErrKeyFilePermissions) {
		t.Errorf("group-readable key file: err = %v, want ErrKeyFilePermissions", err)
	}
	if _, _, err := LoadOrCreateOnionKey(path); !errors.Is(err, ErrKeyFilePermissions) {
		t.Errorf("LoadOrCreateOnionKey on a group-readable file: err = %v", err)
	}
	secret := string(k.MarshalPrivateText())
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%#v %x %s %q", k, k, k, k)} {
		if strings.Contains(s, strings.TrimSpace(strings.TrimPrefix(secret, onionKeyPrefix))) || !strings.Contains(s, k.Address()) {
			t.Errorf("formatted key %q", s)
		}
	}
	bad := [][]byte{nil, []byte("NOISETOR-ONION-KEY-ED25519-V3:AAAA"), []byte(onionKeyPrefix + strings.Repeat("A", 86)), []byte(torSecretKeyHeader + "short")}
	for _, b := range bad {
		if _, err := ParseOnionKey(b); !errors.Is(err, ErrBadKey) {
			t.Errorf("ParseOnionKey(%q) = %v, want ErrBadKey", b, err)
		}
	}
}

func TestTorClientAuthKeyFile(t *testing.T) {
	dir := t.TempDir()
	k, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	pub := k.PublicKey()
	if len(pub) != 52 || strings.ToUpper(pub) != pub {
		t.Fatalf("public key %q is not 52 upper-case base32 characters", pub)
	}
	if _, err := NewKeyring(Peer{Name: "w", PublicKey: torStaticKey(t).PublicKey(), ClientAuth: pub}); err != nil {
		t.Fatalf("keyring refuses the client-auth key: %v", err)
	}
	path := filepath.Join(dir, "client.auth")
	if err := SaveClientAuthKey(path, k); err != nil {
		t.Fatal(err)
	}
	k2, err := LoadClientAuthKey(path)
	if err != nil || k2.PublicKey() != pub {
		t.Fatalf("LoadClientAuthKey: %v", err)
	}
	// A tor .auth_private line is accepted too.
	priv := strings.TrimSpace(strings.TrimPrefix(string(k.MarshalPrivateText()), clientAuthKeyPrefix))
	k3, err := ParseClientAuthKey([]byte(strings.Repeat("a", 56) + ":descriptor:x25519:" + priv + "\n"))
	if err != nil || k3.PublicKey() != pub {
		t.Fatalf("ParseClientAuthKey(.auth_private): %v", err)
	}
	if s := fmt.Sprintf("%v %#v %x %s", k, k, k, k); strings.Contains(s, priv) {
		t.Errorf("formatted key shows the private key: %q", s)
	}
	if err := SaveClientAuthKey(path, k); err == nil {
		t.Error("SaveClientAuthKey overwrote a key")
	}
	os.Chmod(path, 0o604)
	if _, err := LoadClientAuthKey(path); !errors.Is(err, ErrKeyFilePermissions) {
		t.Errorf("world-readable key file: err = %v", err)
	}
	if _, err := parseClientAuthPublic("descriptor:x25519:" + pub); err != nil {
		t.Errorf("public key with tor's prefix: %v", err)
	}
	if _, err := parseClientAuthPublic(pub[:51]); err == nil {
		t.Error("accepted a truncated public key")
	}
}

func TestTorVersionAndStartErrors(t *testing.T) {
	for v, ok := range map[string]bool{
		"0.4.9.11 (git-f71a93b25f7a394a)": true,
		"Tor version 0.4.8.1-alpha.":      true,
		"0.5.0.1":                         true,
		"1.0.0":                           true,
		"0.4.7.16":                        false,
		"Tor version 0.3.5.8.":            false,
		"garbage":                         false,
	} {
		if err := checkTorVersion(v); (err == nil) != ok {
			t.Errorf("checkTorVersion(%q) = %v", v, err)
		} else if err != nil && !errors.Is(err, ErrTorVersion) {
			t.Errorf("checkTorVersion(%q) = %v, not ErrTorVersion", v, err)
		}
	}
	ctx := context.Background()
	if _, err := StartTor(ctx, &TorConfig{DataDir: t.TempDir(), ExePath: "/nonexistent/tor"}); !errors.Is(err, ErrTorNotFound) {
		t.Errorf("missing tor: %v", err)
	}
	if _, err := StartTor(ctx, &TorConfig{}); err == nil || !strings.Contains(err.Error(), "DataDir") {
		t.Errorf("no DataDir: %v", err)
	}
	// A control port that refuses connections.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	if _, err := AttachTor(ctx, addr, nil); !errors.Is(err, ErrTorDown) || !strings.Contains(err.Error(), addr) {
		t.Errorf("closed control port: %v", err)
	}
}

// ---- tests on the private Tor network ---------------------------------------

// TestTorOnionEcho publishes an onion service with client authorization and
// echoes through it, without Noise.
func TestTorOnionEcho(t *testing.T) {
	srv, cli := torPair(t)
	cak, err := GenerateClientAuthKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "onion.key")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	start := time.Now()
	l, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: keyFile, Port: 80, ClientAuth: []string{cak.PublicKey()}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	torRecord(t, "ListenOnion to descriptor published (HS_DESC UPLOADED): %.2fs", time.Since(start).Seconds())
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("onion key file: %v %v", st, err)
	}
	k, err := LoadOnionKey(keyFile)
	if err != nil || k.Address() != l.OnionAddress() || l.Addr().String() != l.OnionAddress()+":80" || l.Addr().Network() != "onion" {
		t.Fatalf("address %s / %v, key file says %v (%v)", l.OnionAddress(), l.Addr(), k, err)
	}
	go torServeEcho(l)

	d := &TorDialer{Tor: cli, ClientAuth: cak}
	c, ttfb, err := torFirstByte(ctx, d, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	torRecord(t, "raw onion dial to first byte, first connection (descriptor fetch, intro, rendezvous): %v", ttfb.Round(time.Millisecond))
	torEcho(t, c, bytes.Repeat([]byte("onion "), 10000))
	c.Close()
	c, ttfb, err = torFirstByte(ctx, d, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	torRecord(t, "raw onion dial to first byte, next connection: %v", ttfb.Round(time.Millisecond))

	// tor can forward to a unix socket instead of a TCP port.
	ul, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	uk, _ := GenerateOnionKey(nil)
	ol, err := srv.ListenOnion(ctx, &OnionConfig{Key: uk, Port: 80, ClientAuth: []string{cak.PublicKey()}, Listener: ul})
	if err != nil {
		t.Fatal(err)
	}
	go torServeEcho(ol)
	c, _, err = torFirstByte(ctx, d, ol.Addr().String())
	if err != nil {
		t.Fatalf("onion service on a unix socket: %v", err)
	}
	torEcho(t, c, []byte("over a unix socket"))
	c.Close()
	ol.Close()

	// A second service on the same key is refused; a closed listener says so.
	if _, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: keyFile, Port: 81, ClientAuth: []string{cak.PublicKey()}}); err == nil {
		t.Error("published the same onion key twice")
	}
	l.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v", err)
	}
	// A service nobody is authorized for is refused unless asked for.
	if _, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k"), Port: 80}); err == nil || !strings.Contains(err.Error(), "NoClientAuth") {
		t.Errorf("ListenOnion without client auth keys: %v", err)
	}
}

// TestTorNoise runs KK and XK handshakes over an onion service, and
// compares dial-to-first-byte with and without the Noise handshake on
// warm circuits.
func TestTorNoise(t *testing.T) {
	srv, cli := torPair(t)
	p := newTorPeers(t, 443)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ol, err := srv.ListenOnion(ctx, &OnionConfig{Key: p.onionKey, Port: 443, Keyring: p.server.Keyring})
	if err != nil {
		t.Fatal(err)
	}
	defer ol.Close()
	l := NewListener(ol, p.server)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				peer, _ := PeerOf(c)
				line, err := bufio.NewReader(c).ReadString('\n')
				if err == nil {
					fmt.Fprintf(c, "%s from %s via %s\n", strings.TrimSpace(line), peer.Name, c.(*Conn).ConnectionState().Pattern)
				}
			}()
		}
	}()

	for _, pat := range []Pattern{KK, XK} {
		t.Run(pat.String(), func(t *testing.T) {
			cfg := p.wallet.Clone()
			cfg.Patterns = []Pattern{pat}
			d := &Dialer{Config: cfg, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey}}
			for i, what := range []string{"first connection", "next connection"} {
				c, ttfb, err := torFirstByte(ctx, d, p.addr)
				if err != nil {
					t.Fatal(err)
				}
				st := c.(*Conn).ConnectionState()
				if !st.HandshakeComplete || st.Peer.Name != "server" || st.Pattern != pat {
					t.Fatalf("connection state %+v", st)
				}
				rest, err := bufio.NewReader(c).ReadString('\n')
				c.Close()
				if want := fmt.Sprintf("ing from wallet via %s\n", pat); err != nil || rest != want {
					t.Fatalf("reply %q, %v; want %q", rest, err, want)
				}
				if i == 1 || pat == KK {
					torRecord(t, "Noise %s over onion, dial+handshake to first byte, %s: %v", pat, what, ttfb.Round(time.Millisecond))
				}
			}
		})
	}

	// The same warm circuit without Noise: the raw service gets its own
	// onion (and key), dialed from the same client tor.
	rawKey, _ := GenerateOnionKey(nil)
	rl, err := srv.ListenOnion(ctx, &OnionConfig{Key: rawKey, Port: 80, ClientAuth: []string{p.clientKey.PublicKey()}})
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	go torServeEcho(rl)
	rd := &TorDialer{Tor: cli, ClientAuth: p.clientKey}
	var raw, noise []time.Duration
	for range 5 {
		c, d1, err := torFirstByte(ctx, rd, rl.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		c, d2, err := torFirstByte(ctx, &Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey}}, p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		raw, noise = append(raw, d1), append(noise, d2)
	}
	torRecord(t, "warm dial to first byte, median of 5: raw onion %v, Noise KK over onion %v", torMedian(raw), torMedian(noise))
}

func torMedian(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2].Round(time.Millisecond)
}

// TestTorHTTP serves net/http over a Noise onion service; the handler sees
// the authenticated peer.
func TestTorHTTP(t *testing.T) {
	srv, cli := torPair(t)
	p := newTorPeers(t, 443)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ol, err := srv.ListenOnion(ctx, &OnionConfig{Key: p.onionKey, Port: 443, Keyring: p.server.Keyring})
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{
		ConnContext: ConnContext,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			peer, ok := PeerFromContext(r.Context())
			if !ok {
				http.Error(w, "no peer", http.StatusInternalServerError)
				return
			}
			fmt.Fprintf(w, "hello %s %s", peer.Name, peer.PublicKey.Fingerprint())
		}),
	}
	go hs.Serve(NewListener(ol, p.server))
	defer hs.Close()

	tr := &http.Transport{DialContext: (&Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey}}).DialContext}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: time.Minute}
	for range 3 {
		resp, err := hc.Get("http://" + p.addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := "hello wallet " + p.wallet.StaticKey.PublicKey().Fingerprint(); string(body) != want {
			t.Fatalf("body %q, want %q", body, want)
		}
	}
}

// TestTorClientAuthRefused checks that a client whose client-auth key is
// not in the service's keyring cannot even reach the service, and is told
// why.
func TestTorClientAuthRefused(t *testing.T) {
	srv, cli := torPair(t)
	p := newTorPeers(t, 443)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// No reachability checks: they register a key of their own on the
	// service's tor.
	ol, err := srv.ListenOnion(ctx, &OnionConfig{Key: p.onionKey, Port: 443, Keyring: p.server.Keyring, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer ol.Close()
	var accepted sync.WaitGroup
	accepts := 0
	var mu sync.Mutex
	accepted.Add(1)
	go func() {
		defer accepted.Done()
		for {
			c, err := ol.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepts++
			mu.Unlock()
			c.Close()
		}
	}()

	stranger, _ := GenerateClientAuthKey(nil)
	start := time.Now()
	_, err = (&Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: stranger}}).DialContext(ctx, "tcp", p.addr)
	var de *TorDialError
	if !errors.Is(err, ErrOnionClientAuth) || !errors.As(err, &de) || de.Reply != 0xF5 {
		t.Fatalf("dial with a client-auth key the service does not list: %v", err)
	}
	t.Logf("refused in %v: %v", time.Since(start).Round(time.Millisecond), err)
	if !strings.Contains(err.Error(), "client authorization refused") {
		t.Errorf("error does not say what happened: %v", err)
	}

	// A tor with no key at all for the service (the service's own tor has
	// none) gets "missing client authorization".
	_, err = srv.DialContext(ctx, "tcp", p.addr)
	if !errors.Is(err, ErrOnionClientAuth) || !errors.As(err, &de) || de.Reply != 0xF4 {
		t.Fatalf("dial without a client-auth key: %v", err)
	}

	// The right key, registered on the same tor, replaces the wrong one.
	c, err := (&TorDialer{Tor: cli, ClientAuth: p.clientKey}).DialContext(ctx, "tcp", p.addr)
	if err != nil {
		t.Fatalf("dial with the authorized key after a refused one: %v", err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("read from the service, which closes at once: %v, want EOF", err)
	}
	c.Close()
	ol.Close()
	accepted.Wait()
	if accepts != 1 {
		t.Errorf("the service accepted %d connections, want 1 (only the authorized client)", accepts)
	}
}

// TestTorConcurrent runs 20 Noise connections over one onion service at
// once.
func TestTorConcurrent(t *testing.T) {
	srv, cli := torPair(t)
	p := newTorPeers(t, 443)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ol, err := srv.ListenOnion(ctx, &OnionConfig{Key: p.onionKey, Port: 443, Keyring: p.server.Keyring})
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(ol, p.server)
	defer l.Close()
	go torServeEcho(l)
	d := &Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey}}
	const n = 20
	start := time.Now()
	errs := make(chan error, n)
	for i := range n {
		go func() {
			c, err := d.DialContext(ctx, "tcp", p.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			msg := bytes.Repeat([]byte{byte(i)}, 32<<10)
			go c.Write(msg)
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("connection %d: echo differs", i)
				return
			}
			errs <- nil
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	torRecord(t, "%d concurrent Noise connections over one onion service, 32 KiB echoed each: %.2fs", n, time.Since(start).Seconds())
}

// TestTorRestart kills the tors that StartTor launched: the client's dials
// fail at once while its tor is down and work once it is back; the service
// is published again under the same address. A new Tor on the same data
// directory and key file gets the same address again.
func TestTorRestart(t *testing.T) {
	n := tortest.Shared(t)
	dirS, dirC := t.TempDir(), t.TempDir()
	srv, cli, _ := torStartPair(t, n, dirS, dirC, torTestLogger(t), torTestLogger(t))
	defer srv.Close()
	defer cli.Close()
	if len(torGoroutines()) == 0 {
		t.Fatal("the goroutine leak check of TestMain sees no goroutines of running Tors")
	}
	cak, _ := GenerateClientAuthKey(nil)
	keyFile := filepath.Join(dirS, "onion.key")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: keyFile, Port: 80, ClientAuth: []string{cak.PublicKey()}})
	if err != nil {
		t.Fatal(err)
	}
	go torServeEcho(l)
	addr := l.Addr().String()
	d := &TorDialer{Tor: cli, ClientAuth: cak}
	c, _, err := torFirstByte(ctx, d, addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// The client's tor crashes.
	cliPID := torPID(cli)
	if err := syscall.Kill(cliPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = d.DialContext(ctx, "tcp", addr)
	if !errors.Is(err, ErrTorDown) || time.Since(start) > 2*time.Second {
		t.Fatalf("dial while tor is down: %v after %v; want ErrTorDown at once", err, time.Since(start))
	}
	t.Logf("dial while the client's tor is down failed in %v: %v", time.Since(start).Round(time.Millisecond), err)
	if strings.Count(err.Error(), "tor is not available") > 1 {
		t.Errorf("doubled error prefix: %v", err)
	}
	// The supervisor may not have seen the death yet when the first dial
	// failed: wait for a new tor process, then for it to be usable.
	for torPID(cli) == cliPID || torPID(cli) == 0 {
		if time.Since(start) > time.Minute {
			t.Fatal("the client's tor was not relaunched within a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
	up := torWaitUp(t, cli, time.Minute)
	c, ttfb, err := torFirstByte(ctx, d, addr)
	if err != nil {
		t.Fatalf("dial after the client's tor came back: %v", err)
	}
	c.Close()
	torRecord(t, "client tor killed: relaunched and bootstrapped in %.1fs; then dial to first byte %v", up.Seconds(), ttfb.Round(time.Millisecond))

	// The service's tor crashes, while the client keeps dialing (each
	// dial bounded by RetryFor, as an application would).
	srvPID := torPID(srv)
	if err := syscall.Kill(srvPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	restartedc, republishedc := make(chan time.Duration, 1), make(chan time.Duration, 1)
	go func() {
		for torPID(srv) == srvPID || torPID(srv) == 0 {
			time.Sleep(5 * time.Millisecond)
		}
		restartedc <- time.Since(killed)
		for l.Status().Publications < 2 && time.Since(killed) < time.Minute {
			time.Sleep(5 * time.Millisecond)
		}
		republishedc <- time.Since(killed)
	}()
	// Each dial may run as long as a launched tor's SocksTimeout (20 s), so
	// that tor itself gets to give up on the dead service's introduction
	// points and fetch the new descriptor; cutting attempts short at 5 s once
	// kept a client out for over a minute.
	rd := &TorDialer{Tor: cli, ClientAuth: cak, RetryFor: 20 * time.Second}
	for {
		c, _, err = torFirstByte(ctx, rd, addr)
		if err == nil {
			break
		}
		t.Logf("%v after the kill: %v", time.Since(killed).Round(time.Millisecond), err)
		if time.Since(killed) > time.Minute {
			t.Fatalf("no dial got through within a minute of the service's tor being killed: %v", err)
		}
	}
	clientIn := time.Since(killed)
	torEcho(t, c, []byte("still here"))
	c.Close()
	restarted, republished := <-restartedc, <-republishedc
	if l.Addr().String() != addr {
		t.Fatalf("address changed to %s", l.Addr().String())
	}
	torRecord(t, "service tor SIGKILLed: new tor running %v later, same address republished %.1fs after the kill, a client that kept dialing got in %.1fs after the kill",
		restarted.Round(time.Millisecond), republished.Seconds(), clientIn.Seconds())
	if clientIn > 30*time.Second {
		t.Errorf("the client got back in only %v after the service's tor was killed", clientIn)
	}

	// The program restarts: same data directory, same key file.
	srv.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Tor.Close: %v", err)
	}
	start = time.Now()
	srv2, err := StartTor(ctx, &TorConfig{DataDir: dirS, Torrc: n.TorrcLines(), Logger: torTestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	l2, err := srv2.ListenOnion(ctx, &OnionConfig{KeyFile: keyFile, Port: 80, ClientAuth: []string{cak.PublicKey()}})
	if err != nil {
		t.Fatal(err)
	}
	if l2.Addr().String() != addr {
		t.Fatalf("address after restart %s, want %s", l2.Addr(), addr)
	}
	torRecord(t, "StartTor on an existing data directory + ListenOnion with the saved key: %.1fs", time.Since(start).Seconds())
	go torServeEcho(l2)
	c, _, err = torFirstByte(ctx, d, addr)
	if err != nil {
		t.Fatalf("dial after program restart: %v", err)
	}
	c.Close()
}

// TestTorAttach attaches to a tor run by the fixture (as to a system tor),
// with a control password, and survives that tor's restart.
func TestTorAttach(t *testing.T) {
	n := tortest.Shared(t)
	_, cli := torPair(t)
	ft := n.NewTor(t, &tortest.TorOptions{
		Name:            "system-tor",
		ControlPassword: "s3cret control",
		Torrc:           []string{"HiddenServiceDir " + filepath.Join(n.Dir, "system-tor-hs"), "HiddenServicePort 80 127.0.0.1:9"},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	for _, pw := range []string{"", "wrong"} {
		if tr, err := AttachTor(ctx, ft.ControlAddr, &TorAttachConfig{Password: pw}); !errors.Is(err, ErrTorAuth) {
			if tr != nil {
				tr.Close()
			}
			t.Errorf("password %q: %v, want ErrTorAuth", pw, err)
		}
	}
	// A key written by tor itself loads, with the address tor computed.
	hsDir := filepath.Join(n.Dir, "system-tor-hs")
	hostname, err := os.ReadFile(filepath.Join(hsDir, "hostname"))
	if err != nil {
		t.Fatal(err)
	}
	k, err := LoadOnionKey(filepath.Join(hsDir, "hs_ed25519_secret_key"))
	if err != nil || k.Address() != strings.TrimSpace(string(hostname)) {
		t.Fatalf("tor's own key: %v, address %v, tor says %s", err, k, hostname)
	}

	tr, err := AttachTor(ctx, ft.ControlAddr, &TorAttachConfig{Password: ft.ControlPassword, Logger: torTestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	cak, _ := GenerateClientAuthKey(nil)
	l, err := tr.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k"), Port: 80, ClientAuth: []string{cak.PublicKey()}})
	if err != nil {
		t.Fatal(err)
	}
	go torServeEcho(l)
	d := &TorDialer{Tor: cli, ClientAuth: cak}
	c, _, err := torFirstByte(ctx, d, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	start := time.Now()
	if err := ft.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	torWaitPublications(t, l, 2, time.Minute)
	torRecord(t, "attached tor restarted: reconnected and republished %.1fs after the restart began", time.Since(start).Seconds())
	c, _, err = torFirstByte(ctx, d, l.Addr().String())
	if err != nil {
		t.Fatalf("dial after the attached tor restarted: %v", err)
	}
	c.Close()

	tr.Close()
	if !ft.Running() {
		t.Error("closing an attached Tor stopped tor")
	}
	if _, err := tr.DialContext(ctx, "tcp", l.Addr().String()); !errors.Is(err, ErrTorClosed) {
		t.Errorf("dial after Close: %v", err)
	}
}
