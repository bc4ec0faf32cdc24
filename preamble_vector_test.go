package noisetor

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The preamble vectors of WIRE.md §3: responder static scalar 32 × 0x01,
// initiator 32 × 0x02, x25519, ChaChaPoly, salt 00 01 … 0f, sent at Unix time
// 1800000000 (window 3000000).
const (
	vectorTime = 1800000000

	preambleVectorSS      = "2ed76ab549b1e73c031eb49c9448f0798aea81b698279a0c3dc3e49fbfc4b953"
	preambleVectorPairKey = "8fcd2cd59cff0fe477284bef0f7cf47c4be06fdafdfc2b7148994851cdd77f26"
	preambleVectorHint    = "0eb8524f933a85fa"
	preambleVectorKK      = "4e544f5202010101000102030405060708090a0b0c0d0e0f0eb8524f933a85fa7a342a9ad30a40fd831006d473135a57"
	preambleVectorXK      = "4e544f5202020101000102030405060708090a0b0c0d0e0f000000000000000093a98f8c9bc502289407a071eb450b2f"
)

// TestPreambleSpec recomputes the v2 preambles from the text of WIRE.md §3
// with the standard library alone, and checks them against both the vectors
// printed there and the implementation.
func TestPreambleSpec(t *testing.T) {
	respScalar, initScalar := bytes.Repeat([]byte{0x01}, 32), bytes.Repeat([]byte{0x02}, 32)
	respECDH, _ := ecdh.X25519().NewPrivateKey(respScalar)
	initECDH, _ := ecdh.X25519().NewPrivateKey(initScalar)
	rs, s := respECDH.PublicKey().Bytes(), initECDH.PublicKey().Bytes()
	salt := make([]byte, 16)
	for i := range salt {
		salt[i] = byte(i)
	}

	// The spec, word for word.
	ss, _ := initECDH.ECDH(respECDH.PublicKey())
	k, _ := hkdf.Key(sha256.New, ss, []byte("noisetor pair v2"), "noisetor preamble key v2\x00"+string(s)+string(rs), 32)
	window := uint64(vectorTime / 600)
	mac := func(key []byte, parts ...[]byte) []byte {
		m := hmac.New(sha256.New, key)
		for _, p := range parts {
			m.Write(p)
		}
		return m.Sum(nil)
	}
	hint := mac(k, []byte("hint"), binary.BigEndian.AppendUint64(nil, window))[:8]
	head := append([]byte{'N', 'T', 'O', 'R', 2, 1, 1, 1}, salt...)
	head = append(head, hint...)
	kk := append(head, mac(k, []byte("tag"), head)[:16]...)
	xkKey := sha256.Sum256(append([]byte("noisetor preamble v2 xk\x00"), rs...))
	xkHead := append(append([]byte{'N', 'T', 'O', 'R', 2, 2, 1, 1}, salt...), make([]byte, 8)...)
	xk := append(xkHead, mac(xkKey[:], xkHead)[:16]...)

	for _, c := range []struct{ name, got, want string }{
		{"ss", hex.EncodeToString(ss), preambleVectorSS},
		{"pair key", hex.EncodeToString(k), preambleVectorPairKey},
		{"hint", hex.EncodeToString(hint), preambleVectorHint},
		{"KK preamble", hex.EncodeToString(kk), preambleVectorKK},
		{"XK preamble", hex.EncodeToString(xk), preambleVectorXK},
	} {
		if c.got != c.want {
			t.Errorf("%s from the spec text: %s, WIRE.md §3 says %s", c.name, c.got, c.want)
		}
	}

	// The implementation.
	resp, _ := NewPrivateKey(X25519, respScalar)
	init, _ := NewPrivateKey(X25519, initScalar)
	sec, err := (&Config{StaticKey: init}).keys().secrets(resp.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(sec.ss); got != preambleVectorSS {
		t.Errorf("the kept ss: %s, WIRE.md §3 says %s", got, preambleVectorSS)
	}
	pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly, salt: [16]byte(salt)}
	if got := pre.sealKK(sec.toPeer, time.Unix(vectorTime, 0)); !bytes.Equal(got, kk) {
		t.Errorf("sealKK:\n got %x\nwant %x", got, kk)
	}
	pre = preamble{pattern: XK, curve: X25519, cipher: ChaChaPoly, salt: [16]byte(salt)}
	if got := pre.sealXK(resp.PublicKey()); !bytes.Equal(got, xk) {
		t.Errorf("sealXK:\n got %x\nwant %x", got, xk)
	}

	// The responder finds the initiator from the hint, one window either side.
	ring, _ := NewKeyring(Peer{Name: "initiator", PublicKey: init.PublicKey()})
	respCfg := &Config{StaticKey: resp, Keyring: ring}
	parsed, err := parsePreamble(kk)
	if err != nil {
		t.Fatal(err)
	}
	for _, skew := range []time.Duration{0, -preambleWindow, preambleWindow, 2 * preambleWindow, -2 * preambleWindow} {
		p, secrets, _, err := respCfg.keys().findKK(ring, parsed, kk, time.Unix(vectorTime, 0).Add(skew))
		want := skew.Abs() <= preambleWindow
		if err != nil || (secrets != nil) != want || (want && p.Name != "initiator") {
			t.Errorf("responder clock %v off: found %q %v (%v), want found=%v", skew, p.Name, secrets != nil, err, want)
		}
	}
}

