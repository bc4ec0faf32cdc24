package noisetor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ErrWrongFile is matched (with errors.Is) by the error for a file of another
// kind than asked for: a keyring given as a private key, a private key given
// as a keyring, a Tor key given as a noisetor key.
var ErrWrongFile = errors.New("noisetor: wrong kind of file")

// What a file given in the wrong place holds, so that the error says "this is
// a keyring, not a key" instead of giving advice for the wrong kind of file
// (chmod 600 on a keyring, or "treat the key as exposed" for a key file given
// as the keyring, which would start a key ceremony for nothing).
const (
	kindPrivateKey = "a noisetor private key file"
	kindOnionKey   = "a Tor onion service key file"
	kindClientAuth = "a Tor client-authorization key file"
	kindKeyring    = "a noisetor keyring (the public list of peers)"
	kindPublicKey  = "a noisetor public key"
	kindPIN        = "a PIN file"
)

// secretFileKind names the secret key file whose whole content is data, or
// returns "". Only a file of one key counts: a keyring with a key pasted into
// one of its lines is a keyring that has exposed that key.
func secretFileKind(data []byte) string {
	s := strings.ToUpper(strings.TrimSpace(string(bytes.TrimPrefix(data, []byte("\uFEFF")))))
	if strings.ContainsAny(s, "\n\r\t ") {
		return ""
	}
	switch {
	case strings.HasPrefix(s, privateKeyPrefix):
		return kindPrivateKey
	case strings.HasPrefix(s, onionKeyPrefix):
		return kindOnionKey
	case strings.HasPrefix(s, clientAuthKeyPrefix):
		return kindClientAuth
	}
	return ""
}

// publicFileKind names the public file data is, or returns "".
func publicFileKind(data []byte) string {
	if bytes.HasPrefix(bytes.TrimSpace(data), []byte("# noisetor keyring")) {
		return kindKeyring
	}
	if k, err := ParseKeyring(bytes.NewReader(data)); err == nil && k.Len() > 0 {
		return kindKeyring
	}
	if _, err := ParsePublicKey(strings.TrimSpace(string(data))); err == nil {
		return kindPublicKey
	}
	return ""
}

// sniffPublicFile reads the start of path, without the checks of a secret
// file (it may be group-readable: that is the point), and names the public
// kind it is, or returns "".
func sniffPublicFile(path string) string {
	// Without blocking on a FIFO or opening a device, whatever path is
	// (it may be in a directory others can write: that is often why the
	// secret file was refused).
	if st, err := os.Lstat(path); err != nil || !st.Mode().IsRegular() {
		return ""
	}
	f, err := openNonBlocking(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return ""
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyringSize))
	defer clear(data) // it may be a private key that others can read
	if err != nil {
		return ""
	}
	return publicFileKind(data)
}

// wrongFile says that path, given as want (one of the kind names, or "a
// keyring"), is kind.
func wrongFile(path, kind, want string) *wrongFileError {
	asked, advice := want, ""
	switch want {
	case kindPrivateKey:
		asked, advice = "a private key", " (made by noisetor keygen; flag -k)"
	case kindOnionKey:
		asked = "an onion service key"
	case kindClientAuth:
		asked = "a Tor client-authorization key"
	case "a keyring":
		advice = " (the list of peers' PUBLIC keys, flag -r); nothing secret was shown or exposed"
	}
	file := strings.TrimPrefix(strings.TrimPrefix(asked, "an "), "a ")
	return &wrongFileError{fmt.Sprintf("%s is %s, not %s: give the %s file%s", path, kind, asked, strings.TrimSuffix(file, " file"), advice)}
}

// A wrongFileError matches ErrWrongFile and ErrBadKey.
type wrongFileError struct{ msg string }

func (e *wrongFileError) Error() string   { return "noisetor: " + e.msg }
func (e *wrongFileError) Unwrap() []error { return []error{ErrWrongFile, ErrBadKey} }

// inKeyring is e as the Err of a *KeyringError, which adds the prefix.
func (e *wrongFileError) inKeyring() error { return &peerError{e, e.msg} }
