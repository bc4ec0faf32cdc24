package noisetor

import (
	"errors"
	"strings"
)

// The core errors, and how errors are worded: every message starts with
// "noisetor: " once, however deeply it is wrapped. Errors of one area are
// beside its code: ErrBadKey (keys.go), ErrBadPeer and ErrDuplicatePeer
// (keyring.go), ErrUnsafeFile and ErrKeyFilePermissions (filecheck.go),
// ErrWrongFile (filekind.go), the PKCS#11 errors (hsm.go), the Tor errors
// (tor.go) and the relay errors (relay.go).

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

const errPrefix = "noisetor: "

// unprefixed is err's message without its leading "noisetor: ", for an error
// that wraps it under a prefix of its own.
func unprefixed(err error) string { return strings.TrimPrefix(err.Error(), errPrefix) }

// contextError adds context, such as a file name, to an error that may
// already start with "noisetor: ", without saying "noisetor:" twice:
// "noisetor: <context>: <problem>".
type contextError struct {
	context string
	err     error
}

func (e *contextError) Error() string {
	return "noisetor: " + e.context + ": " + unprefixed(e.err)
}

func (e *contextError) Unwrap() error { return e.err }
