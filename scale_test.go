package noisetor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The scale run: 10,000 concurrent established connections on one Listener,
// and the resident memory of the listening process. It takes a while and a
// lot of file descriptors, so it runs only when asked for:
//
//	NOISETOR_SCALE=1 go test -run '^TestScale$' -v .
//
// The dialing side runs in a child process (this test binary again, as
// TestScaleClient) so that the RSS measured is the listener's alone. Each
// connection end, in both processes, has a goroutine blocked in Read, as an
// HTTP server's connection goroutine would be.

const (
	scaleConns   = 10_000
	scaleRSSGoal = 100 << 20
)

func TestScale(t *testing.T) {
	if os.Getenv("NOISETOR_SCALE") == "" {
		t.Skip("the scale run is opt-in: set NOISETOR_SCALE=1")
	}
	n := scaleConns
	if s := os.Getenv("NOISETOR_SCALE_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n <= 0 {
			t.Fatalf("NOISETOR_SCALE_CONNS=%q", s)
		}
	}
	raiseFileLimit(t, n+1000)

	dir := t.TempDir()
	serverKey := mustKey(t)
	clientKey := mustKey(t)
	kr, err := NewKeyring(
		Peer{Name: "server", PublicKey: serverKey.PublicKey()},
		Peer{Name: "client", PublicKey: clientKey.PublicKey()},
	)
	if err != nil {
		t.Fatal(err)
	}
	keyringPath, clientKeyPath := filepath.Join(dir, "keyring"), filepath.Join(dir, "client.key")
	if err := kr.Save(keyringPath); err != nil {
		t.Fatal(err)
	}
	if err := SavePrivateKey(clientKeyPath, clientKey); err != nil {
		t.Fatal(err)
	}

	log := &countingHandler{}
	ln, err := Listen("tcp", "127.0.0.1:0", &Config{StaticKey: serverKey, Keyring: kr, Logger: slog.New(log)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	runtime.GC()
	rssBefore := vmRSS(t)

	var (
		mu       sync.Mutex
		conns    []net.Conn
		readers  sync.WaitGroup
		cleanEOF atomic.Int64
		accepted = make(chan struct{}, n)
	)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			readers.Add(1)
			go func() {
				defer readers.Done()
				var buf [64]byte
				if _, err := c.Read(buf[:]); errors.Is(err, io.EOF) {
					cleanEOF.Add(1)
				}
				c.Close()
			}()
			accepted <- struct{}{}
		}
	}()

	child := exec.Command(os.Args[0], "-test.run=^TestScaleClient$", "-test.v")
	child.Env = append(os.Environ(),
		"NOISETOR_SCALE_CLIENT="+ln.Addr().String(),
		"NOISETOR_SCALE_CONNS="+strconv.Itoa(n),
		"NOISETOR_SCALE_KEY="+clientKeyPath,
		"NOISETOR_SCALE_KEYRING="+keyringPath,
	)
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Process.Kill()

	childReport := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if line, ok := strings.CutPrefix(sc.Text(), "SCALE-READY "); ok {
				childReport <- line
			}
		}
		close(childReport)
	}()
	for i := range n {
		select {
		case <-accepted:
		case <-time.After(60 * time.Second):
			t.Fatalf("only %d of %d connections accepted after %v; listener log:\n  %s", i, n, time.Since(start), log.summary())
		}
	}
	established := time.Since(start)
	report, ok := <-childReport
	if !ok {
		t.Fatal("the dialing process exited without reporting")
	}

	time.Sleep(200 * time.Millisecond) // every reader blocks in Read
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	rss := vmRSS(t)
	goroutines := runtime.NumGoroutine()

	t.Logf("%d connections established in %v (%.0f handshakes/s)", n, established.Round(time.Millisecond), float64(n)/established.Seconds())
	t.Logf("listening process: VmRSS %.1f MiB (%.1f MiB before the connections, %.0f B per connection); Go heap %.1f MiB live, goroutine stacks %.1f MiB, %d goroutines",
		mib(rss), mib(rssBefore), float64(rss-rssBefore)/float64(n), mib(ms.HeapAlloc), mib(ms.StackInuse), goroutines)
	t.Logf("dialing process: %s", report)
	if rss >= scaleRSSGoal {
		t.Errorf("VmRSS %.1f MiB with %d connections; goal < %.0f MiB", mib(rss), n, mib(scaleRSSGoal))
	}
	if got := log.ok.Load(); got != int64(n) {
		t.Errorf("listener logged %d successful handshakes, want %d (failures: %s)", got, n, log.summary())
	}

	// Hang up: the child closes every connection with a close record, and
	// every server-side reader must see a clean io.EOF.
	stdin.Close()
	if err := child.Wait(); err != nil {
		t.Errorf("dialing process: %v", err)
	}
	done := make(chan struct{})
	go func() { readers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("server readers still blocked 30s after the client closed")
	}
	if got := cleanEOF.Load(); got != int64(n) {
		t.Errorf("%d of %d connections ended with a clean close", got, n)
	}
}

