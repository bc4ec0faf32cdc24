//go:build embedtor

package noisetor

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/noisetor/noisetor/internal/libtor"
	"github.com/noisetor/noisetor/tortest"
)

func TestEmbeddedTorVersion(t *testing.T) {
	v, ok := EmbeddedTorVersion()
	t.Logf("embedded: %s", v)
	if !ok || !strings.HasPrefix(v, "tor 0.4.") || !strings.Contains(v, "Debian source ") {
		t.Fatalf("EmbeddedTorVersion() = %q, %v", v, ok)
	}
	if defaultTorProcessCreator == nil {
		t.Fatal("defaultTorProcessCreator is nil in an embedtor build")
	}
}

// embeddedTorChildren returns the pids of the embedded tor children that
// this process started through the library. (The tortest network's tors are
// embedded tor children too; only the library's have __OwningControllerFD.)
func embeddedTorChildren(t *testing.T) []int {
	t.Helper()
	self, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var pids []int
	for _, d := range dirs {
		stat, err := os.ReadFile(d + "/stat")
		i := bytes.LastIndexByte(stat, ')')
		if err != nil || i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:])) // state, ppid, ...
		if len(f) < 2 || f[0] == "Z" || f[1] != strconv.Itoa(os.Getpid()) {
			continue
		}
		cmdline, _ := os.ReadFile(d + "/cmdline")
		args := strings.Split(string(cmdline), "\x00")
		if exe, _ := os.Readlink(d + "/exe"); exe == self && len(args) > 1 && args[1] == libtor.ChildArg &&
			slices.Contains(args, "__OwningControllerFD") {
			pid, _ := strconv.Atoi(filepath.Base(d))
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestEmbeddedTorOnion: with the embedtor tag, StartTor without ExePath runs
// the embedded tor (a child process of this test binary, no tor executable
// involved). It joins the private network, serves an onion service, and a
// peer on a tortest tor completes a noisetor handshake with it; after the
// embedded tor is killed, StartTor's supervisor starts it again and the
// service is reachable again.
func TestEmbeddedTorOnion(t *testing.T) {
	n := tortest.Shared(t)
	peer := n.NewTor(t, nil)

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	var logs syncBuffer
	tr, err := StartTor(ctx, &TorConfig{DataDir: filepath.Join(t.TempDir(), "tor"), Torrc: n.TorrcLines(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatalf("StartTor: %v", err)
	}
	defer tr.Close()
	// The tagged binary says which Tor it carries when it starts one.
	mustContain(t, logs.String(), `msg="noisetor: starting the embedded tor" version="tor 0.4.`)
	t.Logf("embedded tor bootstrapped in %v", time.Since(start).Round(time.Millisecond))
	pids := embeddedTorChildren(t)
	if len(pids) != 1 {
		t.Fatalf("embedded tor children: %v, want one", pids)
	}

	srvKey, err := GenerateKey(X25519, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cliKey, err := GenerateKey(X25519, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srvRing, err := NewKeyring(Peer{Name: "client", PublicKey: cliKey.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	cliRing, err := NewKeyring(Peer{Name: "service", PublicKey: srvKey.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	// The default build has no onion-service PoW: requiring it is refused
	// rather than silently ignored, and by default the service runs without
	// it, saying so.
	if !libtor.GPL() {
		if _, err := tr.ListenOnion(ctx, &OnionConfig{
			KeyFile: filepath.Join(t.TempDir(), "pow.key"), Port: 9001, NoClientAuth: true, PoWDefense: PoWRequire,
		}); err == nil || !strings.Contains(err.Error(), "without onion-service proof-of-work") {
			t.Fatalf("PoWRequire on the embedded tor: %v, want a refusal", err)
		}
	}
	start = time.Now()
	onion, err := tr.ListenOnion(ctx, &OnionConfig{
		KeyFile:      filepath.Join(t.TempDir(), "onion.key"),
		Port:         9000,
		NoClientAuth: true,
	})
	if err != nil {
		t.Fatalf("ListenOnion: %v", err)
	}
	t.Logf("onion service %s published in %v", onion.OnionAddress(), time.Since(start).Round(time.Millisecond))
	if !libtor.GPL() {
		mustContain(t, logs.String(), "runs without proof-of-work defense")
	}
	ln := NewListener(onion, &Config{StaticKey: srvKey, Keyring: srvRing})
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				p, _ := PeerOf(c)
				fmt.Fprintf(c, "hello %s\n", p.Name)
				io.Copy(c, c)
			}()
		}
	}()

	socks, err := proxy.SOCKS5("tcp", peer.SocksAddr, nil, proxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	d := &Dialer{
		Config:    &Config{StaticKey: cliKey, Keyring: cliRing},
		NetDialer: socks.(proxy.ContextDialer),
		Peer:      "service",
	}
	addr := onion.Addr().String()
	roundTrip := func() {
		t.Helper()
		start := time.Now()
		var c net.Conn
		for try := 1; ; try++ {
			// Each attempt is bounded: a tor holding a stale descriptor
			// otherwise waits out its 120 s SocksTimeout.
			actx, acancel := context.WithTimeout(ctx, 30*time.Second)
			c, err = d.DialContext(actx, "tcp", addr)
			acancel()
			if err == nil {
				break
			}
			if time.Since(start) > 90*time.Second {
				t.Fatalf("dialing %s: %v", addr, err)
			}
			if try == 1 {
				t.Logf("dial: %v (retrying)", err)
			}
			time.Sleep(time.Second)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		r := bufio.NewReader(c)
		if hello, err := r.ReadString('\n'); err != nil || hello != "hello client\n" {
			t.Fatalf("greeting %q, %v", hello, err)
		}
		fmt.Fprintf(c, "ping\n")
		if echo, err := r.ReadString('\n'); err != nil || echo != "ping\n" {
			t.Fatalf("echo %q, %v", echo, err)
		}
		t.Logf("noisetor round trip over the onion service in %v", time.Since(start).Round(time.Millisecond))
	}
	roundTrip()

	// A crashed tor: the supervisor starts a new child, which republishes
	// the same address.
	syscall.Kill(pids[0], syscall.SIGKILL)
	killed := time.Now()
	for {
		if p := embeddedTorChildren(t); len(p) == 1 && p[0] != pids[0] {
			t.Logf("embedded tor %d killed; %d running %v later", pids[0], p[0], time.Since(killed).Round(time.Millisecond))
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the embedded tor was not restarted")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("republished %v after the kill", torWaitPublications(t, onion, 2, time.Minute).Round(time.Millisecond))
	roundTrip()
}
