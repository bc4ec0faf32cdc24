package noisetor

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"reflect"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/nettest"
)

func TestHandshakeAndEcho(t *testing.T) {
	for _, pattern := range []Pattern{KK, XK} {
		for _, suite := range []CipherSuite{ChaChaPoly, AESGCM} {
			t.Run(pattern.String()+"_"+suite.String(), func(t *testing.T) {
				checkNoGoroutineLeak(t)
				ps := newTestPeers(t, "wallet", "cosigner")
				ps["wallet"].cfg.Patterns = []Pattern{pattern}
				ps["wallet"].cfg.CipherSuites = []CipherSuite{suite}
				ps["cosigner"].cfg.Patterns = []Pattern{KK, XK}
				ps["cosigner"].cfg.CipherSuites = []CipherSuite{ChaChaPoly, AESGCM}
				cc, sc := handshakePair(t, ps["wallet"], ps["cosigner"])
				defer cc.Close()
				defer sc.Close()

				cs, ss := cc.ConnectionState(), sc.ConnectionState()
				if cs.Peer.Name != "cosigner" || ss.Peer.Name != "wallet" {
					t.Fatalf("peers: client sees %q, server sees %q", cs.Peer.Name, ss.Peer.Name)
				}
				if ss.Peer.PublicKey != ps["wallet"].key.PublicKey() {
					t.Fatal("server sees the wrong key")
				}
				if cs.Pattern != pattern || ss.Pattern != pattern || cs.CipherSuite != suite || ss.CipherSuite != suite {
					t.Fatalf("negotiated %v/%v and %v/%v", cs.Pattern, cs.CipherSuite, ss.Pattern, ss.CipherSuite)
				}
				if !bytes.Equal(cs.HandshakeHash, ss.HandshakeHash) || len(cs.HandshakeHash) != 32 {
					t.Fatal("handshake hashes differ")
				}
				if !cs.Initiator || ss.Initiator || !cs.HandshakeComplete {
					t.Fatal("bad state flags")
				}

				// 200 KB each way: several frames, a batch boundary.
				msg := make([]byte, 200_000)
				rand.Read(msg)
				go func() {
					cc.Write(msg)
					cc.CloseWrite()
				}()
				got, err := io.ReadAll(sc)
				if err != nil {
					t.Fatalf("server read: %v", err)
				}
				if !bytes.Equal(got, msg) {
					t.Fatal("data mismatch")
				}
				mustContain(t, ps["cosigner"].logs.String(), "direction=in", "peer=wallet", "outcome=ok", "pattern="+pattern.String())
				mustContain(t, ps["wallet"].logs.String(), "direction=out", "peer=cosigner", "outcome=ok")
			})
		}
	}
}

func TestLazyHandshake(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	x, y := tcpPair(t)
	cc, sc := Client(x, ps["a"].cfg, "b"), Server(y, ps["b"].cfg)
	defer cc.Close()
	defer sc.Close()
	go cc.Write([]byte("hello"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(sc, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// A clean close reads as io.EOF; a cut stream as io.ErrUnexpectedEOF.
func TestCloseVersusTruncation(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	t.Run("close", func(t *testing.T) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		defer sc.Close()
		cc.Write([]byte("all of it"))
		cc.Close()
		got, err := io.ReadAll(sc)
		if err != nil || string(got) != "all of it" {
			t.Fatalf("got %q, %v; want clean EOF", got, err)
		}
	})
	t.Run("truncated", func(t *testing.T) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		defer sc.Close()
		cc.Write([]byte("partial"))
		cc.conn.Close() // TCP FIN without a close record, as an attacker could send
		got, err := io.ReadAll(sc)
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("got %q, %v; want io.ErrUnexpectedEOF", got, err)
		}
		if string(got) != "partial" {
			t.Fatalf("lost data before the cut: %q", got)
		}
	})
	t.Run("closewrite", func(t *testing.T) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		defer cc.Close()
		defer sc.Close()
		cc.Write([]byte("request"))
		if err := cc.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, err := cc.Write([]byte("x")); !errors.Is(err, ErrWriteClosed) {
			t.Fatalf("write after CloseWrite: %v", err)
		}
		got, err := io.ReadAll(sc)
		if err != nil || string(got) != "request" {
			t.Fatalf("got %q, %v", got, err)
		}
		sc.Write([]byte("response"))
		sc.Close()
		got, err = io.ReadAll(cc)
		if err != nil || string(got) != "response" {
			t.Fatalf("half-closed client read %q, %v", got, err)
		}
	})
}

