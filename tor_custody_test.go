package noisetor

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/noisetor/noisetor/tortest"
)

// Tests of the Tor integration for custody links that stay up (issue 11):
// no local bypass, bounded dials, client authorization that survives
// NEWNYM, checks of an attached tor's SocksPort, onion-service defaults,
// recovery times and the reachability watchdog.

// ---- another local user ----------------------------------------------------

// torProbeEnv names the probes a copy of the test binary runs as another
// user: "kind|network|address|target" separated by newlines, where kind is
// "dial" (connect to network/address) or "socks" (connect through the SOCKS5
// server at network/address to target).
const torProbeEnv = "NOISETOR_TEST_PROBES"

// torRunProbes runs the probes of torProbeEnv and prints one line per
// probe: "ok" or "refused: <error>".
func torRunProbes(probes string) {
	for _, p := range strings.Split(probes, "\n") {
		f := strings.SplitN(p, "|", 4)
		if len(f) != 4 {
			fmt.Printf("bad probe %q\n", p)
			continue
		}
		var c net.Conn
		var err error
		switch f[0] {
		case "dial":
			c, err = net.DialTimeout(f[1], f[2], 10*time.Second)
		case "socks":
			var d proxy.Dialer
			if d, err = proxy.SOCKS5(f[1], f[2], nil, &net.Dialer{Timeout: 10 * time.Second}); err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				c, err = d.(proxy.ContextDialer).DialContext(ctx, "tcp", f[3])
				cancel()
			}
		}
		if err != nil {
			fmt.Printf("refused: %v\n", err)
			continue
		}
		c.Close()
		fmt.Println("ok")
	}
}

