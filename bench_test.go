package noisetor

import (
	"context"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
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

	"github.com/flynn/noise"
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
	discard := discardLogger()
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

// Every comparison benchmark measures its baselines in the same run,
// interleaved with the measured operation (see interleave), and reports the
// ratios itself: "x-tls13" is noisetor against crypto/tls 1.3 (throughput:
// noisetor's MB/s over TLS's; times: noisetor's over TLS's), "x-bound" is
// noisetor's throughput over the two-core bound of its AEAD, and the -cpu
// variants compare the CPU time the process used, which a machine shared
// with other work disturbs less than wall-clock time.

// interleave runs b.N operations of op in up to 10 rounds; after each round,
// with the benchmark timer stopped, it runs as many operations of each
// baseline. All are measured close together in time, so that a load change
// on a shared machine moves them alike. ns/op, allocs/op and B/op are op's
// alone; interleave reports op's CPU time per op as cpu-ns/op and returns the
// wall-clock and CPU nanoseconds per operation of each baseline.
func interleave(b *testing.B, op func(n int), baselines ...func(n int)) (opCPU float64, wall, cpu []float64) {
	wall, cpu = make([]float64, len(baselines)), make([]float64, len(baselines))
	rounds := min(b.N, 10)
	var ownCPU time.Duration
	b.ResetTimer()
	for r := range rounds {
		n := b.N/rounds + btoi(r < b.N%rounds)
		cpu0 := cpuTime()
		op(n)
		ownCPU += cpuTime() - cpu0
		b.StopTimer()
		for i, base := range baselines {
			t0, c0 := time.Now(), cpuTime()
			base(n)
			wall[i] += float64(time.Since(t0))
			cpu[i] += float64(cpuTime() - c0)
		}
		b.StartTimer()
	}
	b.StopTimer()
	for i := range baselines {
		wall[i] /= float64(b.N)
		cpu[i] /= float64(b.N)
	}
	opCPU = float64(ownCPU) / float64(b.N)
	b.ReportMetric(opCPU, "cpu-ns/op")
	return opCPU, wall, cpu
}

func btoi(x bool) int {
	if x {
		return 1
	}
	return 0
}

// suiteName names a cipher suite in benchmark names.
var suiteName = map[CipherSuite]string{ChaChaPoly: "chachapoly", AESGCM: "aesgcm"}

// noisePair returns the two ends of a noisetor connection over loopback TCP,
// through Listen and Dialer, with the given cipher suite and pattern.
func noisePair(b *testing.B, pattern Pattern, suite CipherSuite) (client, server *Conn) {
	b.Helper()
	cc, sc := benchPeers(b, pattern, suite)
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
	if st := c.(*Conn).ConnectionState(); st.CipherSuite != suite || st.Pattern != pattern {
		b.Fatalf("negotiated %v %v, want %v %v", st.Pattern, st.CipherSuite, pattern, suite)
	}
	return c.(*Conn), s.(*Conn)
}

// tlsPair returns the two ends of a TLS 1.3 connection with mutual
// authentication over loopback TCP, handshake done.
func tlsPair(b *testing.B) (client, server *tls.Conn) {
	b.Helper()
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
	return tc, ts
}

// throughputChunk is the size of one Write in the throughput benchmarks.
const throughputChunk = 64 << 10

// BenchmarkThroughput streams 64 KiB Writes one way over noisetor (one op is
// one Write; MB/s and ns/op are noisetor's), interleaved with the same over
// crypto/tls 1.3 and over raw TCP, and with the AEAD sealing and opening
// full frames on one core. It reports:
//
//	tls13-MB/s, tcp-MB/s  the baselines
//	seal-MB/s, open-MB/s  the suite's AEAD on full 65535-byte frames
//	bound-MB/s            the two-core bound: a sender core seals and sends,
//	                      a receiver core receives and opens, so a byte costs
//	                      at least max(seal, open) + TCP
//	x-bound, x-tls13      noisetor's MB/s over bound-MB/s and over tls13-MB/s
//	tcp-x-tls13           tcp-MB/s over tls13-MB/s: the x-tls13 of a protocol
//	                      whose cryptography cost nothing, which no protocol
//	                      over this TCP can pass
//	x-tls13-cpu           TLS's CPU time per byte over noisetor's
//	x-bound-cpu           the least CPU time a byte can cost (seal, open and
//	                      TCP's both ends) over noisetor's: the bound when
//	                      the two cores are shared with other work, as then
//	                      bound-MB/s, which assumes two free cores, is not
//	reads/op, writes/op   noisetor's system calls, both ends, per Write
func BenchmarkThroughput(b *testing.B) {
	for _, suite := range []CipherSuite{ChaChaPoly, AESGCM} {
		b.Run(suiteName[suite], func(b *testing.B) {
			c, s := noisePair(b, KK, suite)
			noise := newStream(b, c, s)
			tc, ts := tlsPair(b)
			tlsStream := newStream(b, tc, ts)
			rc, rs := tcpPair(b)
			tcpStream := newStream(b, rc, rs)
			seal, open := aeadBench(b, suite)
			b.SetBytes(throughputChunk)
			b.ReportAllocs()
			var reads, writes int64
			send := func(n int) {
				rd0, wr0 := syscallCounts()
				noise.send(n)
				rd1, wr1 := syscallCounts()
				reads, writes = reads+rd1-rd0, writes+wr1-wr0
			}
			opCPU, wall, cpu := interleave(b, send, tlsStream.send, tcpStream.send, seal, open)
			noise.close()
			tlsStream.close()
			tcpStream.close()
			mbps := func(nsPerChunk float64) float64 { return throughputChunk / nsPerChunk * 1e3 }
			own := mbps(float64(b.Elapsed()) / float64(b.N))
			bound := mbps(wall[1] + max(wall[2], wall[3]))
			b.ReportMetric(mbps(wall[0]), "tls13-MB/s")
			b.ReportMetric(mbps(wall[1]), "tcp-MB/s")
			b.ReportMetric(mbps(wall[2]), "seal-MB/s")
			b.ReportMetric(mbps(wall[3]), "open-MB/s")
			b.ReportMetric(bound, "bound-MB/s")
			b.ReportMetric(own/bound, "x-bound")
			b.ReportMetric(wall[0]/wall[1], "tcp-x-tls13")
			b.ReportMetric(own/mbps(wall[0]), "x-tls13")
			b.ReportMetric(cpu[0]/opCPU, "x-tls13-cpu")
			b.ReportMetric((cpu[1]+cpu[2]+cpu[3])/opCPU, "x-bound-cpu")
			if r, _ := syscallCounts(); r >= 0 {
				// System calls of both ends, per 64 KiB Write (its two frames).
				b.ReportMetric(float64(reads)/float64(b.N), "reads/op")
				b.ReportMetric(float64(writes)/float64(b.N), "writes/op")
			}
		})
	}
}

// cpuTime returns the CPU time, user and system, that this process has used.
// On a machine shared with other work it is the steadier figure, as it
// counts only this process's work (both ends of each connection are in it).
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

// A stream sends 64 KiB Writes from one end of a connection and reads them
// at the other, in a goroutine.
type stream struct {
	b      *testing.B
	w, r   net.Conn
	msg    []byte
	target chan int64
	done   chan error
	sent   int64
}

func newStream(b *testing.B, w, r net.Conn) *stream {
	st := &stream{b: b, w: w, r: r, msg: make([]byte, throughputChunk), target: make(chan int64), done: make(chan error)}
	rand.Read(st.msg)
	go func() {
		buf := make([]byte, throughputChunk)
		var got int64
		for want := range st.target {
			for got < want {
				n, err := r.Read(buf)
				got += int64(n)
				if err != nil && got < want {
					st.done <- err
					return
				}
			}
			st.done <- nil
		}
	}()
	return st
}

// send writes n chunks and returns once the reader has read them.
func (st *stream) send(n int) {
	st.sent += int64(n) * throughputChunk
	st.target <- st.sent
	for range n {
		if _, err := st.w.Write(st.msg); err != nil {
			st.b.Fatal(err)
		}
	}
	if err := <-st.done; err != nil {
		st.b.Fatal(err)
	}
}

func (st *stream) close() {
	close(st.target)
	st.w.Close()
	st.r.Close()
}

// aeadBench returns functions that seal and open n chunks' worth of full
// frames with the suite's AEAD on this core, in place, as a noisetor sender
// and receiver must at the least.
func aeadBench(b *testing.B, suite CipherSuite) (seal, open func(n int)) {
	var key [32]byte
	rand.Read(key[:])
	// The AEAD that noisetor's halfState drives (see setCipher).
	aead, ok := map[CipherSuite]noise.CipherFunc{ChaChaPoly: noise.CipherChaChaPoly, AESGCM: noise.CipherAESGCM}[suite].Cipher(key).(cipher.AEAD)
	if !ok {
		b.Fatal("the noise cipher is not a cipher.AEAD")
	}
	const frame = maxPayload + 1 // type byte and body
	var nonce [12]byte
	buf := make([]byte, frame+aeadOverhead)
	pt := make([]byte, frame)
	ct := aead.Seal(nil, nonce[:], pt, nil)
	// bytes per chunk, as a fraction of a frame: seal and open are timed per
	// chunk of application data, like the streams.
	frames := func(n int) int { return (n*throughputChunk + maxPayload - 1) / maxPayload }
	seal = func(n int) {
		for range frames(n) {
			aead.Seal(buf[:0], nonce[:], buf[:frame], nil)
		}
	}
	open = func(n int) {
		for range frames(n) {
			if _, err := aead.Open(pt[:0], nonce[:], ct, nil); err != nil {
				b.Fatal(err)
			}
		}
	}
	return seal, open
}

// roundTripSize is the request and the reply of BenchmarkRoundTrip.
const roundTripSize = 256

// BenchmarkRoundTrip times a 256-byte request and a 256-byte reply on an
// established connection (one op is one round trip; allocs/op counts both
// ends), interleaved with the same over crypto/tls 1.3 and raw TCP, and
// reports tls13-ns/op, tcp-ns/op and x-tls13, noisetor's time over TLS's
// (x-tls13-cpu: over CPU time).
func BenchmarkRoundTrip(b *testing.B) {
	for _, suite := range []CipherSuite{ChaChaPoly, AESGCM} {
		b.Run(suiteName[suite], func(b *testing.B) {
			c, s := noisePair(b, KK, suite)
			noise := newEcho(b, c, s)
			tc, ts := tlsPair(b)
			tlsEcho := newEcho(b, tc, ts)
			rc, rs := tcpPair(b)
			tcpEcho := newEcho(b, rc, rs)
			noise.roundTrips(100) // steady state: pooled buffers exist
			b.ReportAllocs()
			opCPU, wall, cpu := interleave(b, noise.roundTrips, tlsEcho.roundTrips, tcpEcho.roundTrips)
			noise.close()
			tlsEcho.close()
			tcpEcho.close()
			own := float64(b.Elapsed()) / float64(b.N)
			b.ReportMetric(wall[0], "tls13-ns/op")
			b.ReportMetric(wall[1], "tcp-ns/op")
			b.ReportMetric(own/wall[0], "x-tls13")
			b.ReportMetric(opCPU/cpu[0], "x-tls13-cpu")
		})
	}
}

// An echo answers each request of roundTripSize bytes with as many bytes.
type echo struct {
	b        *testing.B
	c, s     net.Conn
	req, rep []byte
	done     chan struct{}
}

func newEcho(b *testing.B, c, s net.Conn) *echo {
	e := &echo{b: b, c: c, s: s, req: make([]byte, roundTripSize), rep: make([]byte, roundTripSize), done: make(chan struct{})}
	go func() {
		defer close(e.done)
		buf := make([]byte, roundTripSize)
		for {
			if _, err := io.ReadFull(s, buf); err != nil {
				return
			}
			if _, err := s.Write(buf); err != nil {
				return
			}
		}
	}()
	return e
}

func (e *echo) roundTrips(n int) {
	for range n {
		if _, err := e.c.Write(e.req); err != nil {
			e.b.Fatal(err)
		}
		if _, err := io.ReadFull(e.c, e.rep); err != nil {
			e.b.Fatal(err)
		}
	}
}

func (e *echo) close() {
	e.c.Close()
	<-e.done
	e.s.Close()
}

// BenchmarkHandshake times complete KK and XK handshakes (one op is one,
// both sides, each over a new loopback TCP connection), interleaved with
// TLS 1.3 handshakes with mutual ECDSA P-256 authentication, and reports
// tls13-ns/op and x-tls13, noisetor's time over TLS's (x-tls13-cpu: over CPU
// time).
func BenchmarkHandshake(b *testing.B) {
	tcc, tsc := benchTLS(b)
	for _, p := range []Pattern{KK, XK} {
		name := map[Pattern]string{KK: "kk", XK: "xk"}[p]
		b.Run(name, func(b *testing.B) {
			cc, sc := benchPeers(b, p, ChaChaPoly)
			noise := newHandshaker(b,
				func(c net.Conn) handshaker { return Client(c, cc, "server") },
				func(c net.Conn) handshaker { return Server(c, sc) })
			tlsHS := newHandshaker(b,
				func(c net.Conn) handshaker { return tls.Client(c, tcc) },
				func(c net.Conn) handshaker { return tls.Server(c, tsc) })
			b.ReportAllocs()
			opCPU, wall, cpu := interleave(b, noise.run, tlsHS.run)
			noise.close()
			tlsHS.close()
			own := float64(b.Elapsed()) / float64(b.N)
			b.ReportMetric(wall[0], "tls13-ns/op")
			b.ReportMetric(own/wall[0], "x-tls13")
			b.ReportMetric(opCPU/cpu[0], "x-tls13-cpu")
		})
	}
}

// keyringPeers is the keyring size of BenchmarkHandshakeKeyring.
const keyringPeers = 10_000

// BenchmarkHandshakeKeyring times KK handshakes with a server whose keyring
// holds 10,000 peers (the client among them), interleaved with the same
// against a server whose keyring holds only the client, and reports
// 1peer-ns/op and x-1peer, the time with 10,000 over the time with one (the
// goal: within 10 %), and x-1peer-B, the same for the bytes both sides
// allocate per handshake.
func BenchmarkHandshakeKeyring(b *testing.B) {
	cc, sc := benchPeers(b, KK, ChaChaPoly)
	client, _ := sc.Keyring.ByName("client")
	one, err := NewKeyring(client)
	if err != nil {
		b.Fatal(err)
	}
	many, err := NewKeyring(append(manyPeers(b, keyringPeers-1), client)...)
	if err != nil {
		b.Fatal(err)
	}
	sc1, scN := sc.Clone(), sc.Clone()
	sc1.Keyring, scN.Keyring = one, many
	// Derive the pair keys before timing: one DH per keyring peer, once per
	// process, not per handshake.
	for _, srv := range []*Config{sc1, scN} {
		srv.keys().findKK(srv.Keyring, &preamble{}, make([]byte, preambleLen), time.Now())
	}
	run := func(srv *Config) *handshakeRunner {
		return newHandshaker(b,
			func(c net.Conn) handshaker { return Client(c, cc, "server") },
			func(c net.Conn) handshaker { return Server(c, srv) })
	}
	withMany, withOne := run(scN), run(sc1)
	b.ReportAllocs()
	var manyBytes, oneBytes uint64
	opCPU, wall, cpu := interleave(b,
		func(n int) { manyBytes += allocatedBy(func() { withMany.run(n) }) },
		func(n int) { oneBytes += allocatedBy(func() { withOne.run(n) }) })
	withMany.close()
	withOne.close()
	own := float64(b.Elapsed()) / float64(b.N)
	b.ReportMetric(wall[0], "1peer-ns/op")
	b.ReportMetric(own/wall[0], "x-1peer")
	b.ReportMetric(opCPU/cpu[0], "x-1peer-cpu")
	b.ReportMetric(float64(manyBytes)/float64(oneBytes), "x-1peer-B")
}

// allocatedBy returns the bytes the process allocated while f ran.
func allocatedBy(f func()) uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	before := m.TotalAlloc
	f()
	runtime.ReadMemStats(&m)
	return m.TotalAlloc - before
}

