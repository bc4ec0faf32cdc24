package noisetor

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"
)

// A KeyringChange describes one change of a Keyring: the peers added and
// removed, and the keyring's fingerprint before and after. A peer whose key,
// address or client-authorization key changed is both removed (old entry)
// and added (new entry).
type KeyringChange struct {
	Added, Removed []Peer
	OldFingerprint string
	NewFingerprint string
}

// IsZero reports that nothing changed.
func (c KeyringChange) IsZero() bool { return len(c.Added) == 0 && len(c.Removed) == 0 }

// String lists the names added and removed and both fingerprints, as the
// keyring change log record and `noisetor keyring diff` show them.
func (c KeyringChange) String() string {
	names := func(ps []Peer) string {
		var n []string
		for _, p := range ps {
			n = append(n, p.Name)
		}
		return strings.Join(n, ",")
	}
	return fmt.Sprintf("added [%s] removed [%s] fingerprint %s -> %s", names(c.Added), names(c.Removed), c.OldFingerprint, c.NewFingerprint)
}

// logAttrs are the attributes of the "keyring changed" log record.
func (c KeyringChange) logAttrs() []any {
	attrs := []any{"old_fingerprint", c.OldFingerprint, "new_fingerprint", c.NewFingerprint}
	entry := func(p Peer) []any {
		a := []any{"peer", p.Name, "key_fingerprint", p.PublicKey.Fingerprint()}
		if !p.NextKey.IsZero() {
			a = append(a, "next_key_fingerprint", p.NextKey.Fingerprint(), "overlap_until", p.OverlapUntil)
		}
		return a
	}
	for _, p := range c.Added {
		attrs = append(attrs, slog.Group("added", entry(p)...))
	}
	for _, p := range c.Removed {
		attrs = append(attrs, slog.Group("removed", entry(p)...))
	}
	return attrs
}

// Remove removes the peer called name and returns its entry. From that
// instant no new handshake with it succeeds, and every connection with it
// established under a Config that uses this keyring is closed.
func (k *Keyring) Remove(name string) (Peer, error) {
	k.mu.Lock()
	p, ok := k.byName[name]
	if !ok {
		k.mu.Unlock()
		return Peer{}, fmt.Errorf("noisetor: the keyring has no peer named %q", name)
	}
	old := k.fingerprintLocked()
	k.deleteLocked(p)
	change := KeyringChange{Removed: []Peer{p}, OldFingerprint: old, NewFingerprint: k.fingerprintLocked()}
	watchers := k.watchersLocked()
	k.mu.Unlock()
	notifyKeyringWatchers(watchers, change)
	return p, nil
}

// Update replaces the peers of k with those of next, atomically: a handshake
// sees either the old keyring or the new one. Connections whose peer is no
// longer in k, or whose proven key k no longer accepts for it, are closed as
// with Remove; a peer whose address or client-authorization key alone
// changed keeps its connections. It returns what
// changed; next is not modified and may be discarded.
//
// To reload a keyring file while running, parse it with LoadKeyring and, if
// that succeeded, Update the keyring in use with it; on an error the old
// keyring stays in force.
func (k *Keyring) Update(next *Keyring) KeyringChange {
	peers := next.Peers()
	k.mu.Lock()
	change := KeyringChange{OldFingerprint: k.fingerprintLocked()}
	want := make(map[string]Peer, len(peers))
	for _, p := range peers {
		want[p.Name] = p
	}
	for name, p := range k.byName {
		if q, ok := want[name]; !ok || !q.equal(p) {
			change.Removed = append(change.Removed, p)
		}
	}
	for _, p := range peers {
		if q, ok := k.byName[p.Name]; !ok || !q.equal(p) {
			change.Added = append(change.Added, p)
		}
	}
	byName := func(a, b Peer) int { return strings.Compare(a.Name, b.Name) }
	slices.SortFunc(change.Removed, byName)
	slices.SortFunc(change.Added, byName)
	for _, p := range change.Removed {
		k.deleteLocked(p)
	}
	for _, p := range change.Added {
		k.insert(p) // next's peers are normalised and unique among themselves
	}
	change.NewFingerprint = k.fingerprintLocked()
	watchers := k.watchersLocked()
	k.mu.Unlock()
	if !change.IsZero() {
		notifyKeyringWatchers(watchers, change)
	}
	return change
}

// deleteLocked removes p. k.mu must be held.
func (k *Keyring) deleteLocked(p Peer) {
	k.gen++
	delete(k.byName, p.Name)
	delete(k.byKey, p.PublicKey)
	if !p.NextKey.IsZero() {
		delete(k.byKey, p.NextKey)
	}
	if p.Address != "" {
		delete(k.byAddr, p.Address)
	}
}

// fingerprintLocked is Fingerprint with k.mu held.
func (k *Keyring) fingerprintLocked() string {
	peers := make([]Peer, 0, len(k.byName))
	for _, p := range k.byName {
		peers = append(peers, p)
	}
	return keyringFingerprint(peers)
}

// watch registers fn, called after every change of k (from the goroutine
// that made it, without k's lock). The returned function unregisters it.
func (k *Keyring) watch(fn func(KeyringChange)) (stop func()) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.watchers == nil {
		k.watchers = make(map[*func(KeyringChange)]struct{})
	}
	key := &fn
	k.watchers[key] = struct{}{}
	return func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		delete(k.watchers, key)
	}
}

