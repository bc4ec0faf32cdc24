package noisetor

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPreambleTagSpec recomputes preamble tags from the text of WIRE.md §3
// with crypto/hmac alone, and checks the vector printed there.
func TestPreambleTagSpec(t *testing.T) {
	resp, _ := NewPrivateKey(X25519, bytes.Repeat([]byte{0x01}, 32))
	init, _ := NewPrivateKey(X25519, bytes.Repeat([]byte{0x02}, 32))
	for _, tc := range []struct {
		pattern Pattern
		want    string // WIRE.md §3, "Vectors"
	}{
		{KK, preambleVectorKK},
		{XK, preambleVectorXK},
	} {
		pre := preamble{pattern: tc.pattern, curve: X25519, cipher: ChaChaPoly}
		for i := range pre.salt {
			pre.salt[i] = byte(i)
		}
		pre.tag = pre.computeTag(resp.PublicKey(), init.PublicKey())
		raw := pre.marshal()

		// The spec, word for word.
		k := sha256.Sum256(append([]byte("noisetor preamble v1\x00"), resp.PublicKey().Bytes()...))
		m := hmac.New(sha256.New, k[:])
		m.Write(raw[:24])
		if tc.pattern == KK {
			m.Write(init.PublicKey().Bytes())
		}
		if want := m.Sum(nil)[:16]; !bytes.Equal(raw[24:], want) {
			t.Errorf("%v: tag %x, spec says %x", tc.pattern, raw[24:], want)
		}
		if got := hex.EncodeToString(raw); got != tc.want {
			t.Errorf("%v: preamble\n got %s\nwant %s (WIRE.md §3)", tc.pattern, got, tc.want)
		}
		if !pre.tagMatches(resp.PublicKey(), init.PublicKey()) {
			t.Errorf("%v: tagMatches rejects its own tag", tc.pattern)
		}
	}
}

const (
	preambleVectorKK = "4e544f5201010101000102030405060708090a0b0c0d0e0f2ec5caff2f0e8c6e3d31bdd331313130"
	preambleVectorXK = "4e544f5201020101000102030405060708090a0b0c0d0e0f353c0c925cdf5239e336b3e74024ed17"
)

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
			initCfg := &Config{StaticKey: initStatic, Keyring: initRing, Patterns: []Pattern{pattern}, Random: bytes.NewReader(salt), Logger: discardLogger()}
			respCfg := &Config{StaticKey: respStatic, Keyring: respRing, Patterns: []Pattern{pattern}, Logger: discardLogger()}
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
			text := fmt.Sprintf("# noisetor wire v1 transcript, %s: see WIRE.md §9\n", c.ConnectionState().Pattern) +
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

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