// torProbeAs runs probes in a copy of the test binary as uid and gid 65534
// (nobody) and returns one result per probe.
func torProbeAs(t *testing.T, dir string, probes []string) []string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The build directory of the test binary is private: copy it where
	// nobody can run it.
	exe := filepath.Join(dir, "probe.test")
	if _, err := os.Stat(exe); err != nil {
		b, err := os.ReadFile(self)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(exe, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(exe)
	cmd.Env = []string{torProbeEnv + "=" + strings.Join(probes, "\n")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("probe as uid 65534: %v: %s", err, stderr.String())
	}
	res := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(res) != len(probes) {
		t.Fatalf("probes %q gave %q", probes, res)
	}
	return res
}

// TestTorLocalUser: another local user (uid 65534, run as a child process)
// can reach neither the SOCKS port of a tor that StartTor launched, which
// would give it this machine's client-authorization keys, nor its control
// port, nor the listener behind an onion service, which would bypass client
// authorization. The same user does reach a socket that is open to it, so
// the probe itself works.
func TestTorLocalUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to run a child process as another user (uid 65534); CI runs the tests as root")
	}
	srv, _ := torPair(t)
	n := tortest.Shared(t)
	// Every directory above the data directory is open to others, so only
	// the data directory's own mode keeps them out.
	base, err := os.MkdirTemp("", "nt-uid-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(base)
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cli, err := StartTor(ctx, &TorConfig{DataDir: filepath.Join(base, "tor"), Torrc: n.TorrcLines(), Logger: torTestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if st, err := os.Stat(filepath.Join(base, "tor")); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("data directory: %v, %v", st.Mode(), err)
	}
	// No TCP listener at all.
	s, err := cli.session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.ctl.getInfo(ctx, "net/listeners/socks", "net/listeners/control")
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range info {
		for _, a := range parseQuotedList(v) {
			if !strings.HasPrefix(a, "unix:") {
				t.Errorf("%s lists %s, a TCP listener", k, a)
			}
		}
	}

	cak, _ := GenerateClientAuthKey(nil)
	// The service runs on another launched tor: its listener is a Unix
	// socket in that tor's data directory.
	l, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k"), Port: 80, ClientAuth: []string{cak.PublicKey()}, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go torServeEcho(l)
	if _, ok := l.LocalAddr().(*net.UnixAddr); !ok {
		t.Fatalf("the listener behind the onion service is %v, want a Unix socket", l.LocalAddr())
	}
	// This process, the owner, gets in through its tor.
	c, _, err := torFirstByte(ctx, &TorDialer{Tor: cli, ClientAuth: cak}, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// Sockets open to everyone, to show that the probe connects when it may.
	open := filepath.Join(base, "open.sock")
	ul, err := net.Listen("unix", open)
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	os.Chmod(open, 0o777)
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	for _, ln := range []net.Listener{ul, tl} {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	socks := cli.SocksAddr()
	probes := []string{
		"dial|unix|" + open + "|",
		"dial|tcp|" + tl.Addr().String() + "|",
		"socks|unix|" + socks + "|" + l.Addr().String(),
		"dial|unix|" + filepath.Join(base, "tor", torControlSocket) + "|",
		"dial|unix|" + l.LocalAddr().String() + "|",
	}
	res := torProbeAs(t, base, probes)
	t.Logf("as uid 65534: %q", res)
	if res[0] != "ok" || res[1] != "ok" {
		t.Fatalf("the probe cannot connect even to open sockets: %q", res[:2])
	}
	for i, what := range []string{"", "", "the SOCKS port (with our client-auth key)", "the control port", "the listener behind the onion service"} {
		if i >= 2 && (!strings.HasPrefix(res[i], "refused: ") || !strings.Contains(res[i], "permission denied")) {
			t.Errorf("uid 65534 reached %s: %s", what, res[i])
		}
	}
}

// ---- client authorization that survives ------------------------------------

// torSecondController opens a control connection of its own to a tor that
// StartTor launched, as nyx or a script would.
func torSecondController(t *testing.T, tr *Tor, onEvent func(code, data string)) *torControl {
	t.Helper()
	if onEvent == nil {
		onEvent = func(string, string) {}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	k, err := dialTorControl(ctx, "unix", filepath.Join(tr.cfg.DataDir, torControlSocket), "", onEvent)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.close)
	return k
}

// TestTorNewnymKeepsClientAuth: SIGNAL NEWNYM from another controller of the
// client's tor drops every client-auth key; dials go on working. So do they
// when another controller removes our key.
func TestTorNewnymKeepsClientAuth(t *testing.T) {
	srv, cli := torPair(t)
	cak, _ := GenerateClientAuthKey(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k"), Port: 80, ClientAuth: []string{cak.PublicKey()}, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go torServeEcho(l)
	d := &TorDialer{Tor: cli, ClientAuth: cak}
	dial := func(what string) {
		t.Helper()
		c, ttfb, err := torFirstByte(ctx, d, l.Addr().String())
		if err != nil {
			t.Fatalf("dial %s: %v", what, err)
		}
		torEcho(t, c, []byte("still authorized"))
		c.Close()
		t.Logf("dial %s: first byte after %v", what, ttfb.Round(time.Millisecond))
	}
	dial("before NEWNYM")

	newnym := make(chan struct{}, 4)
	other := torSecondController(t, cli, func(code, data string) {
		if code == "SIGNAL" && strings.TrimSpace(data) == "NEWNYM" {
			newnym <- struct{}{}
		}
	})
	if _, err := other.request(ctx, "SETEVENTS", "SETEVENTS SIGNAL"); err != nil {
		t.Fatal(err)
	}
	dials := 0
	for round := 1; round <= 2; round++ {
		// tor rate-limits NEWNYM to one per 10 s and delays the rest: wait
		// until it has acted.
		if _, err := other.request(ctx, "SIGNAL", "SIGNAL NEWNYM"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-newnym:
		case <-ctx.Done():
			t.Fatal("no NEWNYM event")
		}
		for i := range 3 {
			dial(fmt.Sprintf("%d after NEWNYM %d", i+1, round))
			dials++
		}
	}
	// Another controller removes our key: the next dial gets 0xF4, registers
	// the key again and retries.
	id := strings.TrimSuffix(l.OnionAddress(), ".onion")
	if _, err := other.request(ctx, "ONION_CLIENT_AUTH_REMOVE", "ONION_CLIENT_AUTH_REMOVE "+id); err != nil {
		t.Fatal(err)
	}
	// Drop circuits and cached descriptors too, so that the key is needed.
	if _, err := other.request(ctx, "SIGNAL", "SIGNAL NEWNYM"); err != nil {
		t.Fatal(err)
	}
	<-newnym
	if _, err := other.request(ctx, "ONION_CLIENT_AUTH_REMOVE", "ONION_CLIENT_AUTH_REMOVE "+id); err != nil {
		t.Fatal(err)
	}
	dial("after another controller removed our key")
	torRecord(t, "client auth across SIGNAL NEWNYM from another controller: %d of %d dials got in", dials+1, dials+1)
}

// ---- bounded dials and the watchdog ----------------------------------------

// TestTorDialTimeouts: a dial to an onion service that tor keeps failing
// to reach ends at RetryFor (or the context's deadline), with an error that
// matches context.DeadlineExceeded and ErrOnionUnreachable and says what
// tor last said.
func TestTorDialTimeouts(t *testing.T) {
	_, cli := torPair(t)
	nobody, _ := GenerateOnionKey(nil)
	addr := nobody.Address() + ":80"
	start := time.Now()
	_, err := (&TorDialer{Tor: cli, RetryFor: 3 * time.Second}).DialContext(context.Background(), "tcp", addr)
	took := time.Since(start)
	var de *TorDialError
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrOnionUnreachable) || !errors.As(err, &de) || de.Last == nil || de.Last.Reply != 0xF0 {
		t.Fatalf("dial of an unpublished service: %v", err)
	}
	if took > 6*time.Second || !strings.Contains(err.Error(), "descriptor not found") {
		t.Errorf("after %v: %v", took, err)
	}
	t.Logf("RetryFor 3s: %v after %v", err, took.Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start = time.Now()
	_, err = cli.DialContext(ctx, "tcp", addr)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Errorf("dial with a 2 s context: %v after %v", err, time.Since(start))
	}
	// Without retries, the one failure comes back as it is.
	_, err = (&TorDialer{Tor: cli, RetryFor: -1}).DialContext(context.Background(), "tcp", addr)
	if !errors.As(err, &de) || de.Reply != 0xF0 || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("dial without retries: %v", err)
	}
}

// TestTorFrozenNetwork freezes every relay of the private network (SIGSTOP:
// connections stay open, nothing moves), the way onion services fail while
// tor looks healthy. A dial without a deadline returns at RetryFor with a
// deadline error instead of waiting for tor's SocksTimeout. The service's
// reachability checks notice, report the service unreachable to the
// application, republish it (DEL_ONION + ADD_ONION), and report it
// reachable again once the relays are back.
func TestTorFrozenNetwork(t *testing.T) {
	n := tortest.Shared(t)
	srv, cli := torPair(t)
	p := newTorPeers(t, 443)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var mu sync.Mutex
	var states []OnionState
	ol, err := srv.ListenOnion(ctx, &OnionConfig{
		Key: p.onionKey, Port: 443, Keyring: p.server.Keyring,
		CheckInterval: 2 * time.Second, CheckTimeout: 8 * time.Second,
		OnStatus: func(st OnionStatus) {
			mu.Lock()
			states = append(states, st.State)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ol.Close()
	l := NewListener(ol, p.server)
	defer l.Close()
	go torServeEcho(l)
	waitState := func(want OnionState, timeout time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		for ol.Status().State != want {
			if time.Since(start) > timeout {
				t.Fatalf("onion service %v after %v, want %v (%+v)", ol.Status().State, timeout, want, ol.Status())
			}
			time.Sleep(50 * time.Millisecond)
		}
		return time.Since(start)
	}
	waitState(OnionReachable, time.Minute)
	d := &Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey, RetryFor: 5 * time.Second}}
	c, _, err := torFirstByte(ctx, d, p.addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	if err := n.FreezeRelays(); err != nil {
		t.Fatal(err)
	}
	frozen := true
	thaw := func() {
		if frozen {
			frozen = false
			if err := n.ThawRelays(); err != nil {
				t.Error(err)
			}
		}
	}
	defer thaw()
	frozenAt := time.Now()
	// A new circuit cannot be built: the dial ends at RetryFor.
	start := time.Now()
	nd := &TorDialer{Tor: cli, ClientAuth: p.clientKey, RetryFor: 5 * time.Second, isolation: "frozen-test"}
	_, err = nd.DialContext(context.Background(), "tcp", p.addr)
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrOnionUnreachable) || took > 9*time.Second {
		t.Errorf("dial through frozen relays: %v after %v; want a deadline error after 5s", err, took)
	}
	t.Logf("dial through frozen relays: %v after %v", err, took.Round(time.Millisecond))

	waitState(OnionUnreachable, 2*time.Minute)
	for ol.Status().Republished == 0 {
		if time.Since(frozenAt) > 2*time.Minute {
			t.Fatal("the watchdog did not republish the service")
		}
		time.Sleep(50 * time.Millisecond)
	}
	torRecord(t, "relays frozen: watchdog (checks every 2s, 8s timeout) reported the service unreachable after %.1fs and republished it", time.Since(frozenAt).Seconds())
	thaw()
	back := waitState(OnionReachable, 3*time.Minute)
	torRecord(t, "relays thawed: service reachable again (checked) after %.1fs", back.Seconds())
	// The service's own check got through; the client's tor may still hold
	// the descriptor from before the republish, whose introduction points
	// are gone, and must fetch the new one through relays that have just
	// resumed: give it 45 s, not the 5 s above.
	start = time.Now()
	rd := &Dialer{Config: p.wallet, NetDialer: &TorDialer{Tor: cli, ClientAuth: p.clientKey, RetryFor: 45 * time.Second}}
	c, _, err = torFirstByte(ctx, rd, p.addr)
	if err != nil {
		t.Fatalf("dial after the relays came back: %v", err)
	}
	c.Close()
	t.Logf("the client got in %v after the service was reachable again", time.Since(start).Round(time.Millisecond))
	mu.Lock()
	got := fmt.Sprint(states)
	mu.Unlock()
	for _, want := range []string{"reachable", "unreachable"} {
		if !strings.Contains(got, want) {
			t.Errorf("OnStatus saw %s, want %s among them", got, want)
		}
	}
	if !strings.Contains(p.logs.String()+torShared.logs.String(), "unreachable through Tor; publishing it again") {
		t.Error("no log record of the republication")
	}
	if ol.Status().Err != nil || ol.Status().Failures != 0 {
		t.Errorf("status after recovery: %+v", ol.Status())
	}
}

// ---- attached tors -----------------------------------------------------------

// TestTorAttachSocksFlags: AttachTor says what an attached tor's SocksPort
// lacks: ExtendedErrors (a warning, and dial errors that say so), or flags
// that break noisetor (NoIsolateSOCKSAuth, NoOnionTraffic: an error).
func TestTorAttachSocksFlags(t *testing.T) {
	n := tortest.Shared(t)
	srv, _ := torPair(t)
	ft := n.NewTor(t, &tortest.TorOptions{Name: "stock-tor"})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bc, err := ft.Control()
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	setSocks := func(v string) {
		t.Helper()
		if _, err := bc.SendRequest("SETCONF SocksPort=%q", v); err != nil {
			t.Fatal(err)
		}
	}
	for _, bad := range []string{"NoIsolateSOCKSAuth", "NoOnionTraffic"} {
		setSocks("127.0.0.1:auto " + bad)
		tr, err := AttachTor(ctx, ft.ControlAddr, nil)
		if err == nil {
			tr.Close()
		}
		if err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("SocksPort with %s: %v", bad, err)
		}
	}
	// A stock torrc: no ExtendedErrors. (An explicit port: tor keeps its
	// listener, and that listener's flags, for a new "auto" line.)
	fl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl.Close()
	setSocks(fl.Addr().String())
	var logs torBuffer
	tr, err := AttachTor(ctx, ft.ControlAddr, &TorAttachConfig{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if !strings.Contains(logs.String(), "lacks the ExtendedErrors flag") {
		t.Errorf("no warning about ExtendedErrors: %s", logs.String())
	}
	// A service that does not authorize this tor: without ExtendedErrors
	// it is a "general failure", and the error says why tor says no more.
	cak, _ := GenerateClientAuthKey(nil)
	l, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k"), Port: 80, ClientAuth: []string{cak.PublicKey()}, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = (&TorDialer{Tor: tr, RetryFor: -1}).DialContext(ctx, "tcp", l.Addr().String())
	if err == nil || !strings.Contains(err.Error(), "lacks the ExtendedErrors flag") {
		t.Errorf("dial through a SocksPort without ExtendedErrors: %v", err)
	}
	t.Logf("without ExtendedErrors: %v", err)

	for _, c := range []struct {
		lines         []string
		network, addr string
		want          string
	}{
		{[]string{"127.0.0.1:9050 ExtendedErrors"}, "tcp", "127.0.0.1:9050", "127.0.0.1:9050 ExtendedErrors"},
		{[]string{"9050", "127.0.0.1:9150 ExtendedErrors"}, "tcp", "127.0.0.1:9150", "127.0.0.1:9150 ExtendedErrors"},
		{[]string{`unix:"/run/tor/socks" ExtendedErrors`, "9050"}, "unix", "/run/tor/socks", `unix:"/run/tor/socks" ExtendedErrors`},
		{[]string{"127.0.0.1:auto"}, "tcp", "127.0.0.1:41234", "127.0.0.1:auto"},
	} {
		if got, ok := matchSocksPortLine(c.lines, c.network, c.addr); !ok || got != c.want {
			t.Errorf("matchSocksPortLine(%q, %s) = %q, %v; want %q", c.lines, c.addr, got, ok, c.want)
		}
	}
}

// TestTorAttachReconnect: an attached Tor finds its tor again within a
// second of tor's control port coming back, however long tor was away.
func TestTorAttachReconnect(t *testing.T) {
	n := tortest.Shared(t)
	ft := n.NewTor(t, &tortest.TorOptions{Name: "returning-tor"})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tr, err := AttachTor(ctx, ft.ControlAddr, &TorAttachConfig{Logger: torTestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	var worst time.Duration
	for round := range 3 {
		ft.Stop()
		time.Sleep(time.Duration(2+round*2) * time.Second) // the backoff grows meanwhile
		up := make(chan time.Time, 1)
		go func() {
			// tor is back when its control port answers: it opens the
			// port early in its start-up and answers only once it is done.
			for {
				if c, err := net.Dial("tcp", ft.ControlAddr); err == nil {
					c.SetDeadline(time.Now().Add(10 * time.Second))
					fmt.Fprintf(c, "PROTOCOLINFO 1\r\n")
					line, err := bufio.NewReader(c).ReadString('\n')
					c.Close()
					if err == nil && strings.HasPrefix(line, "250") {
						up <- time.Now()
						return
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		back := make(chan time.Time, 1)
		go func() {
			for start := time.Now(); torPID(tr) == 0 && time.Since(start) < time.Minute; {
				time.Sleep(2 * time.Millisecond)
			}
			back <- time.Now()
		}()
		if err := ft.Start(ctx); err != nil {
			t.Fatal(err)
		}
		upAt, backAt := <-up, <-back
		if torPID(tr) == 0 {
			t.Fatal("did not reconnect within a minute")
		}
		d := backAt.Sub(upAt)
		worst = max(worst, d)
		t.Logf("round %d: reconnected %v after tor's control port answered again", round+1, d.Round(time.Millisecond))
	}
	torRecord(t, "attached tor back after 2-6 s away: reconnected within %v of its control port answering (worst of 3)", worst.Round(time.Millisecond))
	if worst > 3*time.Second {
		t.Errorf("reconnect took %v, want well under 1 s", worst)
	}
}

// ---- onion-service defaults ------------------------------------------------

// TestTorOnionDefaults: ADD_ONION carries MaxStreams with
// MaxStreamsCloseCircuit and proof-of-work where tor has it; the service
// port is in tor's LongLivedPorts; one client cannot hold more streams
// than MaxStreams on its circuit.
func TestTorOnionDefaults(t *testing.T) {
	srv, cli := torPair(t)
	if srv.pow != powYes {
		t.Logf("tor --list-modules does not report pow: yes; PoW is off")
	}
	cak, _ := GenerateClientAuthKey(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k"), Port: 7400, ClientAuth: []string{cak.PublicKey()}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	auth, _ := l.clientAuthKeys()
	cmd := l.addOnionCommand(auth)
	for _, want := range []string{" Flags=V3Auth,MaxStreamsCloseCircuit ", " MaxStreams=128", " Port=7400,unix:", " Port=65535,unix:"} {
		if !strings.Contains(cmd, want) {
			t.Errorf("ADD_ONION lacks %q", want)
		}
	}
	if got := strings.Contains(cmd, "PoWDefensesEnabled=1"); got != (srv.pow == powYes) {
		t.Errorf("PoWDefensesEnabled=1 sent: %v; tor has PoW: %v", got, srv.pow == powYes)
	}
	if strings.Count(cmd, "ClientAuthV3=") != 2 {
		t.Errorf("want the client's key and the checks' key in ClientAuthV3")
	}
	s, _ := srv.session(ctx)
	resp, err := s.ctl.request(ctx, "GETCONF", "GETCONF LongLivedPorts")
	if err != nil || !strings.Contains(resp.Reply+",", ",7400,") {
		t.Errorf("LongLivedPorts: %v %v", resp, err)
	}
	if _, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k2"), Port: 80, NoClientAuth: true, PoWDefense: 7}); err == nil {
		t.Error("accepted PoWDefense 7")
	}

	// MaxStreams 2: a third stream on the same circuit closes it.
	ml, err := srv.ListenOnion(ctx, &OnionConfig{KeyFile: filepath.Join(t.TempDir(), "k3"), Port: 80, ClientAuth: []string{cak.PublicKey()}, MaxStreams: 2, CheckInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer ml.Close()
	go torServeEcho(ml)
	// Five streams from one client, held open: tor puts a client's streams
	// to one address on one circuit, so at most two of them survive (a
	// client tor that spread them over circuits would still not get all
	// five through).
	d := &TorDialer{Tor: cli, ClientAuth: cak}
	var conns []net.Conn
	var refused []error
	for range 5 {
		c, _, err := torFirstByte(ctx, d, ml.Addr().String())
		if err != nil {
			refused = append(refused, err)
			continue
		}
		defer c.Close()
		conns = append(conns, c)
	}
	alive := 0
	for _, c := range conns {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		// "ing\n" is left of the first echo; then one more round trip.
		if _, err := c.Write([]byte("x")); err != nil {
			continue
		}
		if _, err := io.ReadFull(c, make([]byte, 5)); err == nil {
			alive++
		}
	}
	t.Logf("MaxStreams 2: %d of 5 streams alive, %d refused (%v)", alive, len(refused), refused)
	if alive == 5 {
		t.Error("five streams of one client got through MaxStreams 2")
	}
}