// TestTranscriptVectors checks whole connections byte for byte against
// testdata/vectors/transcript-*.txt: fixed static keys, ephemeral keys and
// salt; the preamble and handshake, the confirm record, "ping" one way and
// "pong" the other, and both close records. WIRE.md §9 describes the files.
// NOISETOR_UPDATE_VECTORS=1 rewrites them (only for a deliberate change of
// the wire format, which needs a new version).
func TestTranscriptVectors(t *testing.T) {
	key := func(b byte) *PrivateKey {
		k, err := NewPrivateKey(X25519, bytes.Repeat([]byte{b}, 32))
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	respStatic, initStatic, initEph, respEph := key(1), key(2), key(3), key(4)
	for _, pattern := range []Pattern{KK, XK} {
		t.Run(pattern.String(), func(t *testing.T) {
			salt := make([]byte, preambleSalt)
			for i := range salt {
				salt[i] = byte(i)
			}
			initRing, _ := NewKeyring(Peer{Name: "responder", PublicKey: respStatic.PublicKey()})
			respRing, _ := NewKeyring(Peer{Name: "initiator", PublicKey: initStatic.PublicKey()})
			at := func() time.Time { return time.Unix(vectorTime, 0) }
			initCfg := &Config{StaticKey: initStatic, Keyring: initRing, Patterns: []Pattern{pattern}, Random: bytes.NewReader(salt), Time: at, Logger: discardLogger()}
			respCfg := &Config{StaticKey: respStatic, Keyring: respRing, Patterns: []Pattern{pattern}, Time: at, Logger: discardLogger()}
			x, y := tcpPair(t)
			var c2s, s2c bytes.Buffer
			done := make(chan []byte, 1)
			go func() {
				s, err := HandshakeRespond(context.Background(), &recordingConn{Conn: y, w: &s2c}, respCfg, respEph, PublicKey{})
				if err != nil {
					t.Error(err)
					done <- nil
					return
				}
				got, _ := io.ReadAll(s)
				s.Write([]byte("pong"))
				s.Close()
				done <- got
			}()
			c, err := HandshakeInitiate(context.Background(), &recordingConn{Conn: x, w: &c2s}, initCfg, initEph, respStatic.PublicKey())
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte("ping"))
			c.CloseWrite()
			reply, _ := io.ReadAll(c)
			c.Close()
			if got := <-done; string(got) != "ping" || string(reply) != "pong" {
				t.Fatalf("exchange: %q / %q", got, reply)
			}
			text := fmt.Sprintf("# noisetor wire v2 transcript, %s: see WIRE.md §9\n", c.ConnectionState().Pattern) +
				fmt.Sprintf("protocol Noise_%s_25519_ChaChaPoly_SHA256\n", pattern) +
				fmt.Sprintf("initiator_static %x\nresponder_static %x\ninitiator_ephemeral %x\nresponder_ephemeral %x\nsalt %x\n",
					initStatic.priv.Bytes(), respStatic.priv.Bytes(), initEph.priv.Bytes(), respEph.priv.Bytes(), salt) +
				fmt.Sprintf("handshake_hash %x\ninitiator_to_responder %x\nresponder_to_initiator %x\n",
					c.ConnectionState().HandshakeHash, c2s.Bytes(), s2c.Bytes())
			file := filepath.Join("testdata", "vectors", "transcript-"+strings.ToLower(pattern.String())+".txt")
			if os.Getenv("NOISETOR_UPDATE_VECTORS") != "" {
				os.MkdirAll(filepath.Dir(file), 0o755)
				if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			if string(want) != text {
				t.Fatalf("transcript differs from %s:\n got:\n%s\nwant:\n%s", file, text, want)
			}
		})
	}
}
