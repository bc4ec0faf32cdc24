package noisetor

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
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
	s, err := cli.cfg.keys().secrets(srv.key.PublicKey())
	if err != nil {
		f.Fatal(err)
	}
	kk := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
	f.Add(kk.sealKK(s.toPeer, now))
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
	key := [32]byte{1, 2, 3}
	c := Server(newScriptConn(input), &Config{})
	c.in.half = newHalfState(ChaChaPoly, key, 0)
	c.handshakeDone.Store(true)
	return c, newHalfState(ChaChaPoly, key, 0)
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

// secretShaped reports whether s looks like a secret that an operator could
// paste into the wrong place: at least 20 characters of the base64url
// alphabet with upper and lower case letters and digits (a private key, an
// onion or client-auth key, a long PIN). No English error text has such a run.
func secretShaped(s string) bool {
	if len(s) < 20 {
		return false
	}
	var up, low, dig bool
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case 'A' <= c && c <= 'Z':
			up = true
		case 'a' <= c && c <= 'z':
			low = true
		case '0' <= c && c <= '9':
			dig = true
		case c == '-' || c == '_':
		default:
			return false
		}
	}
	return up && low && dig
}

// FuzzErrorsDoNotEchoSecrets puts a secret-shaped string into every field
// of every key and keyring parser and checks that no error quotes it, in
// any letter case, whole or its first 20 characters (WIRE.md §11.2.4: errors
// quote only values that passed validation).
func FuzzErrorsDoNotEchoSecrets(f *testing.F) {
	for _, s := range []string{
		"pOCSkrZRwni5dyxWn1-puxPZBrRqtoyd-dwrRAn4ogk",
		"CO7E72XK6ICMP7JTLD6JYADSDCA5C5BHQEUCE7WGOTZX677JPNWQ",
		"Xf7dO2vUf2-ijuFdlp1bsOpTd01Ii9r53xxuASSz7yI",
		"abcdEFGH0123ijklMNOP4567",
	} {
		f.Add(s)
	}
	bob := mustParseKey(f, keyBob)
	f.Fuzz(func(t *testing.T, s string) {
		if !secretShaped(s) {
			return
		}
		check := func(what string, err error) {
			t.Helper()
			if err == nil {
				return
			}
			msg := strings.ToLower(err.Error())
			for _, part := range []string{s, s[:20]} {
				if secretShaped(part) && strings.Contains(msg, strings.ToLower(part)) {
					t.Fatalf("%s: error quotes the secret-shaped input %q: %v", what, s, err)
				}
			}
		}
		for _, in := range []string{s, s + ":" + s, "x25519:" + s, "p256:" + s, ":" + s, s + ":",
			"NOISETOR-PRIVATE-KEY-X25519:" + s, " " + s} {
			_, err := ParsePublicKey(in)
			check("ParsePublicKey", err)
			var k PublicKey
			check("UnmarshalText", k.UnmarshalText([]byte(in)))
		}
		for _, in := range []string{s, "x25519:" + s, "NOISETOR-PRIVATE-KEY-" + s + ":" + s,
			"NOISETOR-PRIVATE-KEY-X25519:" + s, "NOISETOR-PRIVATE-KEY-P256:" + s, "NOISETOR-PRIVATE-KEY-" + s} {
			_, err := ParsePrivateKey([]byte(in))
			check("ParsePrivateKey", err)
		}
		lower := strings.ToLower(s)
		for _, line := range []string{
			s + " " + keyBob, "bob " + s, "bob " + s + ":" + s, "bob x25519:" + s, "bob p256:" + s,
			"bob " + keyBob + " " + s, "bob " + keyBob + " " + s + "=1", "bob " + keyBob + " " + lower + "=1",
			"bob " + keyBob + " foo=" + s, "bob " + keyBob + " addr=" + s, "bob " + keyBob + " addr=" + s + ":80",
			"bob " + keyBob + " addr=" + lower + ":80", "bob " + keyBob + " addr=" + lower + ".onion:80",
			"bob " + keyBob + " addr=a:" + s, "bob " + keyBob + " addr=[" + s + "]:80",
			"bob " + keyBob + " auth=" + s, "bob " + keyBob + " auth=descriptor:x25519:" + s,
			"bob " + keyBob + " auth=" + s + ":descriptor:x25519:" + s, "bob " + keyBob + " auth=" + s + ":" + s,
		} {
			_, err := ParseKeyring(strings.NewReader(line + "\n"))
			check("ParseKeyring "+line, err)
		}
		for _, p := range []Peer{
			{Name: s, PublicKey: bob}, {Name: lower, PublicKey: bob},
			{Name: "bob", PublicKey: bob, Address: s}, {Name: "bob", PublicKey: bob, Address: s + ":1"},
			{Name: "bob", PublicKey: bob, Address: lower + ":1"}, {Name: "bob", PublicKey: bob, ClientAuth: s},
		} {
			_, err := NewKeyring(p)
			check("NewKeyring", err)
		}
	})
}
