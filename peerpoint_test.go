package noisetor

import (
	"bytes"
	"crypto/rand"
	"errors"
	"sync"
	"testing"
	"time"
)

// recordingKey is a StaticKey that records every point it is asked to do
// DH with, as a key store that does not check them would receive them.
type recordingKey struct {
	*PrivateKey
	mu   sync.Mutex
	seen [][]byte
}

func (k *recordingKey) DH(peer PublicKey) ([]byte, error) {
	k.mu.Lock()
	k.seen = append(k.seen, peer.Bytes())
	k.mu.Unlock()
	return k.PrivateKey.DH(peer)
}

// A message 1 whose ephemeral key is of low order (X25519) or off the curve
// (P-256) never reaches the responder's StaticKey, and the error names an
// invalid key instead of blaming the caller's key for us (issue 13 points 4
// and 5).
func TestInvalidEphemeralNeverReachesStaticKey(t *testing.T) {
	for _, curve := range []Curve{X25519, P256} {
		t.Run(curve.String(), func(t *testing.T) {
			serverKey, _ := GenerateKey(curve, nil)
			clientKey, _ := GenerateKey(curve, nil)
			rec := &recordingKey{PrivateKey: serverKey}
			sring, _ := NewKeyring(Peer{Name: "client", PublicKey: clientKey.PublicKey()})
			cring, _ := NewKeyring(Peer{Name: "server", PublicKey: serverKey.PublicKey()})
			server := &Config{StaticKey: rec, Keyring: sring, Logger: discardLogger()}
			client := &Config{StaticKey: clientKey, Keyring: cring, Logger: discardLogger()}

			// A genuine preamble from the member, then a message 1 whose
			// ephemeral key is invalid: only a key holder gets this far.
			s, err := client.keys().secrets(serverKey.PublicKey())
			if err != nil {
				t.Fatal(err)
			}
			pre := preamble{pattern: KK, curve: curve, cipher: ChaChaPoly}
			rand.Read(pre.salt[:])
			raw := pre.sealKK(s.toPeer, time.Now())
			var bad []byte
			if curve == X25519 {
				bad = x25519SmallOrder[2][:] // a point of order 8
			} else {
				bad = append([]byte{4}, bytes.Repeat([]byte{0x01}, 64)...) // not on the curve
			}
			msg1 := append(append([]byte(nil), bad...), make([]byte, 16)...)
			addr, res := serveOne(t, server)
			c := rawDial(t, addr)
			c.Write(appendMessage(raw, msg1))
			err = <-res
			if !errors.Is(err, ErrHandshake) {
				t.Fatalf("server: %v, want ErrHandshake", err)
			}
			mustContain(t, err.Error(), "message 1 carries an invalid public key")
			rec.mu.Lock()
			defer rec.mu.Unlock()
			for _, p := range rec.seen {
				if bytes.Equal(p, bad) {
					t.Fatalf("the invalid point reached StaticKey.DH")
				}
			}
		})
	}
}
