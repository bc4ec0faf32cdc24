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

// handshakeMessageLen is the length of handshake message n (1 to 3) on
// curve c: every one has a fixed length, since handshake payloads are empty
// (WIRE.md §5). Messages 1 and 2 are e and the empty payload's tag; XK's
// message 3 is s with its tag and the payload's tag.
func handshakeMessageLen(c Curve, n int) int {
	if n == 3 {
		return c.publicKeyLen() + 2*aeadOverhead
	}
	return c.publicKeyLen() + aeadOverhead
}

// confirmLen is the length of the confirm record: its type byte and tag.
const confirmLen = 1 + aeadOverhead

// readMessage reads one length-prefixed handshake message, or the confirm
// record, that must be want bytes long, with one read where it has arrived.
// It never reads past the message. Transport reads go through the record
// reader in conn.go.
func readMessage(r io.Reader, want int) ([]byte, error) {
	b := make([]byte, frameHeader+want)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err // io.EOF if nothing came, io.ErrUnexpectedEOF if part
	}
	if n := int(binary.BigEndian.Uint16(b)); n != want {
		return nil, fmt.Errorf("%w: a %d-byte message where one of %d bytes is due", ErrHandshake, n, want)
	}
	return b[frameHeader:], nil
}

// appendMessage appends msg with its length prefix.
func appendMessage(out, msg []byte) []byte {
	out = binary.BigEndian.AppendUint16(out, uint16(len(msg)))
	return append(out, msg...)
}
