package noisetor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Wire constants. WIRE.md is the specification; keep the two in step.
const (
	wireVersion = 2

	// maxMessage is the Noise limit on any message, handshake or transport.
	maxMessage   = 65535
	frameHeader  = 2
	aeadOverhead = 16
	// maxPayload is the most application data one transport frame carries:
	// the Noise limit less the AEAD tag and the record type byte.
	maxPayload = maxMessage - aeadOverhead - 1
)

// Transport record types, the first plaintext byte of every transport frame.
const (
	recordData    = 0
	recordConfirm = 1
	recordRekey   = 2
	recordClose   = 3
)

// Errors a handshake can fail with. Match them with errors.Is; the returned
// error says more.
var (
	// ErrUnknownPeer: the remote static key (or, for a KK preamble, the
	// initiator's key) is not in the keyring, or the initiator does not know
	// our public key.
	ErrUnknownPeer = errors.New("noisetor: peer not in keyring")
	// ErrVersion: the peer speaks another wire version or asked for a pattern,
	// curve or cipher this side does not accept.
	ErrVersion = errors.New("noisetor: unsupported protocol version or parameters")
	// ErrReplay: a preamble seen before was sent again.
	ErrReplay = errors.New("noisetor: replayed handshake")
	// ErrHandshake: a handshake message failed to decrypt or was malformed.
	ErrHandshake = errors.New("noisetor: handshake failed")
	// ErrRefused: the responder closed the connection instead of answering
	// our handshake. There are no error messages on the wire, so the
	// initiator cannot be told why; the error lists the causes: the
	// responder does not list our key, we hold a wrong key for it, our
	// clocks differ by more than 10 minutes, or it is over its limits.
	ErrRefused = errors.New("noisetor: refused by the responder")
	// ErrFrame: a transport frame failed to authenticate or was malformed. The
	// connection is unusable afterwards.
	ErrFrame = errors.New("noisetor: bad frame")
)

// readMessage reads one length-prefixed message (handshake or transport frame)
// into a new buffer. It is used only during the handshake; transport reads go
// through the resumable reader in conn.go.
func readMessage(r io.Reader) ([]byte, error) {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 {
		return nil, fmt.Errorf("%w: empty message", ErrHandshake)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// appendMessage appends msg with its length prefix.
func appendMessage(out, msg []byte) []byte {
	out = binary.BigEndian.AppendUint16(out, uint16(len(msg)))
	return append(out, msg...)
}
