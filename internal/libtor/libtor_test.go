//go:build embedtor && cgo

package libtor_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cretz/bine/process"
	"github.com/cretz/bine/tor"
	"golang.org/x/net/proxy"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/internal/libtor"
	"github.com/noisetor/noisetor/tortest"
)

// parentEnv makes the test binary act as a program that starts an embedded
// tor child and then dies (TestChildDiesWithParent).
const parentEnv = "NOISETOR_LIBTOR_TEST_PARENT"

func TestMain(m *testing.M) {
	if dir := os.Getenv(parentEnv); dir != "" {
		parentHelper(dir)
		return
	}
	tortest.Main(m)
}

// offlineConf starts a tor that stays off the network (DisableNetwork):
// enough for everything but the onion round trips.
func offlineConf(t *testing.T, cr process.Creator, embeddedConn bool) *tor.StartConf {
	return &tor.StartConf{
		ProcessCreator:         cr,
		UseEmbeddedControlConn: embeddedConn,
		DataDir:                filepath.Join(t.TempDir(), "data"),
		NoAutoSocksPort:        true,
		// GeoIP parsing costs a CPU-second per tor.
		ExtraArgs: []string{"--GeoIPFile", "", "--GeoIPv6File", ""},
	}
}

// networkConf starts a tor that joins the private network n.
func networkConf(t *testing.T, cr process.Creator, n *tortest.Network) *tor.StartConf {
	dir := t.TempDir()
	torrc := filepath.Join(dir, "torrc")
	if err := os.WriteFile(torrc, []byte(n.Torrc()), 0o600); err != nil {
		t.Fatal(err)
	}
	return &tor.StartConf{
		ProcessCreator:         cr,
		UseEmbeddedControlConn: true,
		DataDir:                filepath.Join(dir, "data"),
		TorrcFile:              torrc,
		EnableNetwork:          true,
		NoAutoSocksPort:        true,
	}
}

func getInfo(t *testing.T, tr *tor.Tor, key string) string {
	t.Helper()
	kv, err := tr.Control.GetInfo(key)
	if err != nil || len(kv) != 1 {
		t.Fatalf("GETINFO %s: %v %v", key, kv, err)
	}
	return kv[0].Val
}

// exited reports whether pid is gone or a zombie.
func exited(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || strings.HasPrefix(s[i+1:], " Z")
}

func waitExited(t *testing.T, pid int, d time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if exited(pid) {
			return
		}
	}
	syscall.Kill(pid, syscall.SIGKILL)
	t.Fatalf("tor process %d still running %v later", pid, d)
}

func TestVersion(t *testing.T) {
	if !libtor.Available {
		t.Fatal("Available is false in an embedtor build")
	}
	v := libtor.Version()
	t.Logf("embedded %s, Debian source %s, GPL %v", v, libtor.DebianVersion(), libtor.GPL())
	f := strings.Split(strings.TrimPrefix(v, "tor "), ".")
	if !strings.HasPrefix(v, "tor ") || len(f) < 3 {
		t.Fatalf("Version() = %q", v)
	}
	minor, _ := strconv.Atoi(f[2])
	// The Tor network has refused clients older than 0.4.8 since mid-2025.
	if f[0] != "0" || f[1] != "4" || minor < 8 {
		t.Errorf("Version() = %q, want >= tor 0.4.8", v)
	}
	if d := libtor.DebianVersion(); !strings.HasPrefix(d, strings.TrimPrefix(v, "tor ")+"-") {
		t.Errorf("DebianVersion() = %q does not match %q", d, v)
	}
	if libtor.GPL() {
		t.Errorf("GPL() = true: the default build must not be covered by the GPL")
	}
}

