package noisetor

import (
	"context"
	"slices"
	"sync"
	"time"
)

// Client authorization that follows the keyring. Tor has no control command
// to change the client-auth keys of an ephemeral service, so when the
// keyring of an OnionConfig changes its set of auth= keys, the service is
// republished (DEL_ONION and ADD_ONION with the same key, see republish):
// the new descriptor is encrypted to the new set only, so a removed peer's
// tor can no longer decrypt it, and the introduction points of the old one
// are gone. Established connections stay (a removed peer's are closed by
// liveConns, as without Tor).
//
// What Tor then refuses is a new rendezvous. A removed peer whose tor keeps
// a rendezvous circuit to the service can still open streams on it: tor
// has no way to close one client's circuits (the service does not learn
// which client a rendezvous is for), and closing them all would cut every
// peer. Those streams reach the listener, where the Noise handshake
// refuses the peer.

// authSync is the keyring watch of an OnionListener. stop, cancel and
// notes are guarded by OnionListener.mu; wake is set before the watch.
type authSync struct {
	stop   func()        // unregisters the keyring watcher; nil if none
	wake   chan struct{} // a keyring change to look at
	cancel context.CancelFunc
	wg     sync.WaitGroup

	notes map[string]string // peer name → "removed", "added", "changed", for the log
}

// authRetryMax bounds the wait between attempts to republish.
const authRetryMax = 30 * time.Second

// watchKeyring registers the keyring watcher, before the first publication
// reads the keyring, so that no change is missed. A change then wakes
// authLoop, which startAuthSync starts once the service is published.
func (l *OnionListener) watchKeyring() {
	if l.keyring == nil || l.noAuth {
		return
	}
	l.auth.wake = make(chan struct{}, 1)
	stop := l.keyring.watch(l.keyringChanged)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed { // by Tor.Close
		stop()
		return
	}
	l.auth.stop = stop
}

// keyringChanged notes whose authorization changed and wakes authLoop. It
// runs on the goroutine that changed the keyring, so it does not block.
func (l *OnionListener) keyringChanged(c KeyringChange) {
	was := make(map[string]string)
	for _, p := range c.Removed {
		if p.ClientAuth != "" {
			was[p.Name] = p.ClientAuth
		}
	}
	now := make(map[string]string)
	for _, p := range c.Added {
		if p.ClientAuth != "" {
			now[p.Name] = p.ClientAuth
		}
	}
	l.mu.Lock()
	note := func(name, what string) {
		if l.auth.notes == nil {
			l.auth.notes = make(map[string]string)
		}
		if prev, ok := l.auth.notes[name]; ok && prev != what {
			what = "changed"
		}
		l.auth.notes[name] = what
	}
	for name, a := range was {
		switch b, ok := now[name]; {
		case !ok:
			note(name, "removed")
		case a != b:
			note(name, "changed")
		}
	}
	for name := range now {
		if _, ok := was[name]; !ok {
			note(name, "added")
		}
	}
	wake := len(l.auth.notes) > 0
	l.mu.Unlock()
	if wake {
		select {
		case l.auth.wake <- struct{}{}:
		default:
		}
	}
}

// startAuthSync starts authLoop, once the service is first published.
func (l *OnionListener) startAuthSync() {
	ctx, cancel := context.WithCancel(l.t.ctx)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.auth.stop == nil {
		cancel()
		return
	}
	l.auth.cancel = cancel
	l.auth.wg.Add(1)
	go l.authLoop(ctx)
}

// stopAuthSync unregisters the watcher and stops authLoop. Like stopCheck,
// it must not be called with l.pubMu held.
func (l *OnionListener) stopAuthSync() {
	l.mu.Lock()
	stop, cancel := l.auth.stop, l.auth.cancel
	l.auth.stop, l.auth.cancel = nil, nil
	l.mu.Unlock()
	if stop != nil {
		stop()
	}
	if cancel != nil {
		cancel()
		l.auth.wg.Wait()
	}
}