func TestRekey(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	ps["a"].cfg.RekeyAfterBytes = 100_000
	ps["b"].cfg.RekeyAfter = time.Nanosecond // every write rekeys
	cc, sc := handshakePair(t, ps["a"], ps["b"])
	defer cc.Close()
	defer sc.Close()
	msg := make([]byte, 1_000_000)
	rand.Read(msg)
	var wg sync.WaitGroup
	wg.Add(2)
	var got1, got2 []byte
	go func() { defer wg.Done(); got1, _ = io.ReadAll(sc) }()
	go func() { defer wg.Done(); got2, _ = io.ReadAll(cc) }()
	for i := 0; i < 10; i++ {
		cc.Write(msg[i*100_000 : (i+1)*100_000])
		sc.Write(msg[i*100_000 : (i+1)*100_000])
	}
	keyBefore := cc.out.half.cs.UnsafeKey()
	cc.CloseWrite()
	sc.CloseWrite()
	wg.Wait()
	if !bytes.Equal(got1, msg) || !bytes.Equal(got2, msg) {
		t.Fatalf("data mismatch after rekeying: %d and %d bytes", len(got1), len(got2))
	}
	if cc.out.half.n < 10 || keyBefore == [32]byte{} {
		t.Fatal("no traffic")
	}
}

func TestRekeyChangesKey(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	ps["a"].cfg.RekeyAfterBytes = 1
	cc, sc := handshakePair(t, ps["a"], ps["b"])
	defer cc.Close()
	defer sc.Close()
	k0 := cc.out.half.cs.UnsafeKey()
	go io.Copy(io.Discard, sc)
	cc.Write([]byte("one"))
	k1 := cc.out.half.cs.UnsafeKey()
	cc.Write([]byte("two"))
	k2 := cc.out.half.cs.UnsafeKey()
	if k0 == k1 || k1 == k2 {
		t.Fatal("sender did not rekey")
	}
}

// After the handshake no connection keeps its handshake's DH function,
// which holds the ephemeral private key (and the pair's ss), nor an
// ephemeral key given to HandshakeInitiate or HandshakeRespond: a rekey then
// gives forward secrecy for what went before it. flynn/noise's CipherStates
// keep their cipher suite, so the transport's must not be Split's.
func TestConnKeepsNoHandshakeKeys(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	for _, p := range []Pattern{KK, XK} {
		ps["a"].cfg.Patterns, ps["b"].cfg.Patterns = []Pattern{p}, []Pattern{p}
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		a, b := tcpPair(t)
		responded := make(chan *Conn, 1)
		go func() {
			c, err := HandshakeRespond(context.Background(), b, ps["b"].cfg, mustKey(t), PublicKey{})
			if err != nil {
				t.Error(err)
			}
			responded <- c
		}()
		ic, err := HandshakeInitiate(context.Background(), a, ps["a"].cfg, mustKey(t), ps["b"].key.PublicKey())
		if err != nil {
			t.Fatal(err)
		}
		rc := <-responded
		if rc == nil {
			t.FailNow()
		}
		for _, c := range []*Conn{cc, sc, ic, rc} {
			if c.ephemeral != nil {
				t.Errorf("%v: a connection keeps the ephemeral key it was given", p)
			}
			for _, h := range []*halfState{c.out.half, c.in.half} {
				// CipherState.cs is the cipher suite, a struct whose first
				// field is the DHFunc.
				suite := reflect.ValueOf(h.cs).Elem().FieldByName("cs").Elem()
				if dh := suite.Field(0).Elem(); dh.Type() == reflect.TypeFor[*dhFunc]() {
					t.Errorf("%v: a connection keeps its handshake's DH function", p)
				}
			}
			c.Close()
		}
	}
}

func TestNetConnConformance(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "a", "b")
	nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		return cc, sc, func() { cc.Close(); sc.Close() }, nil
	})
}