// TestInProcess runs the one in-process tor this test binary may have: it
// joins the private network, publishes an onion service that a peer on a
// tortest tor (embedded too) reaches with a noisetor handshake, and shows that the Go
// process keeps its panics, signals and descriptors while tor runs, that a
// second start and a restart are refused without harm, and that Go's
// crash handling survives tor's exit.
func TestInProcess(t *testing.T) {
	n := tortest.Shared(t)
	peer := n.NewTor(t, nil)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	tr, err := tor.Start(ctx, networkConf(t, libtor.NewInProcessCreator(), n))
	if err != nil {
		t.Fatalf("tor.Start: %v", err)
	}
	defer tr.Close()
	t.Logf("in-process tor %s controllable after %v", getInfo(t, tr, "version"), time.Since(start).Round(time.Millisecond))
	if pid := getInfo(t, tr, "process/pid"); pid != strconv.Itoa(os.Getpid()) {
		t.Errorf("tor pid %s, want this process (%d)", pid, os.Getpid())
	}

	t.Run("SignalHandlers", func(t *testing.T) {
		if err := libtor.CheckSignalHandlers(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("PanicsRecoverable", func(t *testing.T) { checkPanicsRecoverable(t) })
	t.Run("SIGINTReachesGo", func(t *testing.T) {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGINT)
		defer signal.Stop(ch)
		syscall.Kill(os.Getpid(), syscall.SIGINT)
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			t.Fatal("SIGINT did not reach signal.Notify while tor runs")
		}
		if _, err := tr.Control.GetInfo("version"); err != nil {
			t.Fatalf("tor did not survive SIGINT: %v", err)
		}
	})
	t.Run("NoDescriptorLeak", func(t *testing.T) {
		out, err := exec.Command("/bin/sh", "-c", "ls -l /proc/$$/fd").Output()
		if err != nil || !strings.Contains(string(out), "/dev/") {
			t.Fatalf("listing a child's descriptors: %v\n%s", err, out)
		}
		if strings.Contains(string(out), "socket:") {
			t.Fatalf("a child process inherited sockets:\n%s", out)
		}
	})
	t.Run("SecondStartRefused", func(t *testing.T) {
		for _, embedded := range []bool{true, false} {
			err := startShouldFail(t, offlineConf(t, libtor.NewInProcessCreator(), embedded))
			if !errors.Is(err, libtor.ErrInProcessUsed) || !strings.Contains(err.Error(), "running") {
				t.Errorf("second in-process start (embedded conn %v): %v, want ErrInProcessUsed", embedded, err)
			}
		}
	})
	t.Run("NoiseOverOnion", func(t *testing.T) { noiseOverOnion(t, tr, peer) })

	begin := time.Now()
	if err := tr.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	t.Logf("tor stopped in %v", time.Since(begin).Round(time.Millisecond))

	t.Run("RestartRefused", func(t *testing.T) {
		err := startShouldFail(t, offlineConf(t, libtor.NewInProcessCreator(), true))
		if !errors.Is(err, libtor.ErrInProcessUsed) || !strings.Contains(err.Error(), "exited") {
			t.Errorf("restart: %v, want ErrInProcessUsed", err)
		}
	})
	t.Run("AfterExit", func(t *testing.T) {
		if err := libtor.CheckSignalHandlers(); err != nil {
			t.Fatal(err)
		}
		checkPanicsRecoverable(t)
	})
}

// startShouldFail runs tor.Start, which must fail and must not hang: bine
// waits for a reply on the control connection when Start fails.
func startShouldFail(t *testing.T, conf *tor.StartConf) error {
	t.Helper()
	return startShouldFailCtx(t, context.Background(), conf)
}

func startShouldFailCtx(t *testing.T, ctx context.Context, conf *tor.StartConf) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		tr, err := tor.Start(ctx, conf)
		if err == nil {
			tr.Close()
			err = errors.New("tor.Start succeeded")
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Logf("refused: %v", err)
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("tor.Start hung")
		return nil
	}
}

//go:noinline
func divide(a, b int) int { return a / b }