func (k *Keyring) watchersLocked() []func(KeyringChange) {
	fns := make([]func(KeyringChange), 0, len(k.watchers))
	for fn := range k.watchers {
		fns = append(fns, *fn)
	}
	return fns
}

func notifyKeyringWatchers(fns []func(KeyringChange), change KeyringChange) {
	for _, fn := range fns {
		fn(change)
	}
}

// liveConns are the established connections of one Config, so that a peer
// removed from its keyring loses them (Tor does not do this for a client
// whose authorization is removed, and a stolen key must stop working at
// once). It also logs every change of the keyring.
type liveConns struct {
	cfg *Config

	once  sync.Once
	mu    sync.Mutex
	conns map[*Conn]*time.Timer // the end of the overlap of the key it proved, or nil
}

// track records an established connection (Close untracks it), or refuses
// it if the keyring no longer accepts the key it proved: the handshake
// checked the keyring when it began, and a Remove or Update since then was
// not applied to it. Checking under l.mu, after the watcher is registered,
// leaves no gap: a change before the check is seen by the check, one after
// it finds c in l.conns.
func (l *liveConns) track(c *Conn) error {
	l.once.Do(func() {
		if l.cfg.Keyring != nil {
			l.cfg.Keyring.watch(l.keyringChanged) // for the life of the Config
		}
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.stillAccepted(c) {
		return fmt.Errorf("%w: %q was removed from the keyring (or its key replaced) during the handshake", ErrUnknownPeer, c.state.Peer.Name)
	}
	if l.conns == nil {
		l.conns = make(map[*Conn]*time.Timer)
	}
	l.conns[c] = nil
	l.armOverlapEndLocked(c)
	c.live = l
	return nil
}

// armOverlapEndLocked (re)sets c's timer for the end of the overlap of the
// key it proved, from the keyring's current entry: a session authenticated
// with the key a rotation replaces ends with the overlap, so whoever holds
// the old key (perhaps because it leaked) keeps nothing past it. A rotation
// started, moved or dropped after the session began moves or stops the
// timer. l.mu must be held and c tracked.
func (l *liveConns) armOverlapEndLocked(c *Conn) {
	if t := l.conns[c]; t != nil {
		t.Stop()
	}
	l.conns[c] = nil
	if q, ok := l.cfg.Keyring.ByKey(c.state.PeerKey); ok && !q.NextKey.IsZero() && q.PublicKey == c.state.PeerKey {
		l.conns[c] = time.AfterFunc(q.OverlapUntil.Sub(l.cfg.now()), func() { l.recheck(c) })
	}
}

func (l *liveConns) untrack(c *Conn) {
	l.mu.Lock()
	if t := l.conns[c]; t != nil {
		t.Stop()
	}
	delete(l.conns, c)
	l.mu.Unlock()
}

// stillAccepted reports whether the keyring still accepts the key c proved
// for the peer it proved it for.
func (l *liveConns) stillAccepted(c *Conn) bool {
	return l.cfg.Keyring.stillAccepts(c.state.Peer.Name, c.state.PeerKey, l.cfg.now())
}

// recheck closes c if its key is no longer accepted, or waits for the end of
// an overlap that the keyring has moved.
func (l *liveConns) recheck(c *Conn) {
	l.mu.Lock()
	_, tracked := l.conns[c]
	revoke := tracked && !l.stillAccepted(c)
	if revoke {
		delete(l.conns, c)
	} else if tracked {
		l.armOverlapEndLocked(c)
	}
	l.mu.Unlock()
	if revoke {
		l.cfg.logger().Warn("noisetor: the overlap of a rotated key has ended; closing a connection authenticated with the old key",
			"peer", c.state.Peer.Name, "key_fingerprint", c.state.PeerKey.Fingerprint())
		c.revoke()
	}
}

// keyringChanged logs the change and closes the connections of every peer
// whose entry is gone.
func (l *liveConns) keyringChanged(change KeyringChange) {
	l.cfg.logger().Log(context.Background(), slog.LevelInfo, "noisetor: keyring changed", change.logAttrs()...)

	var revoked []*Conn
	l.mu.Lock()
	for c, t := range l.conns {
		if !l.stillAccepted(c) {
			if t != nil {
				t.Stop()
			}
			revoked = append(revoked, c)
			delete(l.conns, c)
		} else {
			l.armOverlapEndLocked(c) // a rotation may have begun or moved
		}
	}
	l.mu.Unlock()
	for _, c := range revoked {
		l.cfg.logger().Warn("noisetor: peer is no longer in the keyring; closing its connection",
			"peer", c.state.Peer.Name, "key_fingerprint", c.state.PeerKey.Fingerprint())
		c.revoke()
	}
}

// revoke ends c because its peer left the keyring: the underlying
// connection is cut at once, and c is marked closed and broken first so
// that nothing more is sent on it, a close record least of all (the peer
// reads a truncation, not a clean end); our side's Read and Write fail.
func (c *Conn) revoke() {
	c.in.broken.Store(true)
	c.activeCall.Or(1) // as Close: Writes and Close now return net.ErrClosed
	c.cut()
}

// cut closes the underlying connection at once. A relayed stream is cut
// without its linger (relayStream.Close): the outer connection may stay
// writable while lingering, and neither revoking nor the Listener, which
// drops connections with its mutex held, may wait relayLinger.
func (c *Conn) cut() {
	if s, ok := c.conn.(*relayStream); ok {
		s.setupDone()
		s.Conn.revoke() // no close record: it could wait closeRecordTimeout
		return
	}
	c.conn.Close()
}
