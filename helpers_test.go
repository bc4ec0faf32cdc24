package noisetor

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// testPeer is one machine of a test: its key and its config.
type testPeer struct {
	name string
	key  *PrivateKey
	cfg  *Config
	logs *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newTestPeers makes peers that all know each other.
func newTestPeers(t testing.TB, names ...string) map[string]*testPeer {
	t.Helper()
	peers := map[string]*testPeer{}
	var ring []Peer
	for _, n := range names {
		k := mustKey(t)
		logs := &syncBuffer{}
		peers[n] = &testPeer{name: n, key: k, logs: logs, cfg: &Config{
			StaticKey: k,
			Logger:    slog.New(slog.NewTextHandler(logs, nil)),
		}}
		ring = append(ring, Peer{Name: n, PublicKey: k.PublicKey()})
	}
	for _, p := range peers {
		kr, err := NewKeyring(ring...)
		if err != nil {
			t.Fatal(err)
		}
		p.cfg.Keyring = kr
	}
	return peers
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- nil
			return
		}
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	if server == nil {
		t.Fatal("accept failed")
	}
	return client, server
}

// handshakePair runs a handshake between client (dialing peer "server") and
// server over loopback TCP and returns both ends.
func handshakePair(t testing.TB, client, server *testPeer) (*Conn, *Conn) {
	t.Helper()
	a, b := tcpPair(t)
	return handshakeOver(t, a, b, client, server)
}

// handshakeOver runs the handshake of client over a and server over b, the
// two ends of one connection.
func handshakeOver(t testing.TB, a, b net.Conn, client, server *testPeer) (*Conn, *Conn) {
	t.Helper()
	cc := Client(a, client.cfg, server.name)
	sc := Server(b, server.cfg)
	errc := make(chan error, 1)
	go func() { errc <- sc.HandshakeContext(context.Background()) }()
	if err := cc.HandshakeContext(context.Background()); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	return cc, sc
}

// checkNoGoroutineLeak fails the test if goroutines started during it are
// still running shortly after it ends.
func checkNoGoroutineLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<16)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, n, buf)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

func mustContain(t testing.TB, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%q does not contain %q", s, sub)
		}
	}
}

// listenServing starts a Listener on 127.0.0.1 for cfg whose accepted
// connections are handed to handle, each in its own goroutine (nil: closed
// at once), and closes it when the test ends.
func listenServing(t testing.TB, cfg *Config, handle func(net.Conn)) net.Listener {
	t.Helper()
	ln, err := Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if handle == nil {
		handle = func(net.Conn) {} // serveAll closes it
	}
	serveAll(t, ln, handle)
	return ln
}

// serveAll accepts from l until it is closed, running handle on each
// connection in its own goroutine. Cleanup closes l and every accepted
// connection and waits for the handlers.
func serveAll(t testing.TB, l net.Listener, handle func(c net.Conn)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// delayProxy forwards TCP connections on 127.0.0.1 to target, holding every
// chunk back by oneWay in each direction (order kept, a half-close passed on
// after the data before it), as a Tor circuit does. It dials target from
// the local address from (such as 127.0.0.2, so that the listener sees the
// proxied caller at its own address), or any if from is "".
func delayProxy(t testing.TB, target, from string, oneWay time.Duration) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var d net.Dialer
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	keep := func(c net.Conn) bool {
		mu.Lock()
		defer mu.Unlock()
		if conns == nil {
			c.Close()
			return false
		}
		conns = append(conns, c)
		return true
	}
	conns = []net.Conn{}
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		type chunk struct {
			due time.Time
			b   []byte
		}
		ch := make(chan chunk, 4096)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(ch)
			for {
				b := make([]byte, 32<<10)
				n, err := src.Read(b)
				if n > 0 {
					ch <- chunk{time.Now().Add(oneWay), b[:n]}
				}
				if err != nil {
					return
				}
			}
		}()
		for c := range ch {
			time.Sleep(time.Until(c.due))
			if _, err := dst.Write(c.b); err != nil {
				src.Close()
				dst.Close()
				for range ch {
				}
				return
			}
		}
		dst.(*net.TCPConn).CloseWrite()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := d.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			if !keep(c) || !keep(up) {
				c.Close()
				up.Close()
				return
			}
			wg.Add(2)
			go pipe(up, c)
			go pipe(c, up)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		conns = nil
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// mustKey returns a new X25519 key.
func mustKey(t testing.TB) *PrivateKey {
	t.Helper()
	k, err := GenerateKey(X25519, nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// discardLogger is a Logger that drops every record.
func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
