package noisetor

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// serveOne runs a server handshake on the next connection to a fresh TCP
// listener and returns the listener's address and the handshake's error.
func serveOne(t *testing.T, cfg *Config) (addr string, result <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan error, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			ch <- err
			return
		}
		c := Server(raw, cfg)
		err = c.Handshake()
		if err == nil {
			// A session was established: read one byte so that the test sees
			// the outcome of the confirm, then report success.
			c.Close()
		}
		ch <- err
	}()
	return ln.Addr().String(), ch
}

func rawDial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestBadUnknownInitiator(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	stranger := newTestPeers(t, "stranger")["stranger"]
	// The stranger knows the server's key, but the server does not know it.
	srvKey := ps["server"].key.PublicKey()
	stranger.cfg.Keyring.Add(Peer{Name: "server", PublicKey: srvKey})
	addr, res := serveOne(t, ps["server"].cfg)
	_, err := (&Dialer{Config: stranger.cfg, Peer: "server"}).Dial("tcp", addr)
	if err == nil {
		t.Fatal("stranger got a session")
	}
	serr := <-res
	if !errors.Is(serr, ErrUnknownPeer) {
		t.Fatalf("server error %v, want ErrUnknownPeer", serr)
	}
	mustContain(t, serr.Error(), "matches no keyring peer", srvKey.Fingerprint())
	mustContain(t, ps["server"].logs.String(), "outcome=failed", "direction=in", "matches no keyring peer")
}

func TestBadWrongResponderKey(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	other, _ := GenerateKey(X25519, nil)
	// The client holds a stale key for the server.
	kr, _ := NewKeyring(Peer{Name: "server", PublicKey: other.PublicKey()})
	ps["client"].cfg.Keyring = kr
	for _, pattern := range []Pattern{KK, XK} {
		ps["client"].cfg.Patterns = []Pattern{pattern}
		ps["server"].cfg.Patterns = []Pattern{pattern}
		addr, res := serveOne(t, ps["server"].cfg)
		if _, err := (&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", addr); err == nil {
			t.Fatal("handshake with the wrong responder key succeeded")
		}
		if serr := <-res; !errors.Is(serr, ErrUnknownPeer) {
			t.Fatalf("%v: server error %v, want ErrUnknownPeer", pattern, serr)
		}
	}
}

func TestBadXKInitiatorNotInKeyring(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	stranger := newTestPeers(t, "stranger")["stranger"]
	stranger.cfg.Keyring.Add(Peer{Name: "server", PublicKey: ps["server"].key.PublicKey()})
	stranger.cfg.Patterns = []Pattern{XK}
	ps["server"].cfg.Patterns = []Pattern{XK}
	addr, res := serveOne(t, ps["server"].cfg)
	(&Dialer{Config: stranger.cfg, Peer: "server"}).Dial("tcp", addr)
	serr := <-res
	if !errors.Is(serr, ErrUnknownPeer) {
		t.Fatalf("server error %v, want ErrUnknownPeer", serr)
	}
	// The operator sees the caller's key and can add it if it is legitimate.
	mustContain(t, serr.Error(), stranger.key.PublicKey().String(), stranger.key.PublicKey().Fingerprint())
}

func TestBadVersionMismatch(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	addr, res := serveOne(t, ps["server"].cfg)
	pre := (&preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}).marshal()
	pre[4] = 1
	rawDial(t, addr).Write(pre[:40]) // a version 1 preamble is 40 bytes
	serr := <-res
	if !errors.Is(serr, ErrVersion) {
		t.Fatalf("got %v, want ErrVersion", serr)
	}
	mustContain(t, serr.Error(), "wire version 1")
}

func TestBadPatternNotAccepted(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	ps["client"].cfg.Patterns = []Pattern{XK}
	addr, res := serveOne(t, ps["server"].cfg) // accepts only KK
	(&Dialer{Config: ps["client"].cfg, Peer: "server"}).Dial("tcp", addr)
	if serr := <-res; !errors.Is(serr, ErrVersion) {
		t.Fatalf("got %v, want ErrVersion", serr)
	}
}

