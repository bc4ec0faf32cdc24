package noisetor

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// A peer removed from the server's keyring while connected: its connection
// ends within a second, its next dial is refused, and another peer's
// connection is untouched.
func TestKeyringRemoveEndsConnections(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "server", "alice", "bob")
	ln := listenServing(t, ps["server"].cfg, func(c net.Conn) { io.Copy(c, c) })
	dial := func(name string) (net.Conn, error) {
		return (&Dialer{Config: ps[name].cfg, Peer: "server"}).Dial("tcp", ln.Addr().String())
	}
	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		_, err := io.ReadFull(c, make([]byte, 4))
		return err
	}
	alice, err := dial("alice")
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	bob, err := dial("bob")
	if err != nil {
		t.Fatal(err)
	}
	defer bob.Close()
	if err := echo(alice); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if _, err := ps["server"].cfg.Keyring.Remove("alice"); err != nil {
		t.Fatal(err)
	}
	alice.SetReadDeadline(time.Now().Add(time.Second))
	_, err = alice.Read(make([]byte, 1))
	if err == nil || isTimeout(err) || errors.Is(err, io.EOF) {
		t.Fatalf("removed peer's connection: Read = %v, want it cut (not a clean end) within 1s", err)
	}
	t.Logf("removed peer's connection ended after %v: %v", time.Since(start).Round(time.Millisecond), err)
	if err := echo(bob); err != nil {
		t.Fatalf("the other peer's connection: %v", err)
	}
	if _, err := dial("alice"); !errors.Is(err, ErrRefused) {
		t.Fatalf("removed peer's next dial: %v, want ErrRefused", err)
	}
	mustContain(t, ps["server"].logs.String(), "noisetor: keyring changed", "removed.peer=alice", "no longer in the keyring")
}

// Update swaps a keyring for the one in a reloaded file; a file that fails
// to parse leaves the keyring as it was.
func TestKeyringUpdateFromFile(t *testing.T) {
	ps := newTestPeers(t, "server", "alice", "bob")
	ring := ps["server"].cfg.Keyring
	dir := t.TempDir()
	path := filepath.Join(dir, "server.keyring")
	next, _ := NewKeyring(Peer{Name: "bob", PublicKey: ps["bob"].key.PublicKey()},
		Peer{Name: "server", PublicKey: ps["server"].key.PublicKey()})
	if err := next.Save(path); err != nil {
		t.Fatal(err)
	}
	before := ring.Fingerprint()
	loaded, err := LoadKeyring(path)
	if err != nil {
		t.Fatal(err)
	}
	change := ring.Update(loaded)
	if len(change.Removed) != 1 || change.Removed[0].Name != "alice" || len(change.Added) != 0 {
		t.Fatalf("change %v, want alice removed", change)
	}
	if change.OldFingerprint != before || change.NewFingerprint != ring.Fingerprint() || change.NewFingerprint != next.Fingerprint() {
		t.Fatalf("fingerprints %s -> %s, keyring now %s", change.OldFingerprint, change.NewFingerprint, ring.Fingerprint())
	}
	if _, ok := ring.ByName("alice"); ok {
		t.Fatal("alice still in the keyring")
	}
	// A malformed file: LoadKeyring fails with the line, nothing changes.
	os.WriteFile(path, []byte("bob not-a-key\n"), 0o600)
	if _, err := LoadKeyring(path); err == nil {
		t.Fatal("malformed keyring loaded")
	} else {
		mustContain(t, err.Error(), "server.keyring:1:")
	}
	if ring.Fingerprint() != change.NewFingerprint {
		t.Fatal("a failed load changed the keyring")
	}
	if c := ring.Update(next); !c.IsZero() {
		t.Fatalf("updating to the same peers changed %v", c)
	}
}

// Keyring updates race with handshakes: under -race, every handshake sees
// either the old keyring or the new one.
func TestKeyringUpdateUnderHandshakes(t *testing.T) {
	checkNoGoroutineLeak(t)
	ps := newTestPeers(t, "server", "alice", "bob")
	ln := listenServing(t, ps["server"].cfg, nil)
	withAlice := ps["server"].cfg.Keyring.Peers()
	var withoutAlice []Peer
	for _, p := range withAlice {
		if p.Name != "alice" {
			withoutAlice = append(withoutAlice, p)
		}
	}
	ringA, _ := NewKeyring(withAlice...)
	ringB, _ := NewKeyring(withoutAlice...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, name := range []string{"alice", "bob"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				c, err := (&Dialer{Config: ps[name].cfg, Peer: "server"}).DialContext(ctx, "tcp", ln.Addr().String())
				// A dial cut by ctx's deadline can report "i/o timeout" a
				// moment before ctx.Err() is set.
				if err == nil {
					c.Close()
				} else if name == "bob" && ctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err) {
					t.Errorf("bob, never removed: %v", err)
					return
				}
			}
		}()
	}
	for i := 0; ctx.Err() == nil; i++ {
		if i%2 == 0 {
			ps["server"].cfg.Keyring.Update(ringB)
		} else {
			ps["server"].cfg.Keyring.Update(ringA)
		}
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
}

// Revocation through the sync server: a wallet removed from the sync
// server's keyring loses its relayed session within a second and cannot
// reach the watchtower again, and the watchtower's registration and another
// wallet's session go on; removed from the watchtower's own keyring instead,
// its session is cut by the watchtower, whatever the sync server does.
func TestKeyringRemoveEndsRelayedSessions(t *testing.T) {
	for _, remover := range []string{"sync", "tower"} {
		t.Run("removed by "+remover, func(t *testing.T) {
			n := newRelayTestNet(t, relayTestOpts{rules: RelayRules{{From: "*", To: "tower"}}}, "alice", "bob", "tower")
			n.tower(t, "tower", relayEcho)
			echo := func(c net.Conn) error {
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Write([]byte("ping")); err != nil {
					return err
				}
				_, err := io.ReadFull(c, make([]byte, 4))
				return err
			}
			sessions := map[string]net.Conn{}
			for _, name := range []string{"alice", "bob"} {
				c, err := n.client(name).Dial(relayCtx(t), "tower")
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if err := echo(c); err != nil {
					t.Fatal(err)
				}
				sessions[name] = c
			}

			start := time.Now()
			if _, err := n.peers[remover].cfg.Keyring.Remove("alice"); err != nil {
				t.Fatal(err)
			}
			alice := sessions["alice"]
			alice.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := alice.Read(make([]byte, 1)); err == nil || isTimeout(err) || errors.Is(err, io.EOF) {
				t.Fatalf("the removed wallet's relayed session: Read = %v, want it cut within a second", err)
			}
			t.Logf("relayed session cut after %v", time.Since(start).Round(time.Millisecond))
			if err := echo(sessions["bob"]); err != nil {
				t.Fatalf("the other wallet's session: %v", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if c, err := n.client("alice").Dial(ctx, "tower"); err == nil {
				c.Close()
				t.Fatal("the removed wallet reached the watchtower again")
			}
			c, err := n.client("bob").Dial(relayCtx(t), "tower")
			if err != nil {
				t.Fatalf("the other wallet's next session: %v", err)
			}
			c.Close()
		})
	}
}
