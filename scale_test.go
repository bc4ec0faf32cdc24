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
	"runtime/pprof"
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
// NOISETOR_SCALE_HEAP=file also writes the listening process's heap profile
// with the connections established.
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

	// Several clients, as a watchtower serves many wallets: one peer may make
	// no more than peerReplayCacheSize handshakes within its salts' 10 to 20
	// minutes (preamble.go), and 10,000 from one would pass that.
	dir := t.TempDir()
	serverKey := mustKey(t)
	peers := []Peer{{Name: "server", PublicKey: serverKey.PublicKey()}}
	var clientKeyPaths []string
	for i := range (n + peerReplayCacheSize/2 - 1) / (peerReplayCacheSize / 2) {
		k := mustKey(t)
		peers = append(peers, Peer{Name: fmt.Sprintf("client-%d", i), PublicKey: k.PublicKey()})
		path := filepath.Join(dir, fmt.Sprintf("client-%d.key", i))
		if err := SavePrivateKey(path, k); err != nil {
			t.Fatal(err)
		}
		clientKeyPaths = append(clientKeyPaths, path)
	}
	kr, err := NewKeyring(peers...)
	if err != nil {
		t.Fatal(err)
	}
	keyringPath := filepath.Join(dir, "keyring")
	if err := kr.Save(keyringPath); err != nil {
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
		"NOISETOR_SCALE_KEYS="+strings.Join(clientKeyPaths, string(os.PathListSeparator)),
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
	if path := os.Getenv("NOISETOR_SCALE_HEAP"); path != "" {
		writeHeapProfile(t, path)
	}

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
// It dials NOISETOR_SCALE_CONNS connections, in turn with each key of
// NOISETOR_SCALE_KEYS, parks a Read on each, prints its RSS, and closes them
// all when its stdin closes.
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
	kr, err := LoadKeyring(os.Getenv("NOISETOR_SCALE_KEYRING"))
	if err != nil {
		t.Fatal(err)
	}
	var dialers []*Dialer
	for _, path := range filepath.SplitList(os.Getenv("NOISETOR_SCALE_KEYS")) {
		key, err := LoadPrivateKey(path)
		if err != nil {
			t.Fatal(err)
		}
		dialers = append(dialers, &Dialer{Config: &Config{StaticKey: key, Keyring: kr, Logger: slog.New(slog.DiscardHandler)}, Peer: "server"})
	}

	conns := make([]net.Conn, n)
	var readers sync.WaitGroup
	var failures atomic.Int64
	next := atomic.Int64{}
	var dialing sync.WaitGroup
	for range 32 {
		dialing.Add(1)
		go func() {
			defer dialing.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				c, err := dialers[i%len(dialers)].DialContext(ctx, "tcp", addr)
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
	dialing.Wait()
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

// writeHeapProfile writes the live heap's profile to path, for
// `go tool pprof -sample_index=inuse_space`.
func writeHeapProfile(t *testing.T, path string) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.WriteHeapProfile(f); err != nil {
		t.Fatal(err)
	}
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
