package main

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/internal/softhsm"
)

// ceremony is the key ceremony of the five roles, step by step as the
// operators would do it: the co-signer's token, every static key, the Tor
// keys, the keyrings, the check by phone; then each role's configuration.
func (d *demo) ceremony() error {
	for _, r := range demoRoles {
		if err := os.MkdirAll(filepath.Join(d.dir, r), 0o700); err != nil {
			return err
		}
	}
	tok, err := d.makeToken()
	if err != nil {
		return err
	}
	lines, err := d.makeStaticKeys(tok)
	if err != nil {
		return err
	}
	auth, err := d.makeTorKeys()
	if err != nil {
		return err
	}
	if err := d.writeKeyrings(lines, auth); err != nil {
		return err
	}
	if err := d.checkByPhone(); err != nil {
		return err
	}
	return d.writeRoleConfigs(tok)
}

// demoToken is the co-signer's SoftHSM token.
type demoToken struct {
	module, pinFile string
}

// args are the keygen flags that select the co-signer's key on the token.
func (t demoToken) args() []string {
	return []string{"--pkcs11", "--pkcs11-module", t.module, "--pkcs11-token", "cosigner",
		"--pkcs11-key", "cosigner", "--pkcs11-pin-file", t.pinFile}
}

// makeToken makes the token that will hold the co-signer's key (SoftHSM
// here; a real deployment uses an HSM or a USB token).
func (d *demo) makeToken() (demoToken, error) {
	store, err := softhsm.NewStore(filepath.Join(d.dir, "softhsm"))
	if err != nil {
		return demoToken{}, err
	}
	pin, err := randomDigits(8)
	if err != nil {
		return demoToken{}, err
	}
	soPIN, err := randomDigits(8)
	if err != nil {
		return demoToken{}, err
	}
	if _, err := store.InitToken("cosigner", pin, soPIN); err != nil {
		return demoToken{}, err
	}
	tok := demoToken{module: store.Module, pinFile: d.path("cosigner", "token.pin")}
	if err := os.WriteFile(tok.pinFile, []byte(pin+"\n"), 0o600); err != nil {
		return demoToken{}, err
	}
	// SoftHSM reads its configuration when the module is first loaded: this
	// process loads it only for keygen, the co-signer process for its DH.
	return tok, store.Setenv()
}

// makeStaticKeys makes every role's static key, the co-signer's on the
// token, and returns the ceremony lines.
func (d *demo) makeStaticKeys(tok demoToken) (map[string]string, error) {
	lines := make(map[string]string) // role -> ceremony line
	where := make(map[string]string)
	for _, r := range demoRoles {
		var args []string
		if r == "cosigner" {
			args = tok.args()
			where[r] = `SoftHSM token "cosigner" (never leaves it)`
		} else {
			args = []string{"-o", d.path(r, r+".key")}
			where[r] = r + "/" + r + ".key (mode 0600)"
		}
		line, pub, err := d.keygen(args...)
		if err != nil {
			return nil, err
		}
		lines[r], d.keys[r] = line, pub
	}
	d.printf("  Each operator makes a static key and reads its fingerprint to the others:\n")
	for _, r := range demoRoles {
		note := ""
		if r == "outsider" {
			note = "   (not in any keyring)"
		}
		d.printf("    %-10s  %s  in %s%s\n", r, d.keys[r].Fingerprint(), where[r], note)
	}
	return lines, nil
}

// keygen runs noisetor keygen with args and returns its ceremony line and
// the public key in it.
func (d *demo) keygen(args ...string) (string, noisetor.PublicKey, error) {
	line, err := d.cli(append([]string{"keygen"}, args...)...)
	if err != nil {
		return "", noisetor.PublicKey{}, err
	}
	pub, err := noisetor.ParsePublicKey(strings.Fields(line)[1])
	return line, pub, err
}

// makeTorKeys makes the listening roles' onion service keys, whose
// addresses go in the keyrings before the services first run, and the
// dialing roles' Tor client-authorization keys, so that only they can even
// find the services. It returns the client-auth public keys.
func (d *demo) makeTorKeys() (map[string]string, error) {
	for r, port := range map[string]int{"cosigner": cosignerPort, "syncserver": syncserverPort} {
		addr, err := d.cli("onion-key", "-o", d.path(r, r+".onion-key"), "--port", fmt.Sprint(port))
		if err != nil {
			return nil, err
		}
		d.onions[r] = addr
	}
	auth := make(map[string]string)
	for _, r := range []string{"wallet", "watchtower"} {
		pub, err := d.cli("client-auth-key", "-o", d.path(r, r+".auth-key"))
		if err != nil {
			return nil, err
		}
		auth[r] = pub
	}
	// The outsider has stolen the wallet's Tor client-authorization key,
	// but not its static key.
	stolen, err := os.ReadFile(d.path("wallet", "wallet.auth-key"))
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(d.path("outsider", "stolen-wallet.auth-key"), stolen, 0o600); err != nil {
		return nil, err
	}
	d.printf("  Onion services: cosigner %s\n                  syncserver %s\n", d.onions["cosigner"], d.onions["syncserver"])
	return auth, nil
}

