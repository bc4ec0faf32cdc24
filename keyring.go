package noisetor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

const (
	// maxKeyringSize bounds a keyring file; a keyring lists a few peers.
	maxKeyringSize = 1 << 20
	// maxKeyringLine bounds one line of a keyring file.
	maxKeyringLine = 4096
	// maxNameLen bounds a peer name.
	maxNameLen = 64

	keyringFingerprintDomain = "noisetor keyring fingerprint v1"
)

// ErrBadPeer is matched (with errors.Is) by every error about a malformed
// keyring line or peer entry: a bad name, address or field. Errors about the
// keys themselves match ErrBadKey instead.
var ErrBadPeer = errors.New("noisetor: bad peer entry")

// ErrDuplicatePeer is matched (with errors.Is) by the error for a peer whose
// name, public key or address is already in the keyring.
var ErrDuplicatePeer = errors.New("noisetor: duplicate peer")

// A Peer is an entry of a Keyring: a machine this one may talk to.
type Peer struct {
	// Name identifies the peer: 1 to 64 characters of a-z, 0-9, '.', '_'
	// and '-', starting with a letter or digit.
	Name string
	// PublicKey is the peer's static key. Required.
	PublicKey PublicKey
	// Address is where to dial the peer, "host:port": an IP address, a DNS
	// name or a Tor v3 onion address ("<56 characters>.onion"). Optional.
	// The keyring stores it normalised (lower case, canonical IP form).
	Address string
	// ClientAuth is the peer's Tor v3 client-authorization PUBLIC key: 52
	// characters of upper-case base32, as in the "descriptor:x25519:<key>"
	// line of a Tor authorized_clients/*.auth file (the prefix is accepted
	// and removed). Optional.
	ClientAuth string

	// NextKey and OverlapUntil describe a rotation of the peer's static key
	// (WIRE.md §11.2.6): until OverlapUntil the peer may authenticate with
	// PublicKey or NextKey, and a dialer addresses it with PublicKey; from
	// OverlapUntil on only NextKey is accepted, and dialers address it with
	// NextKey. Connections authenticated with PublicKey end at OverlapUntil.
	// Both are set or neither; NextKey is unique in the keyring like
	// PublicKey, and OverlapUntil is kept in UTC, to the second.
	NextKey      PublicKey
	OverlapUntil time.Time
}

// Keys returns the static keys that authenticate p at time now: PublicKey
// and, during a rotation, NextKey; after the overlap only NextKey.
func (p Peer) Keys(now time.Time) []PublicKey {
	switch {
	case p.NextKey.IsZero():
		return []PublicKey{p.PublicKey}
	case now.Before(p.OverlapUntil):
		return []PublicKey{p.PublicKey, p.NextKey}
	default:
		return []PublicKey{p.NextKey}
	}
}

// DialKey returns the key with which a dialer addresses p at time now: its
// PublicKey until the end of a rotation's overlap, then its NextKey. The
// rotating machine answers to both keys until then (Config.PreviousStaticKey).
func (p Peer) DialKey(now time.Time) PublicKey {
	if !p.NextKey.IsZero() && !now.Before(p.OverlapUntil) {
		return p.NextKey
	}
	return p.PublicKey
}

// accepts reports whether key authenticates p at time now.
func (p Peer) accepts(key PublicKey, now time.Time) bool {
	return slices.Contains(p.Keys(now), key)
}

// equal reports whether p and q are the same entry (== would compare
// OverlapUntil's location too).
func (p Peer) equal(q Peer) bool {
	return p.Name == q.Name && p.PublicKey == q.PublicKey && p.Address == q.Address &&
		p.ClientAuth == q.ClientAuth && p.NextKey == q.NextKey && p.OverlapUntil.Equal(q.OverlapUntil)
}

