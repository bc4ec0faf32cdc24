package noisetor

// Mediation (WIRE.md §12, Relay). Wallets and watchtowers do not reach each
// other directly: a sync server, the RelayServer, relays their streams. Each
// relayed stream carries an ordinary end-to-end noisetor handshake between
// the two ends, each checking the other's key against its own keyring, so
// the sync server moves ciphertext it can neither read nor alter undetected.
//
// Every stream through the sync server is a whole outer noisetor connection
// of its own, spliced byte for byte to another: no multiplexing, so a slow
// session never holds up another.

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// Relay control protocol constants; WIRE.md §12 is the specification.
const (
	relayMaxLine  = 256 // bytes of a control line, LF included
	relayTokenLen = 16  // random bytes of an ACCEPT token, hex on the wire

	// Codes of an "ERR <code> <text>" reply.
	relayCodeDenied       = "denied"
	relayCodeOffline      = "offline"
	relayCodeNoAnswer     = "no-answer"
	relayCodeUnknownPeer  = "unknown-peer"
	relayCodeBusy         = "busy"
	relayCodeBadRequest   = "bad-request"
	relayCodeBadToken     = "bad-token"
	relayCodeShuttingDown = "shutting-down"

	defaultRelayAcceptTimeout = 20 * time.Second
	defaultRelayPingInterval  = 30 * time.Second
	defaultRelayMaxSessions   = 1024
	defaultRelayMaxPerPeer    = 64

	// relayWriteTimeout bounds writing one control line.
	relayWriteTimeout = 10 * time.Second
)

// Messages of the relay's log records: one per decision about a peer
// (logOutcome), and the aggregates of refusals (refusalLog).
const (
	relayLogMessage      = "noisetor: relay"
	relayRefusalsMessage = "noisetor: relay refusals"
)

// Errors of relayed connections. A *RelayError wraps one of them (or
// ErrUnknownPeer), so match with errors.Is.
var (
	// ErrRelayDenied: the sync server's policy does not let this peer reach
	// the requested one.
	ErrRelayDenied = errors.New("noisetor: relay: not allowed by the sync server's policy")
	// ErrPeerOffline: the requested peer is not registered with the sync
	// server, or did not answer in time.
	ErrPeerOffline = errors.New("noisetor: relay: peer is offline")
	// ErrRelayBusy: the sync server is at one of its limits, for this peer
	// (RelayServer.MaxSessionsPerPeer, MaxIdlePerPeer) or in all
	// (MaxSessions). Retry later, or open fewer sessions at once.
	ErrRelayBusy = errors.New("noisetor: relay: the sync server is busy")
	// ErrRelayServerClosed is returned by RelayServer.Serve after Close.
	ErrRelayServerClosed = errors.New("noisetor: relay server closed")
	// errRelayProtocol: a control line broke the relay protocol.
	errRelayProtocol = errors.New("noisetor: relay protocol error")
)

// A RelayError is a refusal from the sync server: the "ERR <code> <text>"
// reply of the relay protocol. It wraps ErrRelayDenied (code "denied"),
// ErrPeerOffline ("offline", "no-answer"), ErrUnknownPeer ("unknown-peer")
// or ErrRelayBusy ("busy").
type RelayError struct {
	// Server is the keyring name of the sync server that refused.
	Server string
	// Peer is the peer asked for; empty for a refused registration.
	Peer string
	// Code is the machine-readable reason, e.g. "denied" or "offline".
	Code string
	// Text is the sync server's explanation. It comes from the sync server,
	// so treat it as untrusted display text.
	Text string
}

// Error describes the refusal, e.g. "noisetor: relay sync to tower: offline:
// tower is not registered with the sync server".
func (e *RelayError) Error() string {
	msg := "noisetor: relay " + e.Server
	if e.Peer != "" {
		msg += " to " + e.Peer
	}
	msg += ": " + e.Code
	if e.Text != "" {
		msg += ": " + e.Text
	}
	return msg
}

// Unwrap returns the sentinel error matching e.Code, if any.
func (e *RelayError) Unwrap() error {
	switch e.Code {
	case relayCodeDenied:
		return ErrRelayDenied
	case relayCodeOffline, relayCodeNoAnswer:
		return ErrPeerOffline
	case relayCodeUnknownPeer:
		return ErrUnknownPeer
	case relayCodeBusy:
		return ErrRelayBusy
	}
	return nil
}

// readRelayLine reads one control line, one byte at a time so that nothing
// after the LF is consumed: after "OK" the same stream carries relayed bytes.
func readRelayLine(r io.Reader) (string, error) {
	var b [relayMaxLine]byte
	for n := 0; n < len(b); n++ {
		if _, err := io.ReadFull(r, b[n:n+1]); err != nil {
			if n > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return "", err
		}
		if b[n] == '\n' {
			line := b[:n]
			for _, c := range line {
				if c < 0x20 || c > 0x7e {
					return "", fmt.Errorf("%w: control line holds a byte outside printable ASCII", errRelayProtocol)
				}
			}
			return string(line), nil
		}
	}
	return "", fmt.Errorf("%w: control line longer than %d bytes", errRelayProtocol, relayMaxLine)
}

func writeRelayLine(w io.Writer, line string) error {
	_, err := io.WriteString(w, line+"\n")
	return err
}

func validRelayToken(s string) bool {
	if len(s) != 2*relayTokenLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// relayErrText makes s fit an ERR line: printable ASCII, bounded length.
func relayErrText(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '?'
		}
	}
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}

// parseRelayErr parses an "ERR <code> [<text>]" line.
func parseRelayErr(line string) (code, text string, ok bool) {
	rest, ok := strings.CutPrefix(line, "ERR ")
	if !ok {
		return "", "", false
	}
	code, text, _ = strings.Cut(rest, " ")
	return code, text, code != ""
}