func TestWriteTimeoutResumes(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	cc, sc := handshakePair(t, ps["a"], ps["b"])
	defer cc.Close()
	defer sc.Close()
	// Fill the socket buffers until a write times out mid-frame.
	msg := make([]byte, 1<<20)
	rand.Read(msg)
	cc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	var sent []byte
	for {
		n, err := cc.Write(msg)
		sent = append(sent, msg[:n]...)
		if err != nil {
			if !isTimeout(err) {
				t.Fatal(err)
			}
			break
		}
	}
	if cc.out.pending == nil {
		t.Log("timeout fell on a frame boundary; resumption not exercised this run")
	}
	cc.SetWriteDeadline(time.Time{})
	go func() {
		cc.Write([]byte("tail"))
		cc.Close()
	}()
	got, err := io.ReadAll(sc)
	if err != nil {
		t.Fatal(err)
	}
	want := append(sent, "tail"...)
	if !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d", len(got), len(want))
	}
}

func TestConcurrentReadWriteClose(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "a", "b")
	cc, sc := handshakePair(t, ps["a"], ps["b"])
	go io.Copy(sc, sc) // echo
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(2)
		go func() { defer wg.Done(); cc.Write(make([]byte, 100_000)) }()
		go func() { defer wg.Done(); io.CopyN(io.Discard, cc, 50_000) }()
	}
	time.Sleep(50 * time.Millisecond)
	cc.Close()
	wg.Wait()
	sc.Close()
	if _, err := cc.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
}

func TestHandshakeContextCancel(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	x, y := tcpPair(t)
	defer y.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := Client(x, ps["a"].cfg, "b").HandshakeContext(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("context was not honoured")
	}
}

// The seed API's explicit-ephemeral entry points give byte-identical
// transcripts for the same keys, ephemerals and randomness.
func TestHandshakeInitiateRespondDeterministic(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	transcript := func() []byte {
		var rec bytes.Buffer
		x, y := tcpPair(t)
		defer x.Close()
		defer y.Close()
		ea, _ := NewPrivateKey(X25519, bytes.Repeat([]byte{7}, 32))
		eb, _ := NewPrivateKey(X25519, bytes.Repeat([]byte{9}, 32))
		at := func() time.Time { return time.Unix(1800000000, 0) }                         // the hint's window
		ca, cb := ps["a"].cfg.Clone(), ps["b"].cfg.Clone()                                 // b's replay cache would refuse the second run
		ca.Random, ca.Time, cb.Time = bytes.NewReader(bytes.Repeat([]byte{1}, 64)), at, at // preamble salt
		done := make(chan error, 1)
		go func() {
			_, err := HandshakeRespond(context.Background(), &recordingConn{Conn: y, w: &syncWriter{b: &rec}}, cb, eb, ps["a"].key.PublicKey())
			done <- err
		}()
		c, err := HandshakeInitiate(context.Background(), &recordingConn{Conn: x, w: &syncWriter{b: &rec}}, ca, ea, ps["b"].key.PublicKey())
		if err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if c.ConnectionState().Peer.Name != "b" {
			t.Fatal("wrong peer")
		}
		return rec.Bytes()
	}
	one, two := transcript(), transcript()
	if len(one) == 0 || !bytes.Equal(one, two) {
		t.Fatalf("transcripts differ:\n%x\n%x", one, two)
	}
	ps["a"].cfg.Random = nil
}

type syncWriter struct {
	mu sync.Mutex
	b  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// A Write cut short by its deadline leaves the stream incomplete: neither
// CloseWrite nor Close may then send a close record, which would tell the
// peer it has all the data, until a later Write has completed.
func TestNoCloseRecordAfterCutWrite(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	// cutWrite fills the socket buffers (the peer is not reading yet) until a
	// Write times out before taking all its bytes; it returns what the
	// Writes took and what the cut one left.
	cutWrite := func(t *testing.T, cc *Conn) (sent, rest []byte) {
		msg := make([]byte, 4<<20)
		rand.Read(msg)
		cc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		for {
			n, err := cc.Write(msg)
			sent = append(sent, msg[:n]...)
			if err != nil {
				if !isTimeout(err) {
					t.Fatal(err)
				}
				cc.SetWriteDeadline(time.Time{})
				return sent, msg[n:]
			}
		}
	}
	readAll := func(c *Conn) <-chan error {
		done := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, c)
			done <- err
		}()
		return done
	}
	t.Run("closewrite", func(t *testing.T) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		defer sc.Close()
		cutWrite(t, cc)
		read := readAll(sc)
		if err := cc.CloseWrite(); !errors.Is(err, ErrWriteCut) {
			t.Fatalf("CloseWrite after a cut Write: %v, want ErrWriteCut", err)
		}
		if err := cc.Close(); !errors.Is(err, ErrWriteCut) {
			t.Fatalf("Close after a cut Write: %v, want ErrWriteCut", err)
		}
		if err := <-read; !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("peer read %v, want io.ErrUnexpectedEOF", err)
		}
	})
	t.Run("close", func(t *testing.T) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		defer sc.Close()
		cutWrite(t, cc)
		read := readAll(sc)
		cc.Close()
		if err := <-read; !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("peer read %v, want io.ErrUnexpectedEOF", err)
		}
	})
	t.Run("resumed", func(t *testing.T) {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		defer sc.Close()
		sent, rest := cutWrite(t, cc)
		done := make(chan []byte, 1)
		go func() {
			got, err := io.ReadAll(sc)
			if err != nil {
				t.Error(err)
			}
			done <- got
		}()
		if _, err := cc.Write(rest); err != nil {
			t.Fatal(err)
		}
		if err := cc.Close(); err != nil {
			t.Fatalf("Close after the rest was written: %v", err)
		}
		if got := <-done; !bytes.Equal(got, append(sent, rest...)) {
			t.Fatalf("peer got %d bytes, want %d", len(got), len(sent)+len(rest))
		}
	})
}