// writeKeyrings gives each machine a keyring that lists only the peers it
// talks to.
func (d *demo) writeKeyrings(lines, auth map[string]string) error {
	type entry struct{ peer, addr, auth string }
	keyrings := map[string][]entry{
		"cosigner":   {{"wallet", "", auth["wallet"]}},
		"syncserver": {{"wallet", "", auth["wallet"]}, {"watchtower", "", auth["watchtower"]}},
		"watchtower": {{"syncserver", d.onions["syncserver"], ""}, {"wallet", "", ""}},
		"wallet":     {{"cosigner", d.onions["cosigner"], ""}, {"syncserver", d.onions["syncserver"], ""}, {"watchtower", "", ""}},
		"outsider":   {{"cosigner", d.onions["cosigner"], ""}, {"syncserver", d.onions["syncserver"], ""}},
	}
	d.printf("  Each machine's keyring (noisetor keyring add), with the fingerprint its operator reads out:\n")
	for _, r := range demoRoles {
		ring := d.path(r, r+".keyring")
		var names []string
		for _, en := range keyrings[r] {
			args := append([]string{"keyring", "add", ring}, strings.Fields(lines[en.peer])...)
			if en.addr != "" {
				args = append(args, "--addr", en.addr)
			}
			if en.auth != "" {
				args = append(args, "--auth", en.auth)
			}
			if _, err := d.cli(args...); err != nil {
				return err
			}
			names = append(names, en.peer)
		}
		fp, err := d.cli("fingerprint", ring)
		if err != nil {
			return err
		}
		d.printf("    %-10s  %s  lists %s\n", r, fp, strings.Join(names, ", "))
	}
	return nil
}

// checkByPhone is what the operators check by phone: the key each machine
// holds for a peer is the key that peer made.
func (d *demo) checkByPhone() error {
	kr, err := noisetor.LoadKeyring(d.path("wallet", "wallet.keyring"))
	if err != nil {
		return err
	}
	p, _ := kr.ByName("cosigner")
	if p.PublicKey != d.keys["cosigner"] {
		return errors.New("the wallet's keyring holds another key for the co-signer")
	}
	d.printf("  By phone: the co-signer's operator reads %s; the wallet's keyring entry\n  for cosigner has the same fingerprint, so the key arrived intact.\n", d.keys["cosigner"].Fingerprint())
	return nil
}

// writeRoleConfigs writes each role's configuration for its process.
func (d *demo) writeRoleConfigs(tok demoToken) error {
	for _, r := range demoRoles {
		rc := roleConfig{
			Role:        r,
			KeyringFile: d.path(r, r+".keyring"),
			TorDir:      d.path(r, "tor"),
		}
		switch r {
		case "cosigner":
			rc.PKCS11 = &roleToken{Module: tok.module, Token: "cosigner", Key: "cosigner", PINFile: tok.pinFile}
		default:
			rc.KeyFile = d.path(r, r+".key")
		}
		switch r {
		case "cosigner", "syncserver":
			rc.OnionKeyFile = d.path(r, r+".onion-key")
			rc.OnionPort = map[string]int{"cosigner": cosignerPort, "syncserver": syncserverPort}[r]
		case "wallet", "watchtower":
			rc.ClientAuthFile = d.path(r, r+".auth-key")
		case "outsider":
			rc.ClientAuthFile = d.path(r, "stolen-wallet.auth-key")
		}
		if err := d.writeRoleConfig(rc); err != nil {
			return err
		}
	}
	return nil
}

// writeRoleConfig writes rc as its role's role.json.
func (d *demo) writeRoleConfig(rc roleConfig) error {
	b, err := json.MarshalIndent(rc, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(d.path(rc.Role, "role.json"), b, 0o600)
}

// editRoleConfig changes role r's role.json with edit.
func (d *demo) editRoleConfig(r string, edit func(*roleConfig)) error {
	b, err := os.ReadFile(d.path(r, "role.json"))
	if err != nil {
		return err
	}
	var rc roleConfig
	if err := json.Unmarshal(b, &rc); err != nil {
		return err
	}
	edit(&rc)
	return d.writeRoleConfig(rc)
}

func randomDigits(n int) (string, error) {
	var b strings.Builder
	for range n {
		v, err := rand.Int(rand.Reader, big.NewInt(10))
		if err != nil {
			return "", err
		}
		b.WriteByte(byte('0' + v.Int64()))
	}
	return b.String(), nil
}
