package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noisetor/noisetor/tortest"
)

// startRelay runs "noisetor relay args..." until ctx ends and returns its
// live standard error once it serves; the cleanup checks that it exited
// cleanly.
func startRelay(t *testing.T, ctx context.Context, args ...string) *notifyWriter {
	t.Helper()
	errw := newNotifyWriter(`serving on (\S+) `)
	done := make(chan int, 1)
	go func() {
		done <- runContext(ctx, append([]string{"relay"}, args...), strings.NewReader(""), io.Discard, errw)
	}()
	select {
	case <-errw.match:
	case c := <-done:
		t.Fatalf("relay exited with %d: %s", c, errw)
	case <-time.After(60 * time.Second):
		t.Fatalf("relay did not start: %s", errw)
	}
	t.Cleanup(func() {
		select {
		case c := <-done:
			if c != exitOK {
				t.Errorf("relay exit status %d: %s", c, errw)
			}
		case <-time.After(10 * time.Second):
			t.Error("relay did not stop")
		}
	})
	return errw
}

// relayCeremony makes the keys of a sync server and of the given peers, the
// sync server's keyring and relay.conf (allowing wallet to reach tower), and
// for each peer a keyring listing the sync server (at addr) and the others.
func relayCeremony(t *testing.T, dir string, peers ...string) (relayConf, addr string) {
	t.Helper()
	j := func(n string) string { return filepath.Join(dir, n) }
	line := map[string]string{}
	for _, r := range append([]string{"sync"}, peers...) {
		res := cli(t, "", "keygen", "-o", j(r+".key"))
		res.want(t, exitOK, "")
		line[r] = res.stdout
	}
	var all string
	for _, p := range peers {
		all += line[p]
	}
	cli(t, all, "keyring", "add", j("sync.keyring"), "-").want(t, exitOK, "")
	addr = freeTCPAddr(t)
	os.WriteFile(j("relay.conf"), []byte("listen "+addr+"\nkey sync.key\nkeyring sync.keyring\nallow wallet tower\n"), 0o600)
	for _, p := range peers {
		ring := strings.TrimSpace(line["sync"]) + " addr=" + addr + "\n"
		for _, q := range peers {
			if q != p {
				ring += line[q]
			}
		}
		os.WriteFile(j(p+".keyring"), []byte(ring), 0o644)
	}
	return j("relay.conf"), addr
}

// serve --via and connect --via test a relayed link end to end, the way a
// watchtower's and a wallet's operators would.
func TestServeConnectVia(t *testing.T) {
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }
	conf, _ := relayCeremony(t, dir, "wallet", "tower", "other")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	relayLog := startRelay(t, ctx, conf)

	_, serveErr, wait := serveLog(t, context.Background(), strings.NewReader("hello wallet"),
		"--via", "sync", "-k", j("tower.key"), "-r", j("tower.keyring"))
	waitFor(t, relayLog, "op=register")
	mustHave(t, serveErr.String(), "listening on sync server sync")

	// A peer that the sync server's policy refuses, and an unknown one.
	cli(t, "", "connect", "--via", "sync", "-k", j("other.key"), "-r", j("other.keyring"), "--timeout", "5s", "tower").want(t, exitFail, "denied")
	cli(t, "", "connect", "--via", "sync", "-k", j("wallet.key"), "-r", j("wallet.keyring"), "nobody").want(t, exitFail, "not a peer")
	cli(t, "", "connect", "--via", "nobody", "-k", j("wallet.key"), "-r", j("wallet.keyring"), "tower").want(t, exitFail, "no peer of that name")

	r := cli(t, "hello tower", "connect", "--via", "sync", "-k", j("wallet.key"), "-r", j("wallet.keyring"), "tower")
	r.want(t, exitOK, "connected to tower through sync server sync")
	if r.stdout != "hello wallet" {
		t.Errorf("wallet received %q", r.stdout)
	}
	s := wait()
	s.want(t, exitOK, "connected to wallet")
	if s.stdout != "hello tower" {
		t.Errorf("tower received %q", s.stdout)
	}
	cancel()
}

// The relayed link over the private Tor network: the sync server is an onion
// service with client authorization for the wallet and the watchtower.
func TestServeConnectViaTor(t *testing.T) {
	n := tortest.Shared(t)
	syncTor := n.NewTor(t, &tortest.TorOptions{Name: "sync"})
	towerTor := n.NewTor(t, &tortest.TorOptions{Name: "tower"})
	walletTor := n.NewTor(t, &tortest.TorOptions{Name: "wallet"})
	dir := t.TempDir()
	j := func(f string) string { return filepath.Join(dir, f) }

	onion := cli(t, "", "onion-key", "-o", j("sync.onion-key"), "--port", "7400")
	onion.want(t, exitOK, "")
	sync := cli(t, "", "keygen", "-o", j("sync.key"), "--addr", strings.TrimSpace(onion.stdout))
	sync.want(t, exitOK, "")
	for _, p := range []string{"wallet", "tower"} {
		auth := cli(t, "", "client-auth-key", "-o", j(p+".auth-key"))
		auth.want(t, exitOK, "")
		line := cli(t, "", "keygen", "-o", j(p+".key"))
		line.want(t, exitOK, "")
		cli(t, "", append([]string{"keyring", "add", j("sync.keyring")}, append(strings.Fields(line.stdout), "--auth", strings.TrimSpace(auth.stdout))...)...).want(t, exitOK, "")
		cli(t, sync.stdout, "keyring", "add", j(p+".keyring"), "-").want(t, exitOK, "")
	}
	for _, p := range [][2]string{{"wallet", "tower"}, {"tower", "wallet"}} {
		pub := cli(t, "", "pubkey", j(p[1]+".key"))
		cli(t, "", "keyring", "add", j(p[0]+".keyring"), p[1], strings.TrimSpace(pub.stdout)).want(t, exitOK, "")
	}
	addr := freeTCPAddr(t)
	os.WriteFile(j("relay.conf"), []byte("listen "+addr+"\nkey sync.key\nkeyring sync.keyring\nallow wallet tower\n"), 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	errw := startRelay(t, ctx, "--tor-control", syncTor.ControlAddr, "--onion-key", j("sync.onion-key"), j("relay.conf"))
	t.Logf("sync server's onion service published in %.1fs", time.Since(start).Seconds())

	start = time.Now()
	_, _, wait := serveLog(t, context.Background(), strings.NewReader("hello wallet"),
		"--via", "sync", "-k", j("tower.key"), "-r", j("tower.keyring"),
		"--tor-control", towerTor.ControlAddr, "--client-auth-key", j("tower.auth-key"), "--timeout", "90s")
	waitFor(t, errw, "op=register")
	t.Logf("watchtower registered over tor in %.1fs", time.Since(start).Seconds())

	start = time.Now()
	r := cli(t, "hello tower", "connect", "--via", "sync", "-k", j("wallet.key"), "-r", j("wallet.keyring"),
		"--tor-control", walletTor.ControlAddr, "--client-auth-key", j("wallet.auth-key"), "--timeout", "90s", "tower")
	r.want(t, exitOK, "connected to tower through sync server sync")
	t.Logf("wallet's relayed connect over tor took %.1fs", time.Since(start).Seconds())
	if r.stdout != "hello wallet" {
		t.Errorf("wallet received %q", r.stdout)
	}
	if s := wait(); s.code != exitOK || s.stdout != "hello tower" {
		t.Errorf("tower: exit %d, received %q: %s", s.code, s.stdout, s.stderr)
	}
	cancel()
}
