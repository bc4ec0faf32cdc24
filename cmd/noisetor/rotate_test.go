package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noisetor/noisetor"
)

// A rotation of the server's key from the command line: the client's keyring
// lists both keys, the server answers to both meanwhile, and finishing the
// rotation leaves only the new key.
func TestKeyringRotateCLI(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	next := cli(t, "", "keygen", "-o", j("server-next.key"))
	next.want(t, exitOK, "")
	nextPub := strings.Fields(next.stdout)[1]
	oldKey, err := noisetor.LoadPrivateKey(j("server.key"))
	if err != nil {
		t.Fatal(err)
	}
	nextKey, err := noisetor.ParsePublicKey(nextPub)
	if err != nil {
		t.Fatal(err)
	}

	cli(t, "", "keyring", "rotate", j("client.keyring"), "server", nextPub).want(t, exitUsage, "--until is required")
	cli(t, "", "keyring", "rotate", j("client.keyring"), "server", nextPub, "--until", "2001-01-01T00:00:00Z").want(t, exitFail, "in the past")
	r := cli(t, "", "keyring", "rotate", j("client.keyring"), "server", nextPub, "--until", "1h")
	r.want(t, exitOK, "old key fingerprint "+oldKey.PublicKey().Fingerprint())
	r.want(t, exitOK, "new key fingerprint "+nextKey.Fingerprint())
	cli(t, "", "keyring", "rotate", j("client.keyring"), "server", nextPub, "--until", "1h").want(t, exitFail, "already rotating")
	list := cli(t, "", "keyring", "list", j("client.keyring"))
	if !strings.Contains(list.stdout, "next key, until") || !strings.Contains(list.stdout, nextKey.Fingerprint()) {
		t.Errorf("keyring list does not show the next key:\n%s", list.stdout)
	}

	connect := func(addr string) result {
		return cli(t, "", "connect", "-k", j("client.key"), "-r", j("client.keyring"), "--peer", "server", "--timeout", "5s", addr)
	}
	// During the overlap the client dials the old key: the server that has
	// moved to the new key answers it through --previous-key.
	addr, wait := serve(t, context.Background(), strings.NewReader("hello"),
		"-k", j("server-next.key"), "--previous-key", j("server.key"), "-r", j("server.keyring"))
	if r := connect(addr); r.code != exitOK || r.stdout != "hello" {
		t.Errorf("connect during the overlap: exit %d, %q: %s", r.code, r.stdout, r.stderr)
	}
	wait().want(t, exitOK, "")
	// Without --previous-key it cannot.
	addr, wait = serve(t, context.Background(), strings.NewReader("hello"), "-k", j("server-next.key"), "-r", j("server.keyring"))
	connect(addr).want(t, exitFail, "")

	cli(t, "", "keyring", "rotate", "--finish", j("client.keyring"), "server").want(t, exitOK, "rotation finished")
	if r := connect(addr); r.code != exitOK || r.stdout != "hello" {
		t.Errorf("connect after the rotation: exit %d, %q: %s", r.code, r.stdout, r.stderr)
	}
	wait().want(t, exitOK, "")
	cli(t, "", "keyring", "rotate", "--finish", j("client.keyring"), "server").want(t, exitFail, "not rotating")
}