// choppyConn returns at most a few bytes per Read, a different number each
// time, so that frames arrive split everywhere.
type choppyConn struct {
	net.Conn
	sizes []int
	i     int
}

func (c *choppyConn) Read(b []byte) (int, error) {
	c.i++
	return c.Conn.Read(b[:min(len(b), c.sizes[c.i%len(c.sizes)])])
}

// Records of every size cross the receive buffer's shapes (the inline small
// buffer, the pooled big one, and the moves between them) intact, however
// the stream is split, and with Reads of every size.
func TestReadBufferShapes(t *testing.T) {
	ps := newTestPeers(t, "a", "b")
	sizes := []int{1, 2, 3, smallRead - 20, smallRead - 19, smallRead, 5000, maxPayload, maxPayload + 1, 3*maxPayload + 7, 300_000}
	var msgs [][]byte
	var want []byte
	for range 3 {
		for _, n := range sizes {
			msg := make([]byte, n)
			rand.Read(msg)
			msgs = append(msgs, msg)
			want = append(want, msg...)
		}
	}
	readSizes := []int{1, 7, smallRead, 4096, maxPayload + 5, 1 << 20}
	for _, split := range [][]int{{1 << 20}, {1, 2, 3, 5, 7, 11, 13}, {smallRead, 1, maxFrame + 3, 17, 100_000}} {
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		sc.conn = &choppyConn{Conn: sc.conn, sizes: split}
		go func() {
			for _, msg := range msgs {
				cc.Write(msg)
			}
			cc.Close()
		}()
		var got []byte
		for i := 0; ; i++ {
			buf := make([]byte, readSizes[i%len(readSizes)])
			n, err := sc.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("split %v: %v", split, err)
			}
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("split %v: got %d bytes, want %d, or they differ", split, len(got), len(want))
		}
		if sc.in.big != nil {
			t.Errorf("split %v: the big buffer is held after the end of the stream", split)
		}
		sc.Close()
	}
}

// A small record costs no allocation in steady state, at either end, for
// both cipher suites (BenchmarkRoundTrip reports the same with -benchmem).
func TestSmallRecordsDoNotAllocate(t *testing.T) {
	if raceEnabled() {
		t.Skip("the race detector's sync.Pool drops Puts")
	}
	for _, suite := range []CipherSuite{ChaChaPoly, AESGCM} {
		ps := newTestPeers(t, "a", "b")
		ps["a"].cfg.CipherSuites = []CipherSuite{suite}
		ps["b"].cfg.CipherSuites = []CipherSuite{suite}
		cc, sc := handshakePair(t, ps["a"], ps["b"])
		req, rep, buf := make([]byte, 256), make([]byte, 256), make([]byte, 256)
		roundTrip := func() {
			if _, err := cc.Write(req); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(sc, buf); err != nil {
				t.Fatal(err)
			}
			if _, err := sc.Write(buf); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(cc, rep); err != nil {
				t.Fatal(err)
			}
		}
		if n := testing.AllocsPerRun(200, roundTrip); n != 0 {
			t.Errorf("%v: %.1f allocations per 256-byte request and reply", suite, n)
		}
		cc.Close()
		sc.Close()
	}
}