// manyPeers returns n keyring peers with fresh keys, made once per process.
func manyPeers(b *testing.B, n int) []Peer {
	manyPeersOnce.Do(func() {
		for i := range n {
			k := mustKey(b)
			manyPeersList = append(manyPeersList, Peer{Name: "peer-" + strconv.Itoa(i), PublicKey: k.PublicKey()})
		}
	})
	return manyPeersList[:n]
}

var (
	manyPeersOnce sync.Once
	manyPeersList []Peer
)

// handshaker is what *tls.Conn and *Conn have in common.
type handshaker interface {
	net.Conn
	HandshakeContext(context.Context) error
}

// A handshakeRunner runs complete handshakes, each over a new loopback TCP
// connection to one reused TCP listener. A handshake ends when both sides
// have finished: the client after its last flight, the server after
// verifying the client's (TLS Finished, Noise confirm record). Both sides
// then close the TCP connection itself, for TLS and Noise alike: the cost of
// a TLS close alert or a noisetor close record is not a handshake's.
type handshakeRunner struct {
	b         *testing.B
	ln        net.Listener
	client    func(net.Conn) handshaker
	serverErr chan error
	wg        sync.WaitGroup
}

func newHandshaker(b *testing.B, client, server func(net.Conn) handshaker) *handshakeRunner {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	h := &handshakeRunner{b: b, ln: ln, client: client, serverErr: make(chan error, 1)}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			err = server(raw).HandshakeContext(context.Background())
			raw.Close()
			h.serverErr <- err
		}
	}()
	return h
}

func (h *handshakeRunner) run(n int) {
	addr := h.ln.Addr().String()
	for range n {
		raw, err := net.Dial("tcp", addr)
		if err != nil {
			h.b.Fatal(err)
		}
		if err := h.client(raw).HandshakeContext(context.Background()); err != nil {
			h.b.Fatal(err)
		}
		if err := <-h.serverErr; err != nil {
			h.b.Fatal(err)
		}
		raw.Close()
	}
}

func (h *handshakeRunner) close() {
	h.ln.Close()
	h.wg.Wait()
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
