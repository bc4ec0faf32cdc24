package noisetor

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// flipProxy relays TCP between callers and target, flipping one byte of one
// direction at a given offset.
type flipProxy struct {
	ln     net.Listener
	target string
}

type flipSpec struct {
	toServer bool // flip in the client-to-server direction
	offset   int  // -1: flip nothing
}

func newFlipProxy(t *testing.T, target string) *flipProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &flipProxy{ln: ln, target: target}
}

// relay copies src to dst, flipping byte offset (if >= 0), and returns the
// number of bytes copied.
func relay(dst, src net.Conn, offset int) int {
	buf := make([]byte, 4096)
	total := 0
	for {
		n, err := src.Read(buf)
		if offset >= total && offset < total+n {
			buf[offset-total] ^= 0x01
		}
		total += n
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return total
			}
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return total
		}
	}
}

// exchange dials through a fresh proxied connection with spec, sends "ping!",
// and expects "pong!" back. It returns the first error either way, and the
// byte counts seen in each direction once the pong has arrived.
func (p *flipProxy) exchange(cfg *Config, spec flipSpec) (c2s, s2c int, err error) {
	type counts struct{ c2s, s2c int }
	done := make(chan counts, 1)
	go func() {
		in, err := p.ln.Accept()
		if err != nil {
			done <- counts{}
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			done <- counts{}
			return
		}
		off1, off2 := -1, -1
		if spec.toServer {
			off1 = spec.offset
		} else {
			off2 = spec.offset
		}
		var wg sync.WaitGroup
		var c counts
		wg.Add(2)
		go func() { defer wg.Done(); c.c2s = relay(out, in, off1) }()
		go func() { defer wg.Done(); c.s2c = relay(in, out, off2) }()
		wg.Wait()
		in.Close()
		out.Close()
		done <- c
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := (&Dialer{Config: cfg, Peer: "server"}).DialContext(ctx, "tcp", p.ln.Addr().String())
	if err == nil {
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err = conn.Write([]byte("ping!")); err == nil {
			buf := make([]byte, 5)
			if _, err = io.ReadFull(conn, buf); err == nil && string(buf) != "pong!" {
				err = fmt.Errorf("corrupted plaintext delivered: %q", buf)
			}
		}
		conn.(*Conn).conn.Close() // stop here: the close record is not part of the exchange
	}
	c := <-done
	return c.c2s, c.s2c, err
}

// pingPongServer serves "ping!" → "pong!" on l until it is closed, and counts
// the pings that arrived intact.
func pingPongServer(l net.Listener) (intact *int64, mu *sync.Mutex) {
	var n int64
	mu = &sync.Mutex{}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 5)
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping!" {
					return
				}
				mu.Lock()
				n++
				mu.Unlock()
				c.Write([]byte("pong!"))
			}()
		}
	}()
	return &n, mu
}

// TestTamperEveryByte flips, one connection at a time, every byte of the
// preamble, the handshake messages and the first transport frames in both
// directions. Every such connection must fail; none may deliver altered
// plaintext; and the listener keeps serving a good peer throughout.
func TestTamperEveryByte(t *testing.T) {
	for _, pattern := range []Pattern{KK, XK} {
		t.Run(pattern.String(), func(t *testing.T) {
			ps := newTestPeers(t, "client", "server")
			ps["client"].cfg.Patterns = []Pattern{pattern}
			ps["server"].cfg.Patterns = []Pattern{KK, XK}
			ps["server"].cfg.HandshakeTimeout = time.Second
			ps["client"].cfg.HandshakeTimeout = time.Second
			l, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			pingPongServer(l)
			proxy := newFlipProxy(t, l.Addr().String())

			c2s, s2c, err := proxy.exchange(ps["client"].cfg, flipSpec{offset: -1})
			if err != nil {
				t.Fatalf("untampered exchange failed: %v", err)
			}
			// Client to server: preamble 40, msg1 50, (XK: msg3 66,) confirm 19,
			// ping 24. Server to client: msg2 50, pong 24, then the server's
			// close record, which the exchange never reads and so leaves out.
			t.Logf("%v: %d bytes client→server, %d server→client", pattern, c2s, s2c)
			pongEnd := 2 + 48 + frameHeader + aeadOverhead + 1 + len("pong!")
			if s2c < pongEnd {
				t.Fatalf("server sent %d bytes, want at least %d", s2c, pongEnd)
			}
			s2c = pongEnd

			var specs []flipSpec
			for i := 0; i < c2s; i++ {
				specs = append(specs, flipSpec{toServer: true, offset: i})
			}
			for i := 0; i < s2c; i++ {
				specs = append(specs, flipSpec{offset: i})
			}
			var wg sync.WaitGroup
			sem := make(chan struct{}, 16)
			var mu sync.Mutex
			var survived []flipSpec
			stopGood := make(chan struct{})
			goodErrs := make(chan error, 1)
			go func() { // a good peer keeps connecting directly meanwhile
				defer close(goodErrs)
				for {
					select {
					case <-stopGood:
						return
					default:
					}
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					c, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).DialContext(ctx, "tcp", l.Addr().String())
					cancel()
					if err == nil {
						c.Write([]byte("ping!"))
						buf := make([]byte, 5)
						_, err = io.ReadFull(c, buf)
						c.Close()
					}
					if err != nil {
						goodErrs <- err
						return
					}
				}
			}()
			for _, s := range specs {
				wg.Add(1)
				sem <- struct{}{}
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					if _, _, err := proxy.exchange(ps["client"].cfg, s); err == nil {
						mu.Lock()
						survived = append(survived, s)
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			close(stopGood)
			if err := <-goodErrs; err != nil {
				t.Errorf("good peer failed while the listener was under tampering: %v", err)
			}
			for _, s := range survived {
				t.Errorf("flipping byte %d (toServer=%v) went unnoticed", s.offset, s.toServer)
			}
		})
	}
}