// A Keyring is the set of peers this machine may talk to, each with a unique
// name, public key and (if set) address. It is safe for concurrent use. The
// zero value is an empty keyring ready to use; lookups on a nil *Keyring
// find nothing.
//
// The file format (see ParseKeyring) is one peer per line:
//
//	# comment
//	<name> <public-key> [addr=<host:port>] [auth=<tor-client-auth-public-key>] [next=<public-key> until=<time>]
type Keyring struct {
	mu     sync.RWMutex
	byName map[string]Peer
	byKey  map[PublicKey]string // public key and next key -> name
	byAddr map[string]string    // normalised address -> name
	gen    uint64               // counts changes, for the preamble index

	watchers map[*func(KeyringChange)]struct{} // keyring_live.go
}

// NewKeyring returns a keyring holding peers. It fails like Add on the first
// invalid or duplicate peer.
func NewKeyring(peers ...Peer) (*Keyring, error) {
	k := new(Keyring)
	for _, p := range peers {
		if err := k.Add(p); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// Add adds peer p: it binds the public key to the identifier p.Name (the
// ceremony_input(public_key, identifier) of the design). It checks p as
// strictly as ParseKeyring checks a line and fails if the name, the public key
// or the address is already in the keyring.
func (k *Keyring) Add(p Peer) error {
	p, err := normalizePeer(p)
	if err != nil {
		return fmt.Errorf("noisetor: %w", err)
	}
	k.mu.Lock()
	unlocked := false
	defer func() {
		if !unlocked {
			k.mu.Unlock()
		}
	}()
	switch field, other := k.conflict(p); field {
	case "":
	case "name":
		return fmt.Errorf("noisetor: %w", &peerError{ErrDuplicatePeer,
			fmt.Sprintf("the keyring already has a peer named %q", p.Name)})
	case "address":
		return fmt.Errorf("noisetor: %w", &peerError{ErrDuplicatePeer,
			fmt.Sprintf("peer %q: address %s is already in the keyring as peer %q", p.Name, p.Address, other)})
	default:
		return fmt.Errorf("noisetor: %w", &peerError{ErrDuplicatePeer,
			fmt.Sprintf("peer %q: its public key is already in the keyring as peer %q", p.Name, other)})
	}
	if len(k.watchers) == 0 {
		k.insert(p)
		return nil
	}
	change := KeyringChange{Added: []Peer{p}, OldFingerprint: k.fingerprintLocked()}
	k.insert(p)
	change.NewFingerprint = k.fingerprintLocked()
	watchers := k.watchersLocked()
	unlocked = true
	k.mu.Unlock()
	notifyKeyringWatchers(watchers, change)
	return nil
}

// conflict reports which unique field of p ("name", "public key", "address")
// is already in k, and the name of the peer holding it. k.mu must be held.
func (k *Keyring) conflict(p Peer) (field, other string) {
	if _, ok := k.byName[p.Name]; ok {
		return "name", p.Name
	}
	for _, key := range []PublicKey{p.PublicKey, p.NextKey} {
		if n, ok := k.byKey[key]; ok && !key.IsZero() {
			return "public key", n
		}
	}
	if p.Address != "" {
		if n, ok := k.byAddr[p.Address]; ok {
			return "address", n
		}
	}
	return "", ""
}

// insert adds a normalised, non-conflicting peer. k.mu must be held.
func (k *Keyring) insert(p Peer) {
	if k.byName == nil {
		k.byName = make(map[string]Peer)
		k.byKey = make(map[PublicKey]string)
		k.byAddr = make(map[string]string)
	}
	k.gen++
	k.byName[p.Name] = p
	k.byKey[p.PublicKey] = p.Name
	if !p.NextKey.IsZero() {
		k.byKey[p.NextKey] = p.Name
	}
	if p.Address != "" {
		k.byAddr[p.Address] = p.Name
	}
}

// generation changes whenever a peer is added or removed.
func (k *Keyring) generation() uint64 {
	if k == nil {
		return 0
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.gen
}

// ByName returns the peer called name.
func (k *Keyring) ByName(name string) (Peer, bool) {
	if k == nil {
		return Peer{}, false
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	p, ok := k.byName[name]
	return p, ok
}

// ByKey returns the peer whose static key or next key (Peer.NextKey) is pub,
// whether or not that key authenticates the peer at this time (Peer.Keys).
func (k *Keyring) ByKey(pub PublicKey) (Peer, bool) {
	if k == nil || pub.IsZero() {
		return Peer{}, false
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	n, ok := k.byKey[pub]
	if !ok {
		return Peer{}, false
	}
	return k.byName[n], true
}

// stillAccepts reports whether key, which a handshake proved for the peer
// named name, still authenticates that peer at time now: the keyring may
// have changed since.
func (k *Keyring) stillAccepts(name string, key PublicKey, now time.Time) bool {
	p, ok := k.ByKey(key)
	return ok && p.Name == name && p.accepts(key, now)
}

// ByAddress returns the peer whose Address is addr ("host:port"). The
// address is compared in normalised form, so "XYZ.onion:9000" finds
// "xyz.onion:9000" and "[::ffff:127.0.0.1]:80" finds "127.0.0.1:80".
func (k *Keyring) ByAddress(addr string) (Peer, bool) {
	if k == nil {
		return Peer{}, false
	}
	norm, err := normalizeAddress(addr)
	if err != nil {
		return Peer{}, false
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	n, ok := k.byAddr[norm]
	if !ok {
		return Peer{}, false
	}
	return k.byName[n], true
}

// Peers returns a copy of the peers, sorted by Name.
func (k *Keyring) Peers() []Peer {
	if k == nil {
		return nil
	}
	k.mu.RLock()
	peers := make([]Peer, 0, len(k.byName))
	for _, p := range k.byName {
		peers = append(peers, p)
	}
	k.mu.RUnlock()
	slices.SortFunc(peers, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
	return peers
}

// Len returns the number of peers.
func (k *Keyring) Len() int {
	if k == nil {
		return 0
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.byName)
}

// Fingerprint returns a short digest of the whole keyring (every peer's name,
// key, address and client-auth key) for operators to read to each other: six
// groups of five decimal digits. Two keyrings have the same fingerprint if and
// only if WriteTo writes the same peer lines for them, whatever the order,
// comments or spacing of the files they were read from. The format is
// specified in WIRE.md.
func (k *Keyring) Fingerprint() string {
	return keyringFingerprint(k.Peers())
}

// keyringFingerprint is the fingerprint of a keyring of peers (WIRE.md §11.3.2).
func keyringFingerprint(peers []Peer) string {
	slices.SortFunc(peers, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
	var b bytes.Buffer
	for _, p := range peers {
		writePeerLine(&b, p)
	}
	return fingerprint(keyringFingerprintDomain, b.Bytes())
}

// writePeerLine writes the canonical line of a normalised peer.
func writePeerLine(b *bytes.Buffer, p Peer) {
	b.WriteString(p.Name)
	b.WriteByte(' ')
	b.WriteString(p.PublicKey.String())
	if p.Address != "" {
		b.WriteString(" addr=")
		b.WriteString(p.Address)
	}
	if p.ClientAuth != "" {
		b.WriteString(" auth=")
		b.WriteString(p.ClientAuth)
	}
	if !p.NextKey.IsZero() {
		b.WriteString(" next=")
		b.WriteString(p.NextKey.String())
		b.WriteString(" until=")
		b.WriteString(p.OverlapUntil.Format(time.RFC3339))
	}
	b.WriteByte('\n')
}

const keyringHeader = "# noisetor keyring: <name> <public-key> [addr=<host:port>] [auth=<tor-client-auth-public-key>] [next=<public-key> until=<time>]\n"

// WriteTo writes the keyring in the file format of ParseKeyring: a comment
// line, then one line per peer, sorted by name, fields separated by one
// space. It implements io.WriterTo.
func (k *Keyring) WriteTo(w io.Writer) (int64, error) {
	var b bytes.Buffer
	b.WriteString(keyringHeader)
	for _, p := range k.Peers() {
		writePeerLine(&b, p)
	}
	n, err := w.Write(b.Bytes())
	if err != nil {
		return int64(n), fmt.Errorf("noisetor: writing keyring: %w", err)
	}
	return int64(n), nil
}

// Save writes the keyring to path, replacing the file atomically (a temporary
// file in the same directory, then a rename), with mode 0644: a keyring holds
// only public data, but must not be writable by others.
func (k *Keyring) Save(path string) (err error) {
	var b bytes.Buffer
	if _, err := k.WriteTo(&b); err != nil {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("noisetor: saving keyring: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("noisetor: saving keyring: %w", err)
	}
	if _, err := f.Write(b.Bytes()); err != nil {
		return fmt.Errorf("noisetor: saving keyring: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("noisetor: saving keyring: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("noisetor: saving keyring: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("noisetor: saving keyring: %w", err)
	}
	// Make the rename durable; failure here does not undo the save.
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// LoadKeyring reads a keyring file (see ParseKeyring), and a file larger
// than 1 MiB is refused. Whoever can write the keyring can add a peer, so,
// like LoadPrivateKey, it checks the file as ssh does: a regular file owned
// by this process's user or root, that group and others may read but not
// write, in directories that only this user or root may write (see
// LoadPrivateKey). The error for a failed check is a *KeyringError that
// matches ErrUnsafeFile and fs.ErrPermission and says which check failed
// and the fix.
func LoadKeyring(path string) (*Keyring, error) {
	f, err := openKeyringFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseKeyring(path, f)
}

// openKeyringFile opens path after the checks of LoadKeyring.
func openKeyringFile(path string) (*os.File, error) {
	f, err := openChecked(path, trustFile)
	if err != nil {
		var ue *unsafeFileError
		if errors.As(err, &ue) {
			return nil, &KeyringError{Path: path, Err: &peerError{ue, unprefixed(ue)}}
		}
		return nil, fmt.Errorf("noisetor: loading keyring: %w", errors.Unwrap(err))
	}
	return f, nil
}

// ParseKeyring reads a keyring in its text format: UTF-8, at most 1 MiB, lines
// separated by "\n" (one "\r" before it is ignored; any other "\r" is an
// error), at most 4096 bytes each.
// Each line is blank, a comment, or one peer:
//
//	<name> <public-key> [addr=<host:port>] [auth=<tor-client-auth-public-key>]
//
// Fields are separated by spaces or tabs; a field starting with '#' starts a
// comment that runs to the end of the line. The name and public key come
// first (see Peer and ParsePublicKey), then the optional fields in any order,
// each at most once. Names, public keys and addresses must be unique. Keys of
// different curves may be mixed.
//
// Parsing is strict: the first bad line fails the whole keyring with a
// *KeyringError naming the line. A line holding a noisetor private key (even
// in a comment) is an error. Errors quote only values that passed validation,
// so a secret pasted into the wrong place is not echoed into logs.
func ParseKeyring(r io.Reader) (*Keyring, error) {
	return parseKeyring("", r)
}

func parseKeyring(path string, r io.Reader) (*Keyring, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxKeyringSize+1))
	if err != nil {
		return nil, &KeyringError{Path: path, Err: err}
	}
	if len(data) > maxKeyringSize {
		return nil, &KeyringError{Path: path, Err: &peerError{ErrBadPeer, "file is larger than 1 MiB"}}
	}
	data = bytes.TrimPrefix(data, []byte("\uFEFF")) // a byte order mark some editors add
	if kind := secretFileKind(data); kind != "" {
		// A key file given as the keyring: nothing leaked, say so rather
		// than the advice for a key pasted into a keyring line below.
		name := path
		if name == "" {
			name = "the input"
		}
		line := 1 + bytes.Count(data[:len(data)-len(bytes.TrimLeft(data, " \t\r\n"))], []byte("\n"))
		return nil, &KeyringError{Path: path, Line: line, Err: wrongFile(name, kind, "a keyring").inKeyring()}
	}

	k := new(Keyring)
	nameLine := make(map[string]int)
	keyLine := make(map[PublicKey]int)
	addrLine := make(map[string]int)
	for n := 1; len(data) > 0; n++ {
		line, rest, lf := bytes.Cut(data, []byte("\n"))
		data = rest
		if lf {
			line = bytes.TrimSuffix(line, []byte("\r"))
		}
		p, ok, err := parseLine(line)
		if err != nil {
			return nil, &KeyringError{Path: path, Line: n, Err: err}
		}
		if !ok {
			continue
		}
		switch field, other := k.conflict(p); field {
		case "":
		case "name":
			return nil, &KeyringError{Path: path, Line: n, Err: &peerError{ErrDuplicatePeer,
				fmt.Sprintf("duplicate name %q (first on line %d)", p.Name, nameLine[p.Name])}}
		case "address":
			return nil, &KeyringError{Path: path, Line: n, Err: &peerError{ErrDuplicatePeer,
				fmt.Sprintf("duplicate address %s (first on line %d, peer %q)", p.Address, addrLine[p.Address], other)}}
		default:
			return nil, &KeyringError{Path: path, Line: n, Err: &peerError{ErrDuplicatePeer,
				fmt.Sprintf("duplicate public key (first on line %d, peer %q)", max(keyLine[p.PublicKey], keyLine[p.NextKey]), other)}}
		}
		k.insert(p)
		nameLine[p.Name] = n
		keyLine[p.PublicKey] = n
		if !p.NextKey.IsZero() {
			keyLine[p.NextKey] = n
		}
		if p.Address != "" {
			addrLine[p.Address] = n
		}
	}
	return k, nil
}

// parseLine parses one line. ok is false for blank and comment lines.
func parseLine(line []byte) (p Peer, ok bool, err error) {
	if len(line) > maxKeyringLine {
		return Peer{}, false, &peerError{ErrBadPeer, "line is longer than 4096 bytes"}
	}
	// Checked before anything else so that no later message can quote it.
	if bytes.Contains(bytes.ToUpper(line), []byte(privateKeyPrefix)) {
		return Peer{}, false, &peerError{ErrBadKey,
			"line holds a noisetor PRIVATE key: remove it (a keyring is public) and treat that key as exposed"}
	}
	if !utf8.Valid(line) {
		return Peer{}, false, &peerError{ErrBadPeer, "line is not valid UTF-8"}
	}
	// Only the one CR directly before the LF is a line ending (CR CR LF is
	// not); any other would end up inside a field, where a lenient decoder
	// might skip it, giving one value two spellings.
	if bytes.IndexByte(line, '\r') >= 0 {
		return Peer{}, false, &peerError{ErrBadPeer, "stray carriage return (CR): a line ends with LF or CR LF"}
	}
	var fields []string
	for f := range strings.FieldsFuncSeq(string(line), func(r rune) bool { return r == ' ' || r == '\t' }) {
		if strings.HasPrefix(f, "#") {
			break
		}
		fields = append(fields, f)
	}
	if len(fields) == 0 {
		return Peer{}, false, nil
	}
	if len(fields) < 2 {
		return Peer{}, false, &peerError{ErrBadPeer,
			"want <name> <public-key> [addr=<host:port>] [auth=<tor-client-auth-public-key>] [next=<public-key> until=<time>]"}
	}
	p.Name = fields[0]
	if err := checkName(p.Name); err != nil {
		return Peer{}, false, err
	}
	if strings.Contains(fields[1], "=") {
		return Peer{}, false, &peerError{ErrBadPeer, "the second field must be the public key"}
	}
	p.PublicKey, err = ParsePublicKey(fields[1])
	if err != nil {
		return Peer{}, false, keyError("public key", err)
	}
	var haveAddr, haveAuth, haveNext, haveUntil bool
	for _, f := range fields[2:] {
		key, val, found := strings.Cut(f, "=")
		if !found {
			return Peer{}, false, &peerError{ErrBadPeer, "unexpected field after the public key (want addr=, auth=, next= or until=)"}
		}
		switch key {
		case "next":
			if haveNext {
				return Peer{}, false, &peerError{ErrBadPeer, "next= given twice"}
			}
			haveNext = true
			if p.NextKey, err = ParsePublicKey(val); err != nil {
				return Peer{}, false, keyError("next key", err)
			}
		case "until":
			if haveUntil {
				return Peer{}, false, &peerError{ErrBadPeer, "until= given twice"}
			}
			haveUntil = true
			if p.OverlapUntil, err = parseUntil(val); err != nil {
				return Peer{}, false, err
			}
		case "addr":
			if haveAddr {
				return Peer{}, false, &peerError{ErrBadPeer, "addr= given twice"}
			}
			haveAddr = true
			if val == "" {
				return Peer{}, false, &peerError{ErrBadPeer, "empty addr="}
			}
			p.Address = val
		case "auth":
			if haveAuth {
				return Peer{}, false, &peerError{ErrBadPeer, "auth= given twice"}
			}
			haveAuth = true
			if val == "" {
				return Peer{}, false, &peerError{ErrBadPeer, "empty auth="}
			}
			p.ClientAuth = val
		default:
			if isFieldName(key) {
				return Peer{}, false, &peerError{ErrBadPeer, fmt.Sprintf("unknown field %q (want addr=, auth=, next= or until=)", key)}
			}
			return Peer{}, false, &peerError{ErrBadPeer, "unknown field (want addr=, auth=, next= or until=)"}
		}
	}
	p, err = normalizePeer(p)
	if err != nil {
		return Peer{}, false, err
	}
	return p, true, nil
}

func isFieldName(s string) bool {
	if s == "" || len(s) > 16 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' && c != '-' {
			return false
		}
	}
	return true
}

// normalizePeer checks p and returns it with Address and ClientAuth in
// canonical form.
func normalizePeer(p Peer) (Peer, error) {
	if err := checkName(p.Name); err != nil {
		return Peer{}, err
	}
	if p.PublicKey.IsZero() {
		return Peer{}, &peerError{ErrBadKey, fmt.Sprintf("peer %q has no public key", p.Name)}
	}
	if p.Address != "" {
		a, err := normalizeAddress(p.Address)
		if err != nil {
			return Peer{}, &peerError{ErrBadPeer, fmt.Sprintf("peer %q: address: %v", p.Name, err)}
		}
		p.Address = a
	}
	if p.ClientAuth != "" {
		a, err := parseClientAuthPublic(p.ClientAuth)
		if err != nil {
			return Peer{}, keyError(fmt.Sprintf("peer %q: auth", p.Name), err)
		}
		p.ClientAuth = a
	}
	if p.NextKey.IsZero() != p.OverlapUntil.IsZero() {
		return Peer{}, &peerError{ErrBadPeer, fmt.Sprintf("peer %q: a rotation needs both next= (the new key) and until= (the end of the overlap)", p.Name)}
	}
	if !p.NextKey.IsZero() {
		if p.NextKey == p.PublicKey {
			return Peer{}, &peerError{ErrBadKey, fmt.Sprintf("peer %q: the next key is its current key", p.Name)}
		}
		if p.NextKey.Curve() != p.PublicKey.Curve() {
			return Peer{}, &peerError{ErrBadKey, fmt.Sprintf("peer %q: the next key is %s and the current one %s (a rotation keeps the curve)", p.Name, p.NextKey.Curve(), p.PublicKey.Curve())}
		}
		p.OverlapUntil = p.OverlapUntil.UTC().Truncate(time.Second)
		if y := p.OverlapUntil.Year(); y < 2000 || y > 9999 {
			return Peer{}, &peerError{ErrBadPeer, fmt.Sprintf("peer %q: until= must be in the years 2000 to 9999", p.Name)}
		}
	}
	return p, nil
}

// parseUntil parses the end of an overlap: RFC 3339 with seconds, in UTC
// ("Z") or with an offset, e.g. 2026-12-08T00:00:00Z.
func parseUntil(s string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, &peerError{ErrBadPeer, "until= is not an RFC 3339 time such as 2026-12-08T00:00:00Z"}
	}
	return t, nil
}

// checkName checks a peer name. It does not quote an invalid name.
func checkName(name string) error {
	if name == "" {
		return &peerError{ErrBadPeer, "empty peer name"}
	}
	if len(name) > maxNameLen {
		return &peerError{ErrBadPeer, "peer name is longer than 64 characters"}
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if ('a' <= c && c <= 'z') || ('0' <= c && c <= '9') {
			continue
		}
		if i > 0 && (c == '.' || c == '_' || c == '-') {
			continue
		}
		return &peerError{ErrBadPeer,
			"invalid peer name: use a-z, 0-9, '.', '_' and '-', starting with a letter or digit"}
	}
	return nil
}

// normalizeAddress checks a "host:port" address and returns its canonical
// form: IP addresses as netip prints them (IPv6 in brackets, IPv4-mapped
// IPv6 unmapped), host names and onion addresses in lower case.
func normalizeAddress(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", errors.New("want host:port")
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || port != strconv.FormatUint(n, 10) {
		return "", errors.New("port must be a number from 1 to 65535")
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return "", errors.New("IPv6 zones are not allowed")
		}
		return net.JoinHostPort(ip.Unmap().String(), port), nil
	}
	host = strings.ToLower(host)
	if strings.HasSuffix(host, ".onion") {
		if err := checkOnion(host); err != nil {
			return "", err
		}
		return host + ":" + port, nil
	}
	if err := checkHostname(host); err != nil {
		return "", err
	}
	return host + ":" + port, nil
}

// checkHostname checks a lower-case DNS host name (RFC 1123 labels).
func checkHostname(host string) error {
	bad := errors.New("host must be an IP address, a DNS name or a v3 onion address")
	if host == "" || len(host) > 253 {
		return bad
	}
	labels := strings.Split(host, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return bad
		}
		for i := 0; i < len(l); i++ {
			if c := l[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return bad
			}
		}
	}
	// An all-digit last label means a malformed IP address, such as
	// "127.1" or "010.0.0.1", which resolvers read in surprising ways.
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return bad
	}
	return nil
}

// keyError wraps an ErrBadKey error from keys.go for a KeyringError,
// dropping its "noisetor: " prefix since KeyringError adds its own.
func keyError(what string, err error) error {
	return &peerError{err, what + ": " + unprefixed(err)}
}

// A peerError is a keyring error whose message has no "noisetor: " prefix,
// for use inside KeyringError or after one, and that matches kind.
type peerError struct {
	kind error // ErrBadPeer, ErrDuplicatePeer, or an error matching ErrBadKey
	msg  string
}

func (e *peerError) Error() string { return e.msg }
func (e *peerError) Unwrap() error { return e.kind }

// A KeyringError reports a problem in a keyring file. Line is 1-based, or 0
// for a problem with the whole file. Err matches ErrBadPeer, ErrBadKey or
// ErrDuplicatePeer (with errors.Is) for a bad line.
type KeyringError struct {
	Path string // the file's path; empty for ParseKeyring
	Line int
	Err  error
}

// Error returns "noisetor: keyring <path>:<line>: <problem>".
func (e *KeyringError) Error() string {
	var where string
	switch {
	case e.Path != "" && e.Line > 0:
		where = e.Path + ":" + strconv.Itoa(e.Line)
	case e.Path != "":
		where = e.Path
	case e.Line > 0:
		where = "line " + strconv.Itoa(e.Line)
	}
	if where == "" {
		return "noisetor: keyring: " + e.Err.Error()
	}
	return "noisetor: keyring " + where + ": " + e.Err.Error()
}

// Unwrap returns e.Err.
func (e *KeyringError) Unwrap() error { return e.Err }
