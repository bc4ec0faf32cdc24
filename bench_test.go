package noisetor

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The benchmarks compare noisetor with crypto/tls 1.3 in the same run;
// scripts/bench.sh runs them with -count=5 and prints medians and ratios.
//
// Every noisetor side logs each handshake, as in production, to a text
// handler writing to io.Discard: the formatting cost is included, the I/O is
// not.

// benchPeers returns a client and a server config that know each other. The
// server accepts every pattern and cipher suite.
func benchPeers(b *testing.B, pattern Pattern, suite CipherSuite) (client, server *Config) {
	b.Helper()
	ps := newTestPeers(b, "client", "server")
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	client, server = ps["client"].cfg, ps["server"].cfg
	client.Logger, server.Logger = discard, discard
	client.Patterns, client.CipherSuites = []Pattern{pattern}, []CipherSuite{suite}
	server.Patterns, server.CipherSuites = []Pattern{KK, XK}, []CipherSuite{ChaChaPoly, AESGCM}
	return client, server
}

// benchTLS returns TLS 1.3 configs with mutual authentication: ECDSA P-256
// certificates for both sides, signed by one P-256 CA that each side trusts,
// and the default key exchange.
func benchTLS(b *testing.B) (client, server *tls.Config) {
	b.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "bench CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		b.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	leaf := func(serial int64, name string, usage x509.ExtKeyUsage) tls.Certificate {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: name},
			DNSNames:     []string{name},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			b.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	}
	server = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{leaf(2, "server", x509.ExtKeyUsageServerAuth)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}
	client = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{leaf(3, "client", x509.ExtKeyUsageClientAuth)},
		RootCAs:      pool,
		ServerName:   "server",
	}
	return client, server
}

func BenchmarkThroughput(b *testing.B) {
	b.Run("tcp", func(b *testing.B) {
		c, s := tcpPair(b)
		benchThroughput(b, c, s)
	})
	b.Run("tls13", func(b *testing.B) {
		cc, sc := benchTLS(b)
		c, s := tcpPair(b)
		tc, ts := tls.Client(c, cc), tls.Server(s, sc)
		errc := make(chan error, 1)
		go func() { errc <- ts.Handshake() }()
		if err := tc.Handshake(); err != nil {
			b.Fatal(err)
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
		benchThroughput(b, tc, ts)
	})
	for _, suite := range []CipherSuite{ChaChaPoly, AESGCM} {
		name := map[CipherSuite]string{ChaChaPoly: "chachapoly", AESGCM: "aesgcm"}[suite]
		b.Run(name, func(b *testing.B) {
			cc, sc := benchPeers(b, KK, suite)
			ln, err := Listen("tcp", "127.0.0.1:0", sc)
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			accepted := make(chan net.Conn, 1)
			go func() {
				s, err := ln.Accept()
				if err != nil {
					b.Error(err)
				}
				accepted <- s
			}()
			d := &Dialer{Config: cc, Peer: "server"}
			c, err := d.DialContext(context.Background(), "tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			s := <-accepted
			if s == nil {
				b.FailNow()
			}
			if st := c.(*Conn).ConnectionState(); st.CipherSuite != suite {
				b.Fatalf("negotiated %v, want %v", st.CipherSuite, suite)
			}
			benchThroughput(b, c, s)
		})
	}
}

// benchThroughput writes b.N 64 KiB chunks from c to s and stops the clock
// once s has read all of them. It closes both.
func benchThroughput(b *testing.B, c, s net.Conn) {
	const chunk = 64 << 10
	defer c.Close()
	defer s.Close()
	want := int64(b.N) * chunk
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, chunk)
		var got int64
		for got < want {
			n, err := s.Read(buf)
			got += int64(n)
			if err != nil && got < want {
				done <- err
				return
			}
		}
		done <- nil
	}()
	msg := make([]byte, chunk)
	rand.Read(msg)
	b.SetBytes(chunk)
	b.ReportAllocs()
	rd0, wr0 := syscallCounts()
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	if rd1, wr1 := syscallCounts(); rd0 >= 0 && rd1 >= 0 {
		b.ReportMetric(float64(rd1-rd0)/float64(b.N), "reads/op")
		b.ReportMetric(float64(wr1-wr0)/float64(b.N), "writes/op")
	}
}

// cpuTime returns the CPU time, user and system, that this process has used.
// The benchmarks report it per op ("cpu-ns/op") beside the wall-clock ns/op:
// on a machine shared with other work it is the steadier figure, as it counts
// only this process's work (both ends of the connection are in it).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// syscallCounts returns this process's read and write system calls so far
// (syscr and syscw of /proc/self/io), or -1s where that file is missing.
func syscallCounts() (reads, writes int64) {
	reads, writes = -1, -1
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "syscr":
			reads = n
		case "syscw":
			writes = n
		}
	}
	return
}

