package noisetor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
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
