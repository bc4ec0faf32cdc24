package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/noisetor/noisetor"
)

// keyringRotate starts or finishes the rotation of a peer's key in a keyring
// file (WIRE.md §11.2.6).
func keyringRotate(e *env, o *keyringAddOptions, args []string) error {
	if o.finish {
		if o.until != "" {
			return usagef("--finish takes no --until")
		}
		if err := wantArgs(args, 2, 2, "the keyring file and the peer's name"); err != nil {
			return err
		}
	} else {
		if err := wantArgs(args, 3, 3, "the keyring file, the peer's name and its new public key"); err != nil {
			return err
		}
		if o.until == "" {
			return usagef("--until is required: the end of the overlap, when the old key stops working")
		}
	}
	path, name := args[0], args[1]
	kr, err := noisetor.LoadKeyring(path)
	if err != nil {
		return err
	}
	p, ok := kr.ByName(name)
	if !ok {
		return fmt.Errorf("%s has no peer named %s", path, echoArg(name))
	}
	now := time.Now()
	old := p
	if o.finish {
		if p.NextKey.IsZero() {
			return fmt.Errorf("%s: peer %s is not rotating its key", path, name)
		}
		if now.Before(p.OverlapUntil) {
			fmt.Fprintf(e.stderr, "noisetor keyring: warning: the overlap runs until %s; finishing now ends %s's sessions with its old key at once\n",
				p.OverlapUntil.Format(time.RFC3339), name)
		}
		p.PublicKey, p.NextKey, p.OverlapUntil = p.NextKey, noisetor.PublicKey{}, time.Time{}
	} else {
		if !p.NextKey.IsZero() {
			return fmt.Errorf("%s: peer %s is already rotating to the key with fingerprint %s (finish that first: keyring rotate --finish)", path, name, p.NextKey.Fingerprint())
		}
		if strings.Contains(strings.ToUpper(args[2]), "PRIVATE") {
			return fmt.Errorf("the new key argument is a private key; it is not shown. Give the PUBLIC key (noisetor pubkey), and treat that private key as exposed")
		}
		if p.NextKey, err = noisetor.ParsePublicKey(args[2]); err != nil {
			return fmt.Errorf("the new public key: %w", err)
		}
		if p.OverlapUntil, err = parseOverlapEnd(o.until, now); err != nil {
			return err
		}
	}
	next, err := replacePeer(kr, p)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := next.Save(path); err != nil {
		return err
	}
	p, _ = next.ByName(name)
	if o.finish {
		fmt.Fprintf(e.stderr, "noisetor keyring: %s: rotation finished; its only key now has fingerprint %s (the old key had %s)\n",
			name, p.PublicKey.Fingerprint(), old.PublicKey.Fingerprint())
	} else {
		fmt.Fprintf(e.stderr, "noisetor keyring: %s rotates its key until %s\n  old key fingerprint %s\n  new key fingerprint %s\n",
			name, p.OverlapUntil.Format(time.RFC3339), p.PublicKey.Fingerprint(), p.NextKey.Fingerprint())
	}
	fmt.Fprintf(e.stderr, "noisetor keyring: %s now has %s, fingerprint %s\n", path, nPeers(next.Len()), next.Fingerprint())
	return nil
}

// parseOverlapEnd parses --until: an RFC 3339 time or a duration from now.
func parseOverlapEnd(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		if !t.After(now) {
			return time.Time{}, fmt.Errorf("--until %s is in the past", s)
		}
		return t, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return time.Time{}, usagef("--until %s is neither an RFC 3339 time (2026-12-08T00:00:00Z) nor a positive duration (168h)", echoArg(s))
	}
	return now.Add(d), nil
}

// replacePeer returns a copy of kr with p in place of the peer of its name,
// checked as strictly as a keyring file.
func replacePeer(kr *noisetor.Keyring, p noisetor.Peer) (*noisetor.Keyring, error) {
	peers := kr.Peers()
	for i := range peers {
		if peers[i].Name == p.Name {
			peers[i] = p
		}
	}
	return noisetor.NewKeyring(peers...)
}