func BenchmarkHandshake(b *testing.B) {
	b.Run("tls13", func(b *testing.B) {
		cc, sc := benchTLS(b)
		benchHandshake(b,
			func(c net.Conn) handshaker { return tls.Client(c, cc) },
			func(c net.Conn) handshaker { return tls.Server(c, sc) })
	})
	for _, p := range []Pattern{KK, XK} {
		name := map[Pattern]string{KK: "kk", XK: "xk"}[p]
		b.Run(name, func(b *testing.B) {
			cc, sc := benchPeers(b, p, ChaChaPoly)
			benchHandshake(b,
				func(c net.Conn) handshaker { return Client(c, cc, "server") },
				func(c net.Conn) handshaker { return Server(c, sc) })
		})
	}
}

// handshaker is what *tls.Conn and *Conn have in common.
type handshaker interface {
	net.Conn
	HandshakeContext(context.Context) error
}

// benchHandshake times complete handshakes, both sides, each over a new
// loopback TCP connection to one reused TCP listener. An iteration ends when
// both sides have finished: the client after its last flight, the server
// after verifying the client's (TLS Finished, Noise confirm record). Both
// sides then close the TCP connection itself, for TLS and Noise alike: the
// cost of a TLS close alert or a noisetor close record is not a handshake's.
func benchHandshake(b *testing.B, client, server func(net.Conn) handshaker) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	serverErr := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			err = server(raw).HandshakeContext(context.Background())
			raw.Close()
			serverErr <- err
		}
	}()
	addr := ln.Addr().String()
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		raw, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		if err := client(raw).HandshakeContext(context.Background()); err != nil {
			b.Fatal(err)
		}
		if err := <-serverErr; err != nil {
			b.Fatal(err)
		}
		raw.Close()
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	ln.Close()
	wg.Wait()
}

// idleConns is how many connections BenchmarkIdleConn establishes per
// measurement (each has two ends in this process).
const idleConns = 1000

// BenchmarkIdleConn reports the Go heap held per end of an established, idle
// noisetor connection ("B/conn"; one TCP connection has two ends, the
// dialer's and the listener's, both in this process, and the figure is the
// heap growth divided by 2×idleConns). Each end has a goroutine blocked in
// Read, as an HTTP server's connection goroutine would be. The figure
// includes the net.TCPConn under each Conn, and excludes goroutine stacks,
// which "stack-B/conn" reports. One op is one measurement of idleConns
// connections.
func BenchmarkIdleConn(b *testing.B) {
	cc, sc := benchPeers(b, KK, ChaChaPoly)
	var heap, stack float64
	for range b.N {
		h, s := measureIdleConns(b, cc, sc, idleConns)
		heap += h
		stack += s
	}
	b.ReportMetric(heap/float64(b.N), "B/conn")
	b.ReportMetric(stack/float64(b.N), "stack-B/conn")
}

// measureIdleConns establishes n connections through Listen and Dialer,
// parks a Read on each end, and returns the growth of the live heap and of
// goroutine stacks per connection end.
func measureIdleConns(b *testing.B, cc, sc *Config, n int) (heapPerEnd, stackPerEnd float64) {
	ln, err := Listen("tcp", "127.0.0.1:0", sc)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	conns := make([]net.Conn, 0, 2*n)
	var readers sync.WaitGroup
	park := func(c net.Conn) {
		readers.Add(1)
		go func() {
			defer readers.Done()
			var buf [1]byte
			if _, err := c.Read(buf[:]); err == nil {
				b.Error("idle connection read data")
			}
		}()
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
		readers.Wait()
	}()

	before := settledMemStats()
	d := &Dialer{Config: cc, Peer: "server"}
	addr := ln.Addr().String()
	for range n {
		c, err := d.DialContext(context.Background(), "tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c, s)
		park(c)
		park(s)
	}
	time.Sleep(100 * time.Millisecond) // let every reader block in Read
	after := settledMemStats()
	ends := float64(2 * n)
	heapPerEnd = (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / ends
	stackPerEnd = (float64(after.StackInuse) - float64(before.StackInuse)) / ends
	return heapPerEnd, stackPerEnd
}

// settledMemStats returns memory statistics after garbage collection has
// freed everything unreachable.
func settledMemStats() runtime.MemStats {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m
}