// authLoop republishes the service whenever the keyring's client-auth keys
// differ from those tor has, retrying with backoff until it succeeds.
func (l *OnionListener) authLoop(ctx context.Context) {
	defer l.auth.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.auth.wake:
		}
		for backoff := time.Second; ; backoff = min(2*backoff, authRetryMax) {
			err := l.syncClientAuth(ctx)
			if err == nil || ctx.Err() != nil {
				break
			}
			l.t.log.Error("noisetor: republishing the onion service with the keyring's client authorizations; retrying",
				"onion", l.OnionAddress(), "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
		}
	}
}

// syncClientAuth republishes the service if the keyring's client-auth keys
// are not those it is published with on the current tor.
func (l *OnionListener) syncClientAuth(ctx context.Context) error {
	t := l.t
	t.mu.Lock()
	s := t.sess
	t.mu.Unlock()
	if s == nil {
		// The supervisor publishes it on the next tor, with the keyring
		// as it is then.
		return nil
	}
	// Under pubMu, so that no publication is under way: pubAuth is what
	// tor has.
	l.pubMu.Lock()
	want, wantErr := l.clientAuthKeys()
	l.mu.Lock()
	on := l.pubSess == s
	same := on && wantErr == nil && slices.Equal(l.pubAuth, slices.Sorted(slices.Values(want)))
	if same || (!on && wantErr != nil) {
		// Nothing to do; or withdrawn already (see below).
		l.auth.notes = nil
	}
	l.mu.Unlock()
	l.pubMu.Unlock()
	if same || (!on && wantErr != nil) {
		return nil
	}

	if err := l.spaceDescriptors(ctx); err != nil {
		return nil // closing
	}
	l.mu.Lock()
	notes := l.auth.notes
	l.auth.notes = nil
	l.mu.Unlock()
	var removed, added, changed []string
	for name, what := range notes {
		switch what {
		case "removed":
			removed = append(removed, name)
		case "added":
			added = append(added, name)
		default:
			changed = append(changed, name)
		}
	}
	slices.Sort(removed)
	slices.Sort(added)
	slices.Sort(changed)
	// Names only: the keys are public, but the log needs none of them.
	who := []any{"onion", l.OnionAddress(), "removed", removed, "added", added, "changed", changed}
	if wantErr == nil {
		l.t.log.Info("noisetor: the keyring's client authorizations changed; publishing the onion service again (established connections stay)",
			append(who, "client_auth_keys", len(want))...)
	}
	err := l.republish(false)
	if wantErr != nil {
		// No key left: tor has removed the service (DEL_ONION) and the
		// ADD_ONION was never sent, so nobody can reach it until the
		// keyring lists an auth= key again. Publishing it without client
		// authorization instead would open it to anyone with the address.
		l.mu.Lock()
		on = l.pubSess == s
		l.mu.Unlock()
		if !on {
			l.t.log.Error("noisetor: the keyring leaves the onion service no client-auth key; it is withdrawn from tor until the keyring has one",
				append(who, "err", wantErr)...)
			return nil
		}
	}
	return err
}

// spaceDescriptors waits, before a republish, for the upload of the
// descriptor of the service as tor has it (at most 30 s), and a second
// after the last upload. The revision counter of a descriptor counts
// seconds (tor's set_descriptor_revision_counter), and an HSDir keeps the
// descriptor it has unless the new one's counter is higher (hs_cache.c):
// of two uploads in one second, the second would be lost, and the HSDirs
// would keep serving the first, whose introduction points are gone.
func (l *OnionListener) spaceDescriptors(ctx context.Context) error {
	l.mu.Lock()
	ch := l.published
	if l.pubSess == nil {
		ch = nil // not on tor: no upload to come
	}
	l.mu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	l.mu.Lock()
	wait := time.Until(l.pubAt.Add(1100 * time.Millisecond))
	l.mu.Unlock()
	if wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
