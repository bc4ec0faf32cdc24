package tortest_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/cretz/bine/tor"
	"github.com/noisetor/noisetor/tortest"
	"golang.org/x/net/proxy"
)

func TestMain(m *testing.M) { tortest.Main(m) }

// TestOnionService publishes an onion service on one fixture tor with bine
// and reaches it through another tor's SOCKS port.
func TestOnionService(t *testing.T) {
	n := tortest.Shared(t)
	srv := n.NewTor(t, &tortest.TorOptions{Name: "service"})
	cli := n.NewTor(t, &tortest.TorOptions{Name: "client"})

	bt, err := srv.Bine()
	if err != nil {
		t.Fatal(err)
	}
	defer bt.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	onion, err := bt.Listen(ctx, &tor.ListenConf{Version3: true, RemotePorts: []int{80}})
	if err != nil {
		t.Fatal(err)
	}
	defer onion.Close()
	t.Logf("descriptor published in %.1fs: %s.onion", time.Since(start).Seconds(), onion.ID)
	go func() {
		for {
			c, err := onion.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()

	d, err := proxy.SOCKS5("tcp", cli.SocksAddr, nil, &net.Dialer{})
	if err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	for attempt := 1; ; attempt++ {
		c, err = d.(proxy.ContextDialer).DialContext(ctx, "tcp", onion.ID+".onion:80")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		t.Logf("dial attempt %d: %v", attempt, err)
		time.Sleep(time.Second)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	msg := []byte("through a private onion service")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q", got)
	}
	t.Logf("first echo %.1fs after Listen", time.Since(start).Seconds())
}

// TestTorRestart checks that a killed tor comes back on the same ports.
func TestTorRestart(t *testing.T) {
	n := tortest.Shared(t)
	tr := n.NewTor(t, &tortest.TorOptions{Name: "restart", ControlPassword: "correct horse"})
	ctl, socks := tr.ControlAddr, tr.SocksAddr

	tr.Kill()
	if tr.Running() {
		t.Fatal("Running after Kill")
	}
	if c, err := net.Dial("tcp", ctl); err == nil {
		c.Close()
		t.Fatal("control port still open after Kill")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := tr.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("restarted in %.1fs", tr.StartupTime.Seconds())
	if tr.ControlAddr != ctl || tr.SocksAddr != socks {
		t.Fatalf("ports moved: control %s -> %s, SOCKS %s -> %s", ctl, tr.ControlAddr, socks, tr.SocksAddr)
	}
	c, err := tr.Control()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	kv, err := c.GetInfo("version")
	if err != nil || len(kv) != 1 || !strings.HasPrefix(kv[0].Val, "0.4.") {
		t.Fatalf("GETINFO version = %v, %v", kv, err)
	}

	wrong := *tr
	wrong.ControlPassword = "wrong"
	if c, err := wrong.Control(); err == nil {
		c.Close()
		t.Fatal("authenticated with a wrong password")
	}
	if err := tr.Close(); err != nil || tr.Running() {
		t.Fatalf("Close: %v, running %v", err, tr.Running())
	}
}

// A name asked for twice (as a test run with -count=2 does) gets a second,
// distinct tor; a tor that fails to start is reported and does not break
// the network's teardown.
func TestTorNamesAndFailedStart(t *testing.T) {
	n := tortest.Shared(t)
	a := n.NewTor(t, &tortest.TorOptions{Name: "twice"})
	b := n.NewTor(t, &tortest.TorOptions{Name: "twice"})
	if a.Name == b.Name || a.DataDir == b.DataDir || a.SocksAddr == b.SocksAddr {
		t.Fatalf("two tors share a name or directory: %q %q, %q %q", a.Name, b.Name, a.DataDir, b.DataDir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bad, err := n.StartTor(ctx, &tortest.TorOptions{Name: "broken", Torrc: []string{"NoSuchTorOption 1"}})
	if err == nil {
		bad.Close()
		t.Fatal("a tor with an unknown torrc option started")
	}
	if !strings.Contains(err.Error(), "NoSuchTorOption") {
		t.Errorf("error does not say what tor refused: %v", err)
	}
}
