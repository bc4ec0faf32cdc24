package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noisetor/noisetor"
)

func TestKeyringDiff(t *testing.T) {
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }
	line := map[string][]string{}
	for _, n := range []string{"alice", "bob", "bob-2", "carol", "dave"} {
		r := cli(t, "", "keygen", "-o", j(n+".key"), "--name", strings.TrimSuffix(n, "-2"))
		r.want(t, exitOK, "")
		line[n] = strings.Fields(r.stdout)
	}
	auth := strings.TrimSpace(cli(t, "", "client-auth-key", "-o", j("alice.auth")).stdout)
	pub := func(n string) noisetor.PublicKey {
		k, err := noisetor.ParsePublicKey(line[n][1])
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	write := func(name, text string) string {
		if err := os.WriteFile(j(name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return j(name)
	}
	l := func(n string, extra ...string) string { return strings.Join(append(line[n], extra...), " ") + "\n" }
	oldRing := write("old.keyring", l("alice", "addr=127.0.0.1:9000")+l("bob")+l("carol", "addr=127.0.0.1:9001"))
	newText := l("dave") + l("alice", "addr=127.0.0.1:9002", "auth="+auth) + l("bob-2")
	newRing := write("new.keyring", newText)
	oldKR, _ := noisetor.LoadKeyring(oldRing)
	newKR, _ := noisetor.LoadKeyring(newRing)

	r := cli(t, "", "keyring", "diff", oldRing, newRing)
	r.want(t, diffDifferent, "")
	if r.stderr != "" {
		t.Errorf("stderr: %s", r.stderr)
	}
	want := "changed alice\n" +
		"    key fingerprint      " + pub("alice").Fingerprint() + " (unchanged)\n" +
		"    addr                 old 127.0.0.1:9000\n" +
		"                         new 127.0.0.1:9002\n" +
		"    auth                 old none\n" +
		"                         new " + auth + "\n" +
		"changed bob\n" +
		"    key fingerprint      old " + pub("bob").Fingerprint() + "\n" +
		"                         new " + pub("bob-2").Fingerprint() + "\n" +
		"removed carol\n" +
		"    key fingerprint      " + pub("carol").Fingerprint() + "\n" +
		"    addr                 127.0.0.1:9001\n" +
		"added dave\n" +
		"    key fingerprint      " + pub("dave").Fingerprint() + "\n" +
		"\n" +
		"old keyring " + oldRing + ": 3 peers, fingerprint " + oldKR.Fingerprint() + "\n" +
		"new keyring " + newRing + ": 3 peers, fingerprint " + newKR.Fingerprint() + "\n" +
		"1 added, 1 removed, 2 changed\n"
	if r.stdout != want {
		t.Errorf("keyring diff printed\n%s\nwant\n%s", r.stdout, want)
	}

	// The same peers in another order, with comments: the same keyring.
	same := write("same.keyring", "# reordered\n"+l("carol", "addr=127.0.0.1:9001")+"\n"+l("bob", "# a comment")+l("alice", "addr=127.0.0.1:9000"))
	r = cli(t, "", "keyring", "diff", oldRing, same)
	r.want(t, diffSame, "")
	mustHave(t, r.stdout, "the keyrings are the same", "fingerprint "+oldKR.Fingerprint())
	if strings.Contains(r.stdout, "changed") || strings.Contains(r.stdout, "added") {
		t.Errorf("equal keyrings: %s", r.stdout)
	}

	// NEW from standard input.
	r = cli(t, newText, "keyring", "diff", oldRing, "-")
	r.want(t, diffDifferent, "")
	mustHave(t, r.stdout, "removed carol", "new keyring (standard input): 3 peers, fingerprint "+newKR.Fingerprint())

	// Trouble: exit status 2.
	bad := write("bad.keyring", l("alice")+"bob not-a-key\n")
	cli(t, "", "keyring", "diff", oldRing, bad).want(t, diffTrouble, "bad.keyring:2:")
	cli(t, "", "keyring", "diff", j("nope"), oldRing).want(t, diffTrouble, "no such file")
	cli(t, "bob x\n", "keyring", "diff", oldRing, "-").want(t, diffTrouble, "standard input")
	cli(t, "", "keyring", "diff", oldRing).want(t, diffTrouble, "missing the new keyring file (after the old keyring file)")
	cli(t, "", "keyring", "diff", "-", "-").want(t, diffTrouble, "only one")
	cli(t, "", "keyring", "diff", oldRing, newRing, "--addr", "1.2.3.4:5").want(t, diffTrouble, "for 'keyring add'")
	os.Chmod(newRing, 0o666)
	cli(t, "", "keyring", "diff", oldRing, newRing).want(t, diffTrouble, "chmod 644")
}

func mustHave(t *testing.T, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("output does not contain %q:\n%s", sub, s)
		}
	}
}