// TestScaleClient is the dialing side of TestScale, run in a child process.
// It dials NOISETOR_SCALE_CONNS connections, parks a Read on each, prints its
// RSS, and closes them all when its stdin closes.
func TestScaleClient(t *testing.T) {
	addr := os.Getenv("NOISETOR_SCALE_CLIENT")
	if addr == "" {
		t.Skip("the dialing process of TestScale; runs only as its child")
	}
	n, err := strconv.Atoi(os.Getenv("NOISETOR_SCALE_CONNS"))
	if err != nil {
		t.Fatal(err)
	}
	raiseFileLimit(t, n+1000)
	key, err := LoadPrivateKey(os.Getenv("NOISETOR_SCALE_KEY"))
	if err != nil {
		t.Fatal(err)
	}
	kr, err := LoadKeyring(os.Getenv("NOISETOR_SCALE_KEYRING"))
	if err != nil {
		t.Fatal(err)
	}
	d := &Dialer{Config: &Config{StaticKey: key, Keyring: kr, Logger: slog.New(slog.DiscardHandler)}, Peer: "server"}

	conns := make([]net.Conn, n)
	var readers sync.WaitGroup
	var failures atomic.Int64
	next := atomic.Int64{}
	var dialers sync.WaitGroup
	for range 32 {
		dialers.Add(1)
		go func() {
			defer dialers.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				c, err := d.DialContext(ctx, "tcp", addr)
				cancel()
				if err != nil {
					if failures.Add(1) <= 5 {
						t.Errorf("dial %d: %v", i, err)
					}
					continue
				}
				conns[i] = c
				readers.Add(1)
				go func() {
					defer readers.Done()
					var buf [64]byte
					c.Read(buf[:])
				}()
			}
		}()
	}
	dialers.Wait()
	if f := failures.Load(); f > 0 {
		t.Fatalf("%d of %d dials failed", f, n)
	}
	time.Sleep(200 * time.Millisecond)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Printf("SCALE-READY VmRSS %.1f MiB; Go heap %.1f MiB live, goroutine stacks %.1f MiB, %d goroutines\n",
		mib(vmRSS(t)), mib(ms.HeapAlloc), mib(ms.StackInuse), runtime.NumGoroutine())

	io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
	readers.Wait()
}

// raiseFileLimit makes sure this process may hold need file descriptors.
func raiseFileLimit(t *testing.T, need int) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= uint64(need) {
		return
	}
	lim.Cur = uint64(need)
	lim.Max = max(lim.Max, lim.Cur)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("raising the open-file limit to %d: %v (try ulimit -n %d)", need, err, need)
	}
}

// vmRSS returns this process's resident set size from /proc/self/status.
func vmRSS(t testing.TB) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("VmRSS line %q: %v", line, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }
