package noisetor

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

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

// A relayed stream dropped mid-handshake is cut at once, without
// relayStream.Close's linger (a read of up to relayLinger): the Listener
// drops connections with its mutex held, and each linger would hold every
// other handshake up.
func TestDropCutsRelayedStreamWithoutLinger(t *testing.T) {
	ps := newTestPeers(t, "wallet", "sync")
	a, b := tcpPair(t)
	reads := &readCounter{Conn: a}
	outer, far := handshakeOver(t, reads, b, ps["wallet"], ps["sync"])
	defer far.Close()
	inner := Server(&relayStream{Conn: outer}, ps["wallet"].cfg)
	before := reads.n.Load()
	inner.drop("test")
	if n := reads.n.Load() - before; n != 0 {
		t.Errorf("drop read the outer connection %d times (a linger) before cutting it", n)
	}
	if _, err := outer.Write([]byte("x")); err == nil {
		t.Error("the outer connection is still open after drop")
	}
}

// readCounter counts the Read calls on a connection.
type readCounter struct {
	net.Conn
	n atomic.Int64
}

func (r *readCounter) Read(b []byte) (int, error) {
	r.n.Add(1)
	return r.Conn.Read(b)
}
