package noisetor

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/flynn/noise"
)

type cacophonyVector struct {
	ProtocolName     string   `json:"protocol_name"`
	InitPrologue     hexBytes `json:"init_prologue"`
	InitPSKs         []hexBytes
	InitStatic       hexBytes `json:"init_static"`
	InitEphemeral    hexBytes `json:"init_ephemeral"`
	InitRemoteStatic hexBytes `json:"init_remote_static"`
	RespPrologue     hexBytes `json:"resp_prologue"`
	RespPSKs         []hexBytes
	RespStatic       hexBytes `json:"resp_static"`
	RespEphemeral    hexBytes `json:"resp_ephemeral"`
	RespRemoteStatic hexBytes `json:"resp_remote_static"`
	HandshakeHash    hexBytes `json:"handshake_hash"`
	Messages         []struct {
		Payload    hexBytes `json:"payload"`
		Ciphertext hexBytes `json:"ciphertext"`
	} `json:"messages"`
}

type hexBytes []byte

func (h *hexBytes) UnmarshalJSON(b []byte) error {
	s, err := strconv.Unquote(string(b))
	if err != nil {
		return err
	}
	*h, err = hex.DecodeString(s)
	return err
}

func (v *cacophonyVector) UnmarshalJSON(b []byte) error {
	type plain cacophonyVector
	var aux struct {
		plain
		InitPSKs []hexBytes `json:"init_psks"`
		RespPSKs []hexBytes `json:"resp_psks"`
	}
	if err := json.Unmarshal(b, &aux); err != nil {
		return err
	}
	*v = cacophonyVector(aux.plain)
	v.InitPSKs, v.RespPSKs = aux.InitPSKs, aux.RespPSKs
	return nil
}

// TestCacophonyVectors runs every KK and XK 25519 vector through noisetor's
// own DH function (the StaticKey adapter with its static-key reference and
// cached ephemeral). The SHA-256 vectors without PSK, which are noisetor's own
// protocols, also go through newHandshakeState exactly as connections use it.
func TestCacophonyVectors(t *testing.T) {
	raw, err := os.ReadFile("testdata/noise-vectors/cacophony-kk-xk-25519.json")
	if err != nil {
		t.Fatal(err)
	}
	var file struct{ Vectors []cacophonyVector }
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	if len(file.Vectors) != 40 {
		t.Fatalf("%d vectors, want 40", len(file.Vectors))
	}
	own := 0
	for _, v := range file.Vectors {
		t.Run(v.ProtocolName, func(t *testing.T) {
			runVector(t, v, false)
			if strings.HasSuffix(v.ProtocolName, "_SHA256") && !strings.Contains(v.ProtocolName, "psk") {
				own++
				runVector(t, v, true)
			}
		})
	}
	if own != 4 {
		t.Fatalf("ran %d vectors through newHandshakeState, want 4", own)
	}
}

func runVector(t *testing.T, v cacophonyVector, viaParams bool) {
	parts := strings.Split(v.ProtocolName, "_")
	patternName, cipherName, hashName := parts[1], parts[3], parts[4]
	pattern := KK
	if strings.HasPrefix(patternName, "XK") {
		pattern = XK
	}
	cipher := ChaChaPoly
	if cipherName == "AESGCM" {
		cipher = AESGCM
	}
	hashes := map[string]noise.HashFunc{"SHA256": noise.HashSHA256, "SHA512": noise.HashSHA512, "BLAKE2s": noise.HashBLAKE2s, "BLAKE2b": noise.HashBLAKE2b}
	pskPlacement := -1
	if i := strings.Index(patternName, "psk"); i >= 0 {
		pskPlacement, _ = strconv.Atoi(patternName[i+3:])
	}

	side := func(initiator bool) *noise.HandshakeState {
		static, eph, remote, prol, psks := v.RespStatic, v.RespEphemeral, v.RespRemoteStatic, v.RespPrologue, v.RespPSKs
		if initiator {
			static, eph, remote, prol, psks = v.InitStatic, v.InitEphemeral, v.InitRemoteStatic, v.InitPrologue, v.InitPSKs
		}
		sk, err := NewPrivateKey(X25519, static)
		if err != nil {
			t.Fatal(err)
		}
		var rs PublicKey
		if len(remote) > 0 {
			rs = PublicKey{curve: X25519, raw: string(remote)}
		}
		p := handshakeParams{initiator: initiator, pattern: pattern, cipher: cipher, static: sk,
			remoteStatic: rs, prologue: prol, random: bytes.NewReader(eph)}
		if viaParams {
			hs, err := newHandshakeState(p)
			if err != nil {
				t.Fatal(err)
			}
			return hs
		}
		cfg := noise.Config{
			CipherSuite:   noise.NewCipherSuite(&dhFunc{curve: X25519, static: sk}, cipher.noiseCipher(), hashes[hashName]),
			Random:        p.random,
			Pattern:       pattern.noisePattern(),
			Initiator:     initiator,
			Prologue:      prol,
			StaticKeypair: noise.DHKey{Private: staticRef, Public: sk.PublicKey().Bytes()},
			PeerStatic:    remote,
		}
		if pskPlacement >= 0 {
			cfg.PresharedKey, cfg.PresharedKeyPlacement = psks[0], pskPlacement
		}
		hs, err := noise.NewHandshakeState(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return hs
	}
	init, resp := side(true), side(false)

	var iSend, iRecv, rSend, rRecv *noise.CipherState
	for i, m := range v.Messages {
		initiatorSends := i%2 == 0
		if iSend == nil { // handshake phase
			w, r := init, resp
			if !initiatorSends {
				w, r = resp, init
			}
			ct, c1, c2, err := w.WriteMessage(nil, m.Payload)
			if err != nil {
				t.Fatalf("message %d: write: %v", i, err)
			}
			if !bytes.Equal(ct, m.Ciphertext) {
				t.Fatalf("message %d: ciphertext\n got %x\nwant %x", i, ct, m.Ciphertext)
			}
			pt, d1, d2, err := r.ReadMessage(nil, ct)
			if err != nil || !bytes.Equal(pt, m.Payload) {
				t.Fatalf("message %d: read %x, %v", i, pt, err)
			}
			if c1 != nil {
				if d1 == nil {
					t.Fatalf("message %d: only one side finished", i)
				}
				if initiatorSends {
					iSend, iRecv, rRecv, rSend = c1, c2, d1, d2
				} else {
					rRecv, rSend, iSend, iRecv = c1, c2, d1, d2
				}
				if !bytes.Equal(init.ChannelBinding(), v.HandshakeHash) || !bytes.Equal(resp.ChannelBinding(), v.HandshakeHash) {
					t.Fatalf("handshake hash\n got %x\nwant %x", init.ChannelBinding(), v.HandshakeHash)
				}
			}
			continue
		}
		send, recv := iSend, rRecv
		if !initiatorSends {
			send, recv = rSend, iRecv
		}
		ct, err := send.Encrypt(nil, nil, m.Payload)
		if err != nil || !bytes.Equal(ct, m.Ciphertext) {
			t.Fatalf("transport message %d:\n got %x\nwant %x (%v)", i, ct, m.Ciphertext, err)
		}
		pt, err := recv.Decrypt(nil, nil, ct)
		if err != nil || !bytes.Equal(pt, m.Payload) {
			t.Fatalf("transport message %d: decrypt %v", i, err)
		}
	}
	if iSend == nil {
		t.Fatal("handshake never completed")
	}
}
