package noisetor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestHTTPOverNoisetor(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "cosigner", "wallet")
	l, err := Listen("tcp", "127.0.0.1:0", ps["cosigner"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		ConnContext: ConnContext,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			p, ok := PeerFromContext(r.Context())
			if !ok {
				http.Error(w, "no peer", 500)
				return
			}
			// The whole state, for channel binding.
			if st, ok := ConnectionStateFromContext(r.Context()); ok && st.Peer.Name == p.Name {
				w.Header().Set("Handshake-Hash", fmt.Sprintf("%x", st.HandshakeHash))
			}
			body, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "hello %s (%s), you sent %d bytes", p.Name, p.PublicKey.Fingerprint(), len(body))
		}),
	}
	go srv.Serve(l)
	defer srv.Close()

	// The wallet reaches the co-signer by address: the keyring says who is there.
	ps["wallet"].cfg.Keyring.Add(Peer{Name: "cosigner2", PublicKey: mustKey(t).PublicKey()}) // a distractor
	kr := ps["wallet"].cfg.Keyring
	cs, _ := kr.ByName("cosigner")
	addr := l.Addr().String()
	cs.Address = addr
	kr2, _ := NewKeyring(cs, Peer{Name: "wallet", PublicKey: ps["wallet"].key.PublicKey()})
	ps["wallet"].cfg.Keyring = kr2

	var dialed []*Conn
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&Dialer{Config: ps["wallet"].cfg}).DialContext(ctx, network, addr)
		if err == nil {
			dialed = append(dialed, c.(*Conn))
		}
		return c, err
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	for i := 0; i < 3; i++ { // keep-alive reuses the session
		resp, err := client.Post("http://"+addr+"/sign", "text/plain", strings.NewReader(strings.Repeat("x", 100_000)))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		want := fmt.Sprintf("hello wallet (%s), you sent 100000 bytes", ps["wallet"].key.PublicKey().Fingerprint())
		if string(body) != want {
			t.Fatalf("got %q, want %q", body, want)
		}
		if h := resp.Header.Get("Handshake-Hash"); len(dialed) != 1 || h != fmt.Sprintf("%x", dialed[0].ConnectionState().HandshakeHash) {
			t.Errorf("the handler's handshake hash %q is not the client's session's", h)
		}
	}
	if n := strings.Count(ps["cosigner"].logs.String(), "outcome=ok"); n != 1 {
		t.Errorf("%d handshakes for 3 keep-alive requests, want 1", n)
	}
}

// Failed handshakes never reach Accept, so http.Serve keeps serving.
func TestHTTPServeSurvivesBadClients(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	stranger := newTestPeers(t, "stranger")["stranger"]
	stranger.cfg.Keyring.Add(Peer{Name: "server", PublicKey: ps["server"].key.PublicKey()})
	l, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	go func() { served <- srv.Serve(l) }()
	addr := l.Addr().String()
	for i := 0; i < 5; i++ {
		c, _ := net.Dial("tcp", addr)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		c.Close()
		(&Dialer{Config: stranger.cfg, Peer: "server"}).Dial("tcp", addr)
	}
	tr := &http.Transport{DialContext: (&Dialer{Config: ps["client"].cfg, Peer: "server"}).DialContext}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("good client after bad ones: %v", err)
	}
	resp.Body.Close()
	srv.Close()
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("Serve returned %v", err)
	}
}

func TestListenerConcurrentHandshakes(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "server", "client")
	l, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Stalled callers hold no slot that a real peer needs.
	for i := 0; i < 20; i++ {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).DialContext(ctx, "tcp", l.Addr().String())
			if err != nil {
				errs <- err
				return
			}
			c.Close()
		}()
	}
	got := 0
	for got < 50 {
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		got++
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}

func TestListenerEvictsOldestPending(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	ps["server"].cfg.MaxPendingHandshakes = 4
	l, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var stalled []net.Conn
	for i := 0; i < 10; i++ {
		c, _ := net.Dial("tcp", l.Addr().String())
		defer c.Close()
		stalled = append(stalled, c)
	}
	go func() {
		c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", l.Addr().String())
		if err == nil {
			c.Close()
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// The first stalled connections were dropped to make room.
	stalled[0].SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := stalled[0].Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("oldest stalled connection: %v, want EOF", err)
	}
	time.Sleep(50 * time.Millisecond)
	mustContain(t, ps["server"].logs.String(), "too many unauthenticated connections")
}

// flakyListener fails Accept a few times with a non-timeout error, as a
// listener out of file descriptors does.
type flakyListener struct {
	net.Listener
	mu    sync.Mutex
	fails int
}

func (f *flakyListener) Accept() (net.Conn, error) {
	f.mu.Lock()
	if f.fails > 0 {
		f.fails--
		f.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: errors.New("too many open files")}
	}
	f.mu.Unlock()
	return f.Listener.Accept()
}

func TestListenerSurvivesAcceptErrors(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(&flakyListener{Listener: inner, fails: 3}, ps["server"].cfg)
	defer l.Close()
	go func() {
		if c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", inner.Addr().String()); err == nil {
			c.Close()
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("listener gave up after transient accept errors: %v", err)
	}
	c.Close()
	mustContain(t, ps["server"].logs.String(), "accept failed; retrying", "too many open files")
}

// A dial that fails before any handshake is logged too.
func TestDialFailureIsLogged(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	_, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", addr)
	if err == nil {
		t.Fatal("dial to a closed port succeeded")
	}
	mustContain(t, err.Error(), "noisetor: dialing server at "+addr+": ")
	if strings.Count(err.Error(), "noisetor:") != 1 {
		t.Errorf("repeated prefix: %v", err)
	}
	mustContain(t, ps["client"].logs.String(), "direction=out", "peer=server", "outcome=failed", "connection refused")
}