// checkPanicsRecoverable raises Go panics that the runtime makes from
// signals (SIGSEGV, SIGFPE) and an ordinary one; each must be recovered.
func checkPanicsRecoverable(t *testing.T) {
	t.Helper()
	try := func(name string, f func()) {
		t.Helper()
		var got any
		func() {
			defer func() { got = recover() }()
			f()
		}()
		if got == nil {
			t.Errorf("%s: no panic recovered", name)
		}
		if name != "panic" {
			if _, ok := got.(runtime.Error); !ok {
				t.Errorf("%s: recovered %v (%T), want a runtime.Error", name, got, got)
			}
		}
	}
	try("panic", func() { panic("on purpose") })
	try("nil dereference", func() {
		var p *struct{ x int }
		p.x = 1
	})
	try("division by zero", func() { divide(1, 0) }) //lint:ignore SA4017 the call panics, which is the point
}

// noiseOverOnion publishes an onion service on tr and has the tortest tor
// peer reach it with a noisetor KK handshake.
func noiseOverOnion(t *testing.T, tr *tor.Tor, peer *tortest.Tor) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	onion, err := tr.Listen(ctx, &tor.ListenConf{Version3: true, RemotePorts: []int{9000}})
	if err != nil {
		t.Fatalf("publishing an onion service: %v", err)
	}
	defer onion.Close()
	t.Logf("onion service %s.onion published in %v", onion.ID, time.Since(start).Round(time.Millisecond))

	srvKey, err := noisetor.GenerateKey(noisetor.X25519, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cliKey, err := noisetor.GenerateKey(noisetor.X25519, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srvRing, err := noisetor.NewKeyring(noisetor.Peer{Name: "client", PublicKey: cliKey.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	cliRing, err := noisetor.NewKeyring(noisetor.Peer{Name: "service", PublicKey: srvKey.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	ln := noisetor.NewListener(onion, &noisetor.Config{StaticKey: srvKey, Keyring: srvRing})
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				p, _ := noisetor.PeerOf(c)
				fmt.Fprintf(c, "hello %s\n", p.Name)
				io.Copy(c, c)
			}()
		}
	}()

	socks, err := proxy.SOCKS5("tcp", peer.SocksAddr, nil, proxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	d := &noisetor.Dialer{
		Config:    &noisetor.Config{StaticKey: cliKey, Keyring: cliRing},
		NetDialer: socks.(proxy.ContextDialer),
		Peer:      "service",
	}
	start = time.Now()
	var c net.Conn
	for {
		c, err = d.DialContext(ctx, "tcp", onion.ID+".onion:9000")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("dialing the onion service: %v", err)
		}
		t.Logf("dial: %v (retrying)", err)
		time.Sleep(time.Second)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	r := bufio.NewReader(c)
	hello, err := r.ReadString('\n')
	if err != nil || hello != "hello client\n" {
		t.Fatalf("greeting %q, %v", hello, err)
	}
	t.Logf("noisetor handshake over the onion service in %v", time.Since(start).Round(time.Millisecond))
	if p, ok := noisetor.PeerOf(c); !ok || p.Name != "service" {
		t.Errorf("PeerOf = %v, %v", p, ok)
	}
	fmt.Fprintf(c, "ping through the embedded tor\n")
	if echo, err := r.ReadString('\n'); err != nil || echo != "ping through the embedded tor\n" {
		t.Fatalf("echo %q, %v", echo, err)
	}
}

// TestChild runs tors as child processes of this test binary: two at once,
// then a third after both stopped, each on the same embedded tor.
func TestChild(t *testing.T) {
	self, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	cr := libtor.NewCreator(nil)
	start := func(embedded bool) (*tor.Tor, int) {
		t.Helper()
		begin := time.Now()
		tr, err := tor.Start(context.Background(), offlineConf(t, cr, embedded))
		if err != nil {
			t.Fatalf("tor.Start: %v", err)
		}
		pid, _ := strconv.Atoi(getInfo(t, tr, "process/pid"))
		t.Logf("child tor %s, pid %d, controllable after %v (embedded control conn %v)",
			getInfo(t, tr, "version"), pid, time.Since(begin).Round(time.Millisecond), embedded)
		if pid == os.Getpid() {
			t.Fatalf("tor runs in the test process")
		}
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || exe != self {
			t.Errorf("tor pid %d runs %q (%v), want this test binary %q", pid, exe, err, self)
		}
		return tr, pid
	}
	a, pidA := start(true)
	b, pidB := start(false)
	for _, tr := range []*tor.Tor{a, b} {
		if err := tr.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}
	waitExited(t, pidA, 5*time.Second)
	waitExited(t, pidB, 5*time.Second)
	c, pidC := start(true)
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	waitExited(t, pidC, 5*time.Second)
}

// TestChildCancel: cancelling the context given to tor.Start stops the
// child, as it stops a tor executable.
func TestChildCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	tr, err := tor.Start(ctx, offlineConf(t, libtor.NewCreator(nil), true))
	if err != nil {
		t.Fatalf("tor.Start: %v", err)
	}
	pid, _ := strconv.Atoi(getInfo(t, tr, "process/pid"))
	cancel()
	done := make(chan error, 1)
	go func() { done <- tr.Process.Wait() }()
	select {
	case err := <-done:
		t.Logf("Wait after cancel: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatal("tor still running 15s after cancel")
	}
	waitExited(t, pid, 5*time.Second)
}

// TestChildStartFails: a child that cannot be started fails tor.Start with
// an error instead of leaving bine waiting on the control connection.
func TestChildStartFails(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // exec refuses to start a command whose context is done
	err := startShouldFailCtx(t, ctx, offlineConf(t, libtor.NewCreator(nil), true))
	if !errors.Is(err, context.Canceled) && !strings.Contains(err.Error(), "embedded tor") {
		t.Errorf("tor.Start: %v", err)
	}
}

// TestChildDiesWithParent: a child tor exits when the program that started
// it is killed (SIGKILL: no cleanup runs), because its owning control
// connection closes.
func TestChildDiesWithParent(t *testing.T) {
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), parentEnv+"="+t.TempDir())
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var pid int
	sc := bufio.NewScanner(out) // tor's warnings share the helper's stdout
	for pid == 0 && sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "TORPID "); ok {
			pid, _ = strconv.Atoi(v)
		}
	}
	if pid <= 0 {
		t.Fatalf("helper printed no tor pid (%v)", sc.Err())
	}
	if exited(pid) {
		t.Fatalf("tor %d not running", pid)
	}
	cmd.Process.Kill()
	cmd.Wait()
	killed := time.Now()
	waitExited(t, pid, 10*time.Second)
	t.Logf("orphaned tor %d exited %v after its parent was killed", pid, time.Since(killed).Round(time.Millisecond))
}

func parentHelper(dir string) {
	tr, err := tor.Start(context.Background(), &tor.StartConf{
		ProcessCreator:         libtor.NewCreator(nil),
		UseEmbeddedControlConn: true,
		DataDir:                filepath.Join(dir, "data"),
		NoAutoSocksPort:        true,
		ExtraArgs:              []string{"--GeoIPFile", "", "--GeoIPv6File", ""},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	kv, err := tr.Control.GetInfo("process/pid")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("TORPID %s\n", kv[0].Val)
	time.Sleep(time.Minute) // killed by the test long before
	os.Exit(1)
}

// TestChildOnion: the default creator's tor joins the private network and
// serves an onion service that a tortest tor peer reaches with noisetor.
func TestChildOnion(t *testing.T) {
	n := tortest.Shared(t)
	peer := n.NewTor(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tr, err := tor.Start(ctx, networkConf(t, libtor.NewCreator(nil), n))
	if err != nil {
		t.Fatalf("tor.Start: %v", err)
	}
	defer tr.Close()
	noiseOverOnion(t, tr, peer)
}
