package noisetor

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/flynn/noise"
)

// scriptConn is a net.Conn that reads a fixed byte string and discards
// writes: a harness that feeds fuzz input to the parsers, not a network.
type scriptConn struct {
	r *bytes.Reader
}

func newScriptConn(b []byte) *scriptConn          { return &scriptConn{r: bytes.NewReader(b)} }
func (s *scriptConn) Read(b []byte) (int, error)  { return s.r.Read(b) }
func (s *scriptConn) Write(b []byte) (int, error) { return len(b), nil }
func (s *scriptConn) Close() error                { return nil }
func (s *scriptConn) LocalAddr() net.Addr         { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
func (s *scriptConn) RemoteAddr() net.Addr        { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
func (s *scriptConn) SetDeadline(time.Time) error { return nil }
func (s *scriptConn) SetReadDeadline(time.Time) error {
	return nil
}
func (s *scriptConn) SetWriteDeadline(time.Time) error { return nil }

func FuzzPreamble(f *testing.F) {
	ps := newTestPeers(f, "server", "client")
	srv, cli := ps["server"], ps["client"]
	now := time.Now()
	k, err := cli.cfg.keys().toPeer(srv.key.PublicKey())
	if err != nil {
		f.Fatal(err)
	}
	kk := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
	f.Add(kk.sealKK(k, now))
	xk := preamble{pattern: XK, curve: X25519, cipher: ChaChaPoly}
	f.Add(xk.sealXK(srv.key.PublicKey()))
	f.Add([]byte("NTOR"))
	f.Add(make([]byte, preambleLen))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parsePreamble(b)
		if err != nil {
			return
		}
		if !bytes.Equal(p.marshal(), b) {
			t.Fatalf("parse/marshal is not the identity: %x", b)
		}
		if p.pattern == KK {
			srv.cfg.keys().findKK(srv.cfg.Keyring, p, b, now)
		}
	})
}

// fixedSession returns a server Conn whose receive state uses a fixed key,
// reading from input, and a sealer for the matching send side.
func fixedSession(input []byte) (*Conn, *halfState) {
	suite := noise.NewCipherSuite(&dhFunc{curve: X25519}, noise.CipherChaChaPoly, noise.HashSHA256)
	key := [32]byte{1, 2, 3}
	c := Server(newScriptConn(input), &Config{})
	c.in.half = newHalfState(noise.UnsafeNewCipherState(suite, key, 0))
	c.handshakeDone.Store(true)
	return c, newHalfState(noise.UnsafeNewCipherState(suite, key, 0))
}

func FuzzFrameReader(f *testing.F) {
	_, seal := fixedSession(nil)
	var good []byte
	good = seal.seal(good, recordData, []byte("hello"))
	good = seal.seal(good, recordRekey, nil)
	seal.rekey()
	good = seal.seal(good, recordData, bytes.Repeat([]byte("y"), 300))
	good = seal.seal(good, recordClose, nil)
	f.Add(good)
	f.Add(good[:len(good)-3])
	f.Add([]byte{0xff, 0xff, 0})
	f.Add([]byte{0, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, _ := fixedSession(b)
		var got []byte
		buf := make([]byte, 1000)
		var err error
		for i := 0; i < 1000 && err == nil; i++ {
			var n int
			n, err = c.Read(buf)
			got = append(got, buf[:n]...)
		}
		if err == nil {
			t.Fatal("reader never stopped")
		}
		// Whatever was delivered must be a prefix of what the genuine
		// sealer wrote: only authentic frames produce plaintext.
		want := append([]byte("hello"), bytes.Repeat([]byte("y"), 300)...)
		if !bytes.HasPrefix(want, got) {
			t.Fatalf("delivered %q, not authentic", got)
		}
		if err == io.EOF && !bytes.Equal(got, want) {
			t.Fatalf("clean EOF after %q", got)
		}
	})
}

// FuzzHandshakeMessages feeds arbitrary bytes to a responder after a genuine
// preamble (as message 1 and onwards) and to an initiator (as message 2).
// Neither may panic or complete.
func FuzzHandshakeMessages(f *testing.F) {
	ps := newTestPeers(f, "server", "client")
	// A genuine flight as a seed.
	var rec bytes.Buffer
	cc := Client(&recordingConn{Conn: newScriptConn(nil), w: &rec}, ps["client"].cfg, "server")
	cc.Handshake() // fails at message 2; the first flight is recorded
	flight := rec.Bytes()
	f.Add(flight[preambleLen:], byte(0))
	f.Add(flight[preambleLen:], byte(1))
	f.Add([]byte{0, 48}, byte(0))
	f.Fuzz(func(t *testing.T, msgs []byte, side byte) {
		if side%2 == 0 {
			in := append(append([]byte(nil), flight[:preambleLen]...), msgs...)
			if err := Server(newScriptConn(in), ps["server"].cfg).Handshake(); err == nil {
				t.Fatal("responder completed a handshake from fuzz input")
			}
			return
		}
		err := Client(newScriptConn(msgs), ps["client"].cfg, "server").Handshake()
		if err == nil {
			t.Fatal("initiator completed a handshake from fuzz input")
		}
		if errors.Is(err, ErrFrame) {
			t.Fatalf("unexpected error class: %v", err)
		}
	})
}
