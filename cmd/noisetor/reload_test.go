package main

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noisetor/noisetor"
)

// fakeSIGHUP makes the commands run by the test hear a SIGHUP when the
// returned function is called, instead of the real signal (which would go
// to the whole test binary), and sets their keyring poll interval.
func fakeSIGHUP(t *testing.T, poll time.Duration) (hup func()) {
	var mu sync.Mutex
	chans := map[chan<- os.Signal]bool{}
	oldNotify, oldPoll := notifyReload, keyringPollInterval
	notifyReload = func(c chan<- os.Signal) func() {
		mu.Lock()
		defer mu.Unlock()
		chans[c] = true
		return func() {
			mu.Lock()
			defer mu.Unlock()
			delete(chans, c)
		}
	}
	keyringPollInterval = poll
	t.Cleanup(func() { notifyReload, keyringPollInterval = oldNotify, oldPoll })
	return func() {
		mu.Lock()
		defer mu.Unlock()
		if len(chans) == 0 {
			t.Fatal("no command is waiting for SIGHUP")
		}
		for c := range chans {
			c <- syscall.SIGHUP
		}
	}
}

// waitFor waits until w's output holds want.
func waitFor(t *testing.T, w *notifyWriter, want string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(w.String(), want); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the log does not mention %q:\n%s", want, w)
		}
	}
}

// expectCut checks that c is cut, not ended cleanly, within d of start.
func expectCut(t *testing.T, c net.Conn, start time.Time, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(start.Add(d))
	for {
		_, err := c.Read(make([]byte, 4096))
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, io.EOF) {
			t.Fatalf("connection of the removed peer: Read = %v, want it cut within %v", err, d)
		}
		t.Logf("the removed peer's connection was cut after %v: %v", time.Since(start).Round(time.Millisecond), err)
		return
	}
}

// serve reloads its keyring on SIGHUP, and only then when the file is not
// watched: before a connection, a peer removed from the file is refused, a
// bad file is reported with its line and changes nothing, and the peer put
// back is accepted; during a connection, the peer removed loses it within a
// second.
func TestServeReloadsKeyringOnSIGHUP(t *testing.T) {
	hup := fakeSIGHUP(t, -1)
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	clientLine := cli(t, "", "pubkey", "--name", "client", j("client.key")).stdout
	client := libConfig(t, j("client.key"), j("client.keyring"))
	stdin, stdinW := io.Pipe()
	defer stdinW.Close()
	addr, stderr, wait := serveLog(t, context.Background(), stdin, "-k", j("server.key"), "-r", j("server.keyring"), "--timeout", "5s")
	dial := func() (*noisetor.Conn, error) {
		c, err := (&noisetor.Dialer{Config: client, Peer: "server"}).Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		return c.(*noisetor.Conn), nil
	}

	cli(t, "", "keyring", "remove", j("server.keyring"), "client").want(t, exitOK, "")
	hup()
	waitFor(t, stderr, "removed.peer=client")
	mustHave(t, stderr.String(), "SIGHUP: reloading the keyring file", `msg="noisetor: keyring changed"`)
	if _, err := dial(); !errors.Is(err, noisetor.ErrRefused) {
		t.Fatalf("dial after the client was removed: %v, want ErrRefused", err)
	}

	os.WriteFile(j("server.keyring"), []byte("# bad\n"+strings.Replace(clientLine, "x25519:", "x25519:!", 1)), 0o644)
	hup()
	waitFor(t, stderr, "level=ERROR")
	mustHave(t, stderr.String(), "the old keyring stays in force", "server.keyring:2:", "line=2")

	os.Remove(j("server.keyring"))
	cli(t, clientLine, "keyring", "add", j("server.keyring"), "-").want(t, exitOK, "")
	hup()
	waitFor(t, stderr, "added.peer=client")
	c, err := dial()
	if err != nil {
		t.Fatalf("dial after the client was put back: %v", err)
	}
	defer c.Close()
	waitFor(t, stderr, "connected to client")

	// Not watched here: a change of the file alone does nothing.
	cli(t, "", "keyring", "remove", j("server.keyring"), "client").want(t, exitOK, "")
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("before SIGHUP: Read = %v, want the connection alive", err)
	}
	start := time.Now()
	hup()
	expectCut(t, c, start, time.Second)
	stdinW.Close()
	s := wait()
	s.want(t, exitFail, "")
	mustHave(t, s.stderr, "no longer in the keyring")
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// serve follows changes of its keyring file without a SIGHUP: a peer
// removed from the file (replaced by a rename, as 'keyring remove' does)
// loses its connection within a second.
func TestServeFollowsKeyringFile(t *testing.T) {
	fakeSIGHUP(t, 50*time.Millisecond)
	dir := t.TempDir()
	ceremony(t, dir)
	j := func(n string) string { return filepath.Join(dir, n) }
	client := libConfig(t, j("client.key"), j("client.keyring"))
	stdin, stdinW := io.Pipe()
	defer stdinW.Close()
	addr, stderr, wait := serveLog(t, context.Background(), stdin, "-q", "-k", j("server.key"), "-r", j("server.keyring"))
	c, err := (&noisetor.Dialer{Config: client, Peer: "server"}).Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, stderr, "connected to client")
	start := time.Now()
	cli(t, "", "keyring", "remove", j("server.keyring"), "client").want(t, exitOK, "")
	expectCut(t, c, start, time.Second)
	stdinW.Close()
	wait().want(t, exitFail, "")
}

// relay reloads its keyring too: a watchtower removed from the file loses
// its registration, and the change is logged.
func TestRelayReloadsKeyring(t *testing.T) {
	hup := fakeSIGHUP(t, -1)
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }
	line := map[string]string{}
	for _, r := range []string{"sync", "wallet", "tower"} {
		res := cli(t, "", "keygen", "-o", j(r+".key"))
		res.want(t, exitOK, "")
		line[r] = res.stdout
	}
	cli(t, line["wallet"]+line["tower"], "keyring", "add", j("sync.keyring"), "-").want(t, exitOK, "")
	addr := freeTCPAddr(t)
	os.WriteFile(j("relay.conf"), []byte("listen "+addr+"\nkey sync.key\nkeyring sync.keyring\nallow wallet tower\n"), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errw := startRelay(t, ctx, j("relay.conf"))
	os.WriteFile(j("tower.keyring"), []byte(strings.TrimSpace(line["sync"])+" addr="+addr+"\n"+line["wallet"]), 0o644)
	tower := &noisetor.RelayClient{Config: libConfig(t, j("tower.key"), j("tower.keyring")), Server: "sync"}
	ln, err := tower.Listen(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	waitFor(t, errw, "op=register")

	cli(t, "", "keyring", "remove", j("sync.keyring"), "tower").want(t, exitOK, "")
	hup()
	waitFor(t, errw, "no longer in the keyring")
	mustHave(t, errw.String(), "SIGHUP: reloading the keyring file", "removed.peer=tower")
	cancel() // the cleanup of startRelay checks that it exits cleanly
}
