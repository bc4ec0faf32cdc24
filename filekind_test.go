package noisetor

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Swapped files get an error that names what the file is, never the advice
// for the other kind (chmod 600 on a keyring; "treat the key as exposed" for
// a key file given as the keyring).
func TestWrongKindOfFile(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t)
	keyFile := filepath.Join(dir, "a.key")
	if err := SavePrivateKey(keyFile, k); err != nil {
		t.Fatal(err)
	}
	ring, _ := NewKeyring(Peer{Name: "a", PublicKey: k.PublicKey()})
	ringFile := filepath.Join(dir, "a.keyring")
	if err := ring.Save(ringFile); err != nil {
		t.Fatal(err)
	}
	onion, err := GenerateOnionKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	onionFile := filepath.Join(dir, "onion.key")
	if err := os.WriteFile(onionFile, onion.MarshalPrivateText(), 0o600); err != nil {
		t.Fatal(err)
	}
	secret := strings.TrimSpace(string(k.MarshalPrivateText()))

	check := func(what string, err error, want string) {
		t.Helper()
		if !errors.Is(err, ErrWrongFile) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want ErrWrongFile saying %q", what, err, want)
			return
		}
		for _, bad := range []string{"chmod", "treat", secret[len(privateKeyPrefix):]} {
			if strings.Contains(err.Error(), bad) {
				t.Errorf("%s: %q says %q", what, err, bad)
			}
		}
	}
	_, err = LoadPrivateKey(ringFile) // mode 0644: it would be refused as a secret file
	check("keyring as key (0644)", err, "a.keyring is a noisetor keyring")
	os.Chmod(ringFile, 0o600)
	_, err = LoadPrivateKey(ringFile)
	check("keyring as key (0600)", err, "a.keyring is a noisetor keyring")
	_, err = LoadKeyring(keyFile)
	check("key as keyring", err, "a.key is a noisetor private key file, not a keyring")
	var ke *KeyringError
	if !errors.As(err, &ke) || !errors.Is(err, ErrBadKey) {
		t.Errorf("key as keyring: %T %v, want a *KeyringError matching ErrBadKey", err, err)
	}
	_, err = LoadPrivateKey(onionFile)
	check("onion key as key", err, "is a Tor onion service key file")

	// A key pasted into a real keyring is still reported as exposed.
	mixed := filepath.Join(dir, "mixed.keyring")
	os.WriteFile(mixed, []byte("a "+k.PublicKey().String()+"\n# "+secret+"\n"), 0o644)
	if _, err := LoadKeyring(mixed); errors.Is(err, ErrWrongFile) || !strings.Contains(err.Error(), "treat that key as exposed") {
		t.Errorf("a key inside a keyring: %v", err)
	}
}