func TestBadGarbage(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	addr, res := serveOne(t, ps["server"].cfg)
	junk := make([]byte, 200)
	rand.Read(junk)
	rawDial(t, addr).Write(junk)
	serr := <-res
	if !errors.Is(serr, ErrVersion) {
		t.Fatalf("got %v, want ErrVersion (bad magic)", serr)
	}
	mustContain(t, serr.Error(), "bad magic")
}

// A handshake message of another length than its pattern's (here a KK
// message 1 with a payload, from a keyring member) is refused at once, before
// the responder writes anything.
func TestBadHandshakeMessageLength(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	addr, res := serveOne(t, ps["server"].cfg)
	server := ps["server"].key.PublicKey()
	pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
	rand.Read(pre.salt[:])
	k, err := ps["client"].cfg.keys().secrets(server)
	if err != nil {
		t.Fatal(err)
	}
	raw := pre.sealKK(k.toPeer, time.Now())
	hs, err := newHandshakeState(handshakeParams{initiator: true, pattern: KK, cipher: ChaChaPoly,
		static: ps["client"].key, remoteStatic: server, prologue: prologue(raw), random: rand.Reader})
	if err != nil {
		t.Fatal(err)
	}
	msg1, _, _, err := hs.WriteMessage(nil, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	c := rawDial(t, addr)
	c.Write(appendMessage(raw, msg1))
	serr := <-res
	if !errors.Is(serr, ErrHandshake) {
		t.Fatalf("got %v, want ErrHandshake", serr)
	}
	mustContain(t, serr.Error(), "message 1", "49-byte message where one of 48 bytes is due")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("the responder answered a malformed message 1: %d bytes, %v", n, err)
	}
}

// recordClientFlight dials addr as a real client and returns the bytes it
// sent before message 2 arrived: preamble and message 1.
func recordClientFlight(t *testing.T, cfg *Config, addr string) []byte {
	t.Helper()
	var rec bytes.Buffer
	raw := rawDial(t, addr)
	c := Client(&recordingConn{Conn: raw, w: &rec}, cfg, "server")
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	return rec.Bytes()[:preambleLen+frameHeader+48]
}

type recordingConn struct {
	net.Conn
	w io.Writer
}

func (r *recordingConn) Write(b []byte) (int, error) {
	r.w.Write(b)
	return r.Conn.Write(b)
}

func TestBadReplayedMessage1(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	ps["server"].cfg.HandshakeTimeout = time.Second
	l, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	flight := recordClientFlight(t, ps["client"].cfg, l.Addr().String())
	(<-accepted).Close() // the real one
	for i := 0; i < 3; i++ {
		rawDial(t, l.Addr().String()).Write(flight)
	}
	time.Sleep(200 * time.Millisecond)
	mustContain(t, ps["server"].logs.String(), "replayed preamble")

	// A listener that never saw the original (another Config: listeners of
	// one Config share their replay cache) does the DH, but the replayer
	// cannot confirm, so still no session.
	l2, err := Listen("tcp", "127.0.0.1:0", ps["server"].cfg.Clone())
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	go func() {
		if c, err := l2.Accept(); err == nil {
			accepted <- c
		}
	}()
	rc := rawDial(t, l2.Addr().String())
	rc.Write(flight)
	io.Copy(io.Discard, rc) // message 2 arrives; then the server gives up
	select {
	case <-accepted:
		t.Fatal("a replayed message 1 produced a session")
	case <-time.After(1500 * time.Millisecond):
	}
	mustContain(t, ps["server"].logs.String(), "confirm record")
}

func TestBadStallMidHandshake(t *testing.T) {
	ps := newTestPeers(t, "server", "client")
	ps["server"].cfg.HandshakeTimeout = 300 * time.Millisecond
	addr, res := serveOne(t, ps["server"].cfg)
	pre := (&preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}).marshal()
	rawDial(t, addr).Write(pre[:20]) // half a preamble, then silence
	start := time.Now()
	serr := <-res
	if !isTimeout(serr) {
		t.Fatalf("got %v, want a timeout", serr)
	}
	mustContain(t, serr.Error(), "timed out waiting for preamble")
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("stalled handshake held for %v", d)
	}
}

