package noisetor

import (
	"encoding/binary"
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