// rawSession returns an established client Conn and the server's raw socket
// with the server-side Conn, so a test can write arbitrary bytes as the peer.
func rawSession(t *testing.T) (client *Conn, server *Conn) {
	ps := newTestPeers(t, "a", "b")
	client, server = handshakePair(t, ps["a"], ps["b"])
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestBadTruncatedFrame(t *testing.T) {
	cc, sc := rawSession(t)
	var hdr [2]byte
	binary.BigEndian.PutUint16(hdr[:], 100)
	sc.conn.Write(hdr[:])
	sc.conn.Write(make([]byte, 40)) // 40 of the promised 100
	sc.conn.Close()
	_, err := cc.Read(make([]byte, 10))
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestBadPeerClosesMidFrame(t *testing.T) {
	cc, sc := rawSession(t)
	// A genuine frame, cut short.
	frame := sc.out.half.seal(nil, recordData, []byte("the whole payment request"))
	sc.conn.Write(frame[:len(frame)-5])
	sc.conn.Close()
	_, err := cc.Read(make([]byte, 100))
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestBadShortFrame(t *testing.T) {
	cc, sc := rawSession(t)
	sc.conn.Write([]byte{0, 5, 1, 2, 3, 4, 5})
	_, err := cc.Read(make([]byte, 10))
	if !errors.Is(err, ErrFrame) {
		t.Fatalf("got %v, want ErrFrame", err)
	}
}

func TestBadOversizedGarbageFrame(t *testing.T) {
	cc, sc := rawSession(t)
	junk := make([]byte, 2+maxMessage)
	binary.BigEndian.PutUint16(junk, maxMessage)
	rand.Read(junk[2:])
	go sc.conn.Write(junk)
	_, err := cc.Read(make([]byte, 10))
	if !errors.Is(err, ErrFrame) {
		t.Fatalf("got %v, want ErrFrame", err)
	}
	// The error is final: the connection does not resynchronise on garbage.
	if _, err2 := cc.Read(make([]byte, 10)); !errors.Is(err2, ErrFrame) {
		t.Fatalf("second read: %v", err2)
	}
}

// A large write is split into frames no larger than the Noise limit.
func TestLargeWriteIsSplit(t *testing.T) {
	cc, sc := rawSession(t)
	msg := make([]byte, 300_000)
	go func() { cc.Write(msg); cc.Close() }()
	frames, total := 0, 0
	for {
		var hdr [2]byte
		if _, err := io.ReadFull(sc.conn, hdr[:]); err != nil {
			break
		}
		n := int(binary.BigEndian.Uint16(hdr[:]))
		if n > maxMessage {
			t.Fatalf("frame of %d bytes", n)
		}
		io.CopyN(io.Discard, sc.conn, int64(n))
		frames++
		total += n
	}
	if frames < 5 || total < len(msg) {
		t.Fatalf("%d frames, %d bytes", frames, total)
	}
}

func TestBadConfig(t *testing.T) {
	x, y := tcpPair(t)
	defer y.Close()
	err := Client(x, &Config{}, "b").HandshakeContext(context.Background())
	if err == nil {
		t.Fatal("empty config accepted")
	}
	mustContain(t, err.Error(), "noisetor: Config.StaticKey is not set")
	ps := newTestPeers(t, "a")
	if _, err := Dial("tcp", "127.0.0.1:1", ps["a"].cfg); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("dial to an address no peer has: %v", err)
	}
}

// After a frame fails to authenticate, Close sends no close record: the peer
// sees a truncation, never a clean end of stream.
func TestBadFrameThenCloseIsNotClean(t *testing.T) {
	cc, sc := rawSession(t)
	junk := make([]byte, 2+40)
	binary.BigEndian.PutUint16(junk, 40)
	sc.conn.Write(junk)
	if _, err := cc.Read(make([]byte, 10)); !errors.Is(err, ErrFrame) {
		t.Fatalf("got %v, want ErrFrame", err)
	}
	cc.Close()
	if _, err := io.ReadAll(sc); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("peer of a connection that saw tampering read %v, want io.ErrUnexpectedEOF", err)
	}
}
