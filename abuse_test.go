package noisetor

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Abuse tests: hostile or broken callers against a real Listener on
// 127.0.0.1. Each runs for a few seconds with bounded loops.

// countingKey is a software StaticKey that counts its DH operations: a DH is
// what a hardware token makes expensive, and what a scanner must not be able
// to trigger.
type countingKey struct {
	*PrivateKey
	dh atomic.Int64
}

func (k *countingKey) DH(peer PublicKey) ([]byte, error) {
	k.dh.Add(1)
	return k.PrivateKey.DH(peer)
}

// countingHandler is a slog.Handler that counts the listener's handshake
// records by outcome, and the failures by reason.
type countingHandler struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	reasons    map[string]int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *countingHandler) WithGroup(string) slog.Handler            { return h }

func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message == refusalLogMessage {
		// A Listener's counts of callers that proved no key.
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "reasons" {
				for _, g := range a.Value.Group() {
					n := g.Value.Int64()
					h.failed.Add(n)
					h.mu.Lock()
					if h.reasons == nil {
						h.reasons = map[string]int{}
					}
					h.reasons[g.Key] += int(n)
					h.mu.Unlock()
				}
			}
			return true
		})
		return nil
	}
	var outcome, reason string
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "outcome":
			outcome = a.Value.String()
		case "reason":
			reason = a.Value.String()
		}
		return true
	})
	switch outcome {
	case "ok":
		h.ok.Add(1)
	case "failed":
		h.failed.Add(1)
		// Reasons carry addresses only for I/O errors; cut them short so
		// the map stays small.
		if i := strings.Index(reason, "127.0.0.1"); i > 0 {
			reason = reason[:i]
		}
		h.mu.Lock()
		if h.reasons == nil {
			h.reasons = map[string]int{}
		}
		if len(h.reasons) < 64 {
			h.reasons[reason]++
		}
		h.mu.Unlock()
	}
	return nil
}

func (h *countingHandler) count(substr string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for r, c := range h.reasons {
		if strings.Contains(r, substr) {
			n += c
		}
	}
	return n
}

func (h *countingHandler) summary() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var lines []string
	for r, c := range h.reasons {
		lines = append(lines, strings.TrimSpace(r)+" ×"+strconv.Itoa(c))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n  ")
}

// abuseServer is a real Listener on 127.0.0.1 whose static key counts DH
// operations and whose logger counts handshake outcomes.
type abuseServer struct {
	ln       net.Listener
	addr     string
	cfg      *Config
	key      *countingKey
	log      *countingHandler
	client   *Config // a legitimate keyring peer, "client"
	accepted chan net.Conn
}

func newAbuseServer(t *testing.T, tune func(*Config)) *abuseServer {
	t.Helper()
	ps := newTestPeers(t, "client", "server")
	s := &abuseServer{
		cfg:      ps["server"].cfg,
		key:      &countingKey{PrivateKey: ps["server"].key},
		log:      &countingHandler{},
		client:   ps["client"].cfg,
		accepted: make(chan net.Conn, 1024),
	}
	s.cfg.StaticKey = s.key
	s.cfg.Logger = slog.New(s.log)
	s.client.Logger = slog.New(slog.DiscardHandler)
	if tune != nil {
		tune(s.cfg)
	}
	ln, err := Listen("tcp", "127.0.0.1:0", s.cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.ln, s.addr = ln, ln.Addr().String()
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("Accept: %v", err)
				}
				return
			}
			s.accepted <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-acceptDone
		for {
			select {
			case c := <-s.accepted:
				c.Close()
			default:
				return
			}
		}
	})
	return s
}

// flushLogs writes the listener's held-back counts of refused callers.
func (s *abuseServer) flushLogs() { s.ln.(*listener).refusals.flush() }

// dialLegit connects as the keyring peer "client" within timeout, and returns
// the dialer's end and the end that Accept returned.
func (s *abuseServer) dialLegit(t *testing.T, timeout time.Duration) (net.Conn, net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := (&Dialer{Config: s.client, Peer: "server"}).DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return nil, nil, err
	}
	select {
	case sc := <-s.accepted:
		if p, ok := PeerOf(sc); !ok || p.Name != "client" {
			t.Errorf("Accept returned a connection for %+v, %v", p, ok)
		}
		return c, sc, nil
	case <-ctx.Done():
		c.Close()
		return nil, nil, errors.New("handshake done but Accept did not return the connection")
	}
}

// expectNoAccept fails if Accept yields a connection within d.
func (s *abuseServer) expectNoAccept(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case c := <-s.accepted:
		p, _ := PeerOf(c)
		t.Errorf("Accept returned a connection for %q from %v", p.Name, c.RemoteAddr())
		c.Close()
	case <-time.After(d):
	}
}

// resourceSampler records, while a test runs, the peak goroutine count and
// the peak live heap: every few samples it forces a garbage collection, so
// that what it bounds is memory held, not garbage the collector has not
// reached yet (the race detector's sync.Pool drops a quarter of all Puts,
// which makes garbage plentiful).
type resourceSampler struct {
	stop, done chan struct{}
	base       uint64
	peak       resourcePeaks
}

// resourcePeaks are a sampler's results, heap figures as growth over the
// live heap when sampling started.
type resourcePeaks struct {
	goroutines int
	liveHeap   int64 // after a forced GC
	heapAlloc  int64 // unforced: live plus uncollected garbage (logged in the flood)
}

func startSampler(every time.Duration) *resourceSampler {
	r := &resourceSampler{stop: make(chan struct{}), done: make(chan struct{})}
	r.base = settledMemStats().HeapAlloc
	go func() {
		defer close(r.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for i := 0; ; i++ {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			r.peak.heapAlloc = max(r.peak.heapAlloc, int64(m.HeapAlloc)-int64(r.base))
			if i%5 == 4 {
				runtime.GC()
				runtime.ReadMemStats(&m)
				r.peak.liveHeap = max(r.peak.liveHeap, int64(m.HeapAlloc)-int64(r.base))
			}
			r.peak.goroutines = max(r.peak.goroutines, runtime.NumGoroutine())
			select {
			case <-r.stop:
				return
			case <-t.C:
			}
		}
	}()
	return r
}

// held returns the live heap growth now. Call it when nothing allocates, and
// it is exact.
func (r *resourceSampler) held() int64 {
	return int64(settledMemStats().HeapAlloc) - int64(r.base)
}

// finish takes a last sample after a forced GC, stops sampling and returns
// the peaks.
func (r *resourceSampler) finish() resourcePeaks {
	close(r.stop)
	<-r.done
	m := settledMemStats()
	r.peak.liveHeap = max(r.peak.liveHeap, int64(m.HeapAlloc)-int64(r.base))
	return r.peak
}

// readUntilClosed reads from c until the peer closes it or the deadline
// passes, and returns the bytes read and whether the peer closed it.
func readUntilClosed(c net.Conn, deadline time.Time) (n int, closed bool) {
	c.SetReadDeadline(deadline)
	buf := make([]byte, 4096)
	for {
		m, err := c.Read(buf)
		n += m
		if err != nil {
			return n, !isTimeout(err)
		}
	}
}

// heapSlack scales a live-heap bound for the race detector, under which a
// bound measured while traffic flows says little: its sync.Pool drops a
// quarter of all Puts, and everything allocated during a forced collection's
// mark phase survives it, so a fast sender shows tens of MiB of garbage as
// live. The bounds that matter are checked without -race.
func heapSlack(limit int64) int64 {
	if raceEnabled() {
		return 32 * limit
	}
	return limit
}

func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// garbage returns the first flight of one kind of hostile caller. None of
// them belongs to a keyring peer, so none may cost the listener a DH.
func garbage(kind int, server PublicKey) (name string, b []byte) {
	// validPreamble is a well-formed preamble: for KK sealed with the pair
	// key of initiator (nil: a random hint and tag), for XK with the real
	// XK tag of server.
	validPreamble := func(p Pattern, initiator *PrivateKey, cipher CipherSuite) []byte {
		pre := preamble{pattern: p, curve: X25519, cipher: cipher}
		rand.Read(pre.salt[:])
		var raw []byte
		switch {
		case p == XK:
			raw = pre.sealXK(server)
		case initiator != nil:
			ss, _ := initiator.DH(server)
			k, _ := derivePairKey(ss, initiator.PublicKey(), server)
			raw = pre.sealKK(k, time.Now())
		default:
			raw = pre.marshal()
			copy(raw[24:], randBytes(preambleHint+preambleTag))
		}
		return appendMessage(raw, randBytes(48))
	}
	switch kind {
	case 0:
		return "connect-and-close", nil
	case 1:
		return "random-48", randBytes(preambleLen)
	case 2:
		return "random-2000", randBytes(2000)
	case 3:
		// Right magic and parameters, random hint and tag: a scanner that
		// knows the protocol, or anyone who knows only public keys.
		return "kk-random-hint-tag", validPreamble(KK, nil, ChaChaPoly)
	case 4:
		b := validPreamble(XK, nil, ChaChaPoly)
		copy(b[32:48], randBytes(16))
		return "xk-random-tag", b
	case 5:
		b := validPreamble(KK, nil, ChaChaPoly)
		b[4] = wireVersion + 1
		return "wrong-version", b
	case 6:
		// Knows our public key and seals a genuine preamble with its own
		// key, which is not in our keyring.
		outsider, _ := GenerateKey(X25519, nil)
		return "kk-outsider", validPreamble(KK, outsider, ChaChaPoly)
	case 7:
		return "http-get", []byte("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
	}
	panic("unknown garbage kind")
}

const garbageKinds = 8

// TestAbuseHandshakeFlood: garbage connections arrive at about 1,000 per
// second for 2 seconds while a keyring peer connects every 200ms. Every
// legitimate handshake completes; goroutines and heap stay bounded; no
// garbage connection costs a DH; every garbage attempt is logged as failed.
func TestAbuseHandshakeFlood(t *testing.T) {
	checkNoGoroutineLeak(t)
	const (
		maxPending = 128
		rate       = 1000 // per second
		duration   = 2 * time.Second
		workers    = 16
	)
	s := newAbuseServer(t, func(c *Config) {
		c.MaxPendingHandshakes = maxPending
		c.HandshakeTimeout = 2 * time.Second
		c.Patterns = []Pattern{KK, XK} // so XK garbage meets the XK tag check
	})

	// Two legitimate handshakes first, to learn what one costs in DH (the
	// first also derives the pair keys, one DH per keyring peer).
	var dhBefore int64
	for range 2 {
		dhBefore = s.key.dh.Load()
		c, sc, err := s.dialLegit(t, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		sc.Close()
	}
	dhPerHandshake := s.key.dh.Load() - dhBefore
	dhBefore = s.key.dh.Load()
	if dhPerHandshake == 0 {
		t.Fatal("counting key saw no DH for a real handshake")
	}

	sampler := startSampler(20 * time.Millisecond)
	baseGoroutines := runtime.NumGoroutine()

	var (
		dialed, notClosed atomic.Int64
		perKind           [garbageKinds]atomic.Int64
		wg                sync.WaitGroup
	)
	jobs := make(chan int)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for kind := range jobs {
				name, payload := garbage(kind, s.key.PublicKey())
				raw, err := net.DialTimeout("tcp", s.addr, time.Second)
				if err != nil {
					continue
				}
				dialed.Add(1)
				perKind[kind].Add(1)
				if payload == nil {
					raw.Close()
					continue
				}
				raw.Write(payload)
				// Full first flights are judged at once: the listener
				// must close them long before the handshake timeout.
				if name != "http-get" {
					if _, closed := readUntilClosed(raw, time.Now().Add(time.Second)); !closed {
						notClosed.Add(1)
					}
				}
				raw.Close()
			}
		}()
	}

	// Legitimate peers keep connecting throughout the flood.
	legitDone := make(chan struct{})
	var legitOK, legitFailed atomic.Int64
	var legitMax atomic.Int64
	go func() {
		defer close(legitDone)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for range int(duration / (200 * time.Millisecond)) {
			<-tick.C
			start := time.Now()
			c, sc, err := s.dialLegit(t, 5*time.Second)
			if err != nil {
				t.Errorf("legitimate peer during flood: %v", err)
				legitFailed.Add(1)
				continue
			}
			if d := time.Since(start); int64(d) > legitMax.Load() {
				legitMax.Store(int64(d))
			}
			legitOK.Add(1)
			c.Close()
			sc.Close()
		}
	}()

	start := time.Now()
	total := int(rate * duration / time.Second)
	for i := range total {
		if d := time.Until(start.Add(time.Duration(i) * time.Second / rate)); d > 0 {
			time.Sleep(d)
		}
		jobs <- i % garbageKinds
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)
	<-legitDone
	peak := sampler.finish()

	// Every garbage connection the kernel accepted is counted as refused.
	want := dialed.Load()
	deadline := time.Now().Add(5 * time.Second)
	for s.log.failed.Load() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		s.flushLogs()
	}
	t.Logf("garbage: %d connections in %v (%.0f/s); legitimate: %d ok, slowest %v; DH: %d (%d per handshake); peak goroutines %d (base %d); peak live heap growth %d KiB (unforced peak %d KiB)",
		want, elapsed.Round(time.Millisecond), float64(want)/elapsed.Seconds(),
		legitOK.Load(), time.Duration(legitMax.Load()).Round(time.Millisecond),
		s.key.dh.Load(), dhPerHandshake, peak.goroutines, baseGoroutines, peak.liveHeap>>10, peak.heapAlloc>>10)
	t.Logf("failure reasons:\n  %s", s.log.summary())

	if want < int64(total)*9/10 {
		t.Errorf("only %d of %d garbage connections were made", want, total)
	}
	if legitOK.Load() == 0 || legitFailed.Load() != 0 {
		t.Errorf("legitimate handshakes during the flood: %d ok, %d failed", legitOK.Load(), legitFailed.Load())
	}
	if got, wantDH := s.key.dh.Load()-dhBefore, dhPerHandshake*legitOK.Load(); got != wantDH {
		t.Errorf("static-key DH operations: %d, want %d (%d legitimate handshakes): garbage triggered DH", got, wantDH, legitOK.Load())
	}
	if n := notClosed.Load(); n != 0 {
		t.Errorf("%d garbage connections were not closed within 1s", n)
	}
	if got := s.log.failed.Load(); got != want {
		t.Errorf("logged %d failed handshakes for %d garbage connections", got, want)
	}
	if got := s.log.ok.Load(); got != 2+legitOK.Load() {
		t.Errorf("logged %d successful handshakes, want %d", got, 2+legitOK.Load())
	}
	// Each pending handshake holds at most two goroutines (the handshake and
	// its deadline watcher); everything else is this test's.
	if limit := baseGoroutines + 2*maxPending + workers + 16; peak.goroutines > limit {
		t.Errorf("peak goroutines %d > %d", peak.goroutines, limit)
	}
	if peak.liveHeap > heapSlack(16<<20) {
		t.Errorf("peak live heap growth %d MiB during the flood", peak.liveHeap>>20)
	}
}

// TestAbuseSlowloris: 500 connections send half a preamble and stall. A
// keyring peer still gets in while they hang, none of them costs a DH, and
// each is closed at the handshake deadline, not before and not much after.
func TestAbuseSlowloris(t *testing.T) {
	checkNoGoroutineLeak(t)
	const (
		stalled = 500
		timeout = 2 * time.Second
	)
	s := newAbuseServer(t, func(c *Config) { c.HandshakeTimeout = timeout })

	pre := preamble{pattern: KK, curve: X25519, cipher: ChaChaPoly}
	rand.Read(pre.salt[:])
	half := pre.marshal()[:preambleLen/2]

	type stall struct {
		conn   net.Conn
		dialed time.Time
	}
	stalls := make([]stall, 0, stalled)
	defer func() {
		for _, st := range stalls {
			st.conn.Close()
		}
	}()
	for range stalled {
		raw, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatalf("after %d stalled connections: %v", len(stalls), err)
		}
		stalls = append(stalls, stall{raw, time.Now()})
		if _, err := raw.Write(half); err != nil {
			t.Fatal(err)
		}
	}
	opened := time.Since(stalls[0].dialed)

	// The stalled connections are all pending now; real peers get in.
	for i := range 3 {
		start := time.Now()
		c, sc, err := s.dialLegit(t, timeout/2)
		if err != nil {
			t.Fatalf("legitimate peer %d behind %d stalled connections: %v", i, stalled, err)
		}
		t.Logf("legitimate handshake %d behind the stalled ones: %v", i, time.Since(start).Round(time.Microsecond))
		c.Close()
		sc.Close()
	}
	dhLegit := s.key.dh.Load()

	closedAt := make([]time.Duration, stalled)
	var wg sync.WaitGroup
	for i, st := range stalls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, closed := readUntilClosed(st.conn, st.dialed.Add(timeout+3*time.Second))
			if n != 0 {
				t.Errorf("stalled connection %d received %d bytes", i, n)
			}
			if !closed {
				closedAt[i] = -1
				return
			}
			closedAt[i] = time.Since(st.dialed)
		}()
	}
	wg.Wait()

	sort.Slice(closedAt, func(i, j int) bool { return closedAt[i] < closedAt[j] })
	t.Logf("%d stalled connections opened in %v; closed after %v (first) .. %v (median) .. %v (last)",
		stalled, opened.Round(time.Millisecond), closedAt[0].Round(time.Millisecond),
		closedAt[stalled/2].Round(time.Millisecond), closedAt[stalled-1].Round(time.Millisecond))
	if closedAt[0] < 0 {
		t.Errorf("some stalled connections were still open %v after the handshake deadline", 3*time.Second)
	} else if closedAt[0] < timeout-100*time.Millisecond {
		t.Errorf("a stalled connection was closed after %v, before the %v handshake deadline", closedAt[0], timeout)
	}
	if closedAt[stalled-1] > timeout+2*time.Second {
		t.Errorf("a stalled connection was closed only after %v", closedAt[stalled-1])
	}
	if got := s.key.dh.Load(); got != dhLegit {
		t.Errorf("stalled connections caused %d DH operations", got-dhLegit)
	}
	deadline := time.Now().Add(2 * time.Second)
	for s.log.count("no preamble") < stalled && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		s.flushLogs()
	}
	if got := s.log.count("no preamble"); got != stalled {
		t.Errorf("logged %d handshake timeouts for %d stalled connections; reasons:\n  %s", got, stalled, s.log.summary())
	}
	s.expectNoAccept(t, 0)
}

// recordingProxy relays one TCP connection to target and records what the
// client sent.
func recordingProxy(t *testing.T, target string) (addr string, sent func() []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var rec bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer ln.Close()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		up, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer up.Close()
		go func() {
			io.Copy(c, up)
			c.Close()
		}()
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			mu.Lock()
			rec.Write(buf[:n])
			mu.Unlock()
			if _, werr := up.Write(buf[:n]); werr != nil || err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String(), func() []byte {
		mu.Lock()
		defer mu.Unlock()
		return bytes.Clone(rec.Bytes())
	}
}

// TestAbuseReplay replays a KK first flight captured from a real session.
// An exact replay is dropped before any DH, and the replayer never gets a
// session; a replay that misses the replay cache (here: a restarted listener
// with the same key) costs one handshake's DH at most, once, and still yields
// no session because the replayer cannot send the confirm record.
func TestAbuseReplay(t *testing.T) {
	checkNoGoroutineLeak(t)
	const replays = 200
	s := newAbuseServer(t, nil)

	// Capture a real client's stream through a relay.
	proxy, sent := recordingProxy(t, s.addr)
	c, err := (&Dialer{Config: s.client, Peer: "server"}).Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	sc := <-s.accepted
	if _, err := c.Write([]byte("secret")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(sc, buf); err != nil {
		t.Fatal(err)
	}
	c.Close()
	sc.Close()
	stream := sent()
	if len(stream) < preambleLen+frameHeader {
		t.Fatalf("captured only %d bytes", len(stream))
	}
	msg1Len := int(binary.BigEndian.Uint16(stream[preambleLen:]))
	flight1 := stream[:preambleLen+frameHeader+msg1Len]
	// The whole client stream: first flight, confirm record, data, close.
	if len(stream) <= len(flight1) {
		t.Fatalf("captured no confirm record")
	}
	dhSession := s.key.dh.Load()
	if dhSession == 0 {
		t.Fatal("no DH counted for the real session")
	}

	replay := func(addr string, payload []byte) (got int, closed bool) {
		raw, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		raw.Write(payload)
		return readUntilClosed(raw, time.Now().Add(3*time.Second))
	}

	t.Run("cached", func(t *testing.T) {
		failedBefore := s.log.failed.Load()
		start := time.Now()
		for i := range replays {
			payload := flight1
			if i%2 == 1 {
				payload = stream
			}
			got, closed := replay(s.addr, payload)
			if got != 0 || !closed {
				t.Fatalf("replay %d: listener answered %d bytes, closed=%v; want no answer and a close", i, got, closed)
			}
		}
		t.Logf("%d replays in %v (%v each)", replays, time.Since(start).Round(time.Millisecond), (time.Since(start) / replays).Round(time.Microsecond))
		if got := s.key.dh.Load(); got != dhSession {
			t.Errorf("replays cost %d DH operations, want 0", got-dhSession)
		}
		deadline := time.Now().Add(2 * time.Second)
		for s.log.failed.Load()-failedBefore < replays && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			s.flushLogs()
		}
		if got := s.log.count("replayed preamble"); got != replays {
			t.Errorf("logged %d replays, want %d; reasons:\n  %s", got, replays, s.log.summary())
		}
		s.expectNoAccept(t, 200*time.Millisecond)
	})

	t.Run("uncached", func(t *testing.T) {
		// A second listener with the same key and an empty replay cache.
		fresh := &countingKey{PrivateKey: s.key.PrivateKey}
		log := &countingHandler{}
		cfg := s.cfg.Clone()
		cfg.StaticKey, cfg.Logger = fresh, slog.New(log)
		ln, err := Listen("tcp", "127.0.0.1:0", cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		acceptc := make(chan net.Conn, 1)
		go func() {
			if c, err := ln.Accept(); err == nil {
				acceptc <- c
			}
		}()
		// The whole captured stream, confirm record included: the confirm
		// is sealed under the old session's keys and fails.
		got, closed := replay(ln.Addr().String(), stream)
		if !closed {
			t.Fatal("listener did not close the replayed connection")
		}
		if want := frameHeader + 48; got != want {
			t.Errorf("listener answered %d bytes, want message 2 (%d)", got, want)
		}
		if n := fresh.dh.Load(); n != dhSession {
			t.Errorf("first replay to a fresh listener cost %d DH, want one handshake's %d", n, dhSession)
		}
		for range replays / 10 {
			if got, closed := replay(ln.Addr().String(), stream); got != 0 || !closed {
				t.Fatalf("repeated replay answered %d bytes, closed=%v", got, closed)
			}
		}
		if n := fresh.dh.Load(); n != dhSession {
			t.Errorf("repeated replays cost %d DH, want 0 more", n-dhSession)
		}
		select {
		case c := <-acceptc:
			t.Errorf("the replayer got a session: %v", c.RemoteAddr())
			c.Close()
		case <-time.After(200 * time.Millisecond):
		}
		deadline := time.Now().Add(2 * time.Second)
		for log.failed.Load() < 1+replays/10 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := log.count("not a confirm record"); n != 1 {
			t.Errorf("logged %d unconfirmed handshakes, want 1; reasons:\n  %s", n, log.summary())
		}
	})
}

// TestAbuseWriteOnlyPeer: a keyring peer that sends frames forever and never
// reads. Backpressure must reach it, and the heap of both ends (both in this
// process) must stay bounded.
func TestAbuseWriteOnlyPeer(t *testing.T) {
	const run = 1500 * time.Millisecond
	// Two bounds: peakLimit on the live heap while traffic flows (loose:
	// a fast sender's garbage allocated during a forced collection counts
	// as live), and heldLimit, strict, on what stays held once everything
	// is quiescent with the connections still open.
	const peakLimit, heldLimit = 32 << 20, 2 << 20

	writeForever := func(c net.Conn, chunk int, written *atomic.Int64, stop <-chan struct{}) {
		msg := randBytes(chunk)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, err := c.Write(msg)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	}

	t.Run("echo", func(t *testing.T) {
		// The server echoes; the attacker never reads the echo, so the
		// server blocks in Write, stops reading, and the attacker blocks.
		checkNoGoroutineLeak(t)
		s := newAbuseServer(t, nil)
		c, sc, err := s.dialLegit(t, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		sampler := startSampler(10 * time.Millisecond)
		echoDone := make(chan struct{})
		go func() {
			defer close(echoDone)
			io.Copy(sc, sc)
		}()
		var written atomic.Int64
		writerDone := make(chan struct{})
		go func() {
			defer close(writerDone)
			writeForever(c, 64<<10, &written, nil)
		}()
		time.Sleep(run)
		w1 := written.Load()
		time.Sleep(300 * time.Millisecond)
		w2 := written.Load()
		held := sampler.held()
		peak := sampler.finish()
		t.Logf("attacker wrote %d KiB, then stalled (%d KiB more in 300ms); live heap growth: peak %d KiB, held while stalled %d KiB",
			w1>>10, (w2-w1)>>10, peak.liveHeap>>10, held>>10)
		if w2 != w1 {
			t.Errorf("the attacker's writes never block: %d bytes more after %v", w2-w1, run)
		}
		if peak.liveHeap > heapSlack(peakLimit) || held > heapSlack(heldLimit) {
			t.Errorf("heap growth: peak %d KiB, held %d KiB", peak.liveHeap>>10, held>>10)
		}
		c.Close()
		sc.Close()
		<-writerDone
		<-echoDone
	})

	t.Run("discard", func(t *testing.T) {
		// The server reads and discards as fast as it can: data flows the
		// whole time and nothing may accumulate.
		checkNoGoroutineLeak(t)
		s := newAbuseServer(t, nil)
		c, sc, err := s.dialLegit(t, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		sampler := startSampler(10 * time.Millisecond)
		readDone := make(chan struct{})
		go func() {
			defer close(readDone)
			io.Copy(io.Discard, sc)
		}()
		var written atomic.Int64
		writerDone := make(chan struct{})
		stop := make(chan struct{})
		go func() {
			defer close(writerDone)
			writeForever(c, 1000, &written, stop)
		}()
		time.Sleep(run)
		close(stop)
		<-writerDone
		time.Sleep(50 * time.Millisecond) // the reader drains and blocks
		held := sampler.held()
		peak := sampler.finish()
		t.Logf("attacker wrote %d MiB in %v; live heap growth: peak %d KiB, held once drained %d KiB",
			written.Load()>>20, run, peak.liveHeap>>10, held>>10)
		if written.Load() < 1<<20 {
			t.Errorf("only %d bytes got through", written.Load())
		}
		if peak.liveHeap > heapSlack(peakLimit) || held > heapSlack(heldLimit) {
			t.Errorf("heap growth: peak %d KiB, held %d KiB", peak.liveHeap>>10, held>>10)
		}
		c.Close()
		sc.Close()
		<-writerDone
		<-readDone
	})

	t.Run("empty-records", func(t *testing.T) {
		// Authenticated records that carry no data (empty data and rekey
		// records), forever: the server's Read gives up on such a peer
		// after a few, with ErrFrame, instead of decrypting forever, and
		// holds nothing meanwhile.
		checkNoGoroutineLeak(t)
		s := newAbuseServer(t, nil)
		c, sc, err := s.dialLegit(t, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		nc := c.(*Conn)
		sampler := startSampler(10 * time.Millisecond)
		var records atomic.Int64
		stop := make(chan struct{})
		writerDone := make(chan struct{})
		go func() {
			defer close(writerDone)
			var out []byte
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				nc.out.mu.Lock()
				out = out[:0]
				for j := range 64 {
					if (i+j)%8 == 7 {
						out = nc.out.half.seal(out, recordRekey, nil)
						nc.out.half.rekey()
					} else {
						out = nc.out.half.seal(out, recordData, nil)
					}
				}
				_, err := nc.conn.Write(out)
				nc.out.mu.Unlock()
				if err != nil {
					return
				}
				records.Add(64)
			}
		}()
		sc.SetReadDeadline(time.Now().Add(run))
		start := time.Now()
		n, err := sc.Read(make([]byte, 100))
		readTime := time.Since(start)
		peak := sampler.finish()
		t.Logf("%d empty records sent; Read returned %d, %v after %v; live heap growth: peak %d KiB",
			records.Load(), n, err, readTime.Round(time.Millisecond), peak.liveHeap>>10)
		if !errors.Is(err, ErrFrame) || !strings.Contains(err.Error(), "without data") {
			t.Errorf("Read under empty records: %d, %v; want ErrFrame", n, err)
		}
		if readTime > run {
			t.Errorf("Read gave up only after %v", readTime)
		}
		if peak.liveHeap > heapSlack(peakLimit) {
			t.Errorf("heap growth: peak %d KiB", peak.liveHeap>>10)
		}
		// The server drops such a peer without a clean close.
		sc.Close()
		close(stop)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c); !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("the empty-record sender read %v, want a truncation", err)
		}
		c.Close()
		<-writerDone
	})

	t.Run("many-non-readers", func(t *testing.T) {
		// Many peers that never read while the server writes small
		// responses to each: every server Write ends up blocked. What each
		// blocked connection holds is heap that Write keeps while it waits.
		// Nothing allocates once all are blocked, so this figure is exact
		// even under the race detector.
		checkNoGoroutineLeak(t)
		const conns = 50
		const perConnLimit = 64 << 10
		s := newAbuseServer(t, nil)
		var clients, servers []net.Conn
		defer func() {
			for _, c := range append(clients, servers...) {
				c.Close()
			}
		}()
		for range conns {
			c, sc, err := s.dialLegit(t, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			// Small socket buffers fill in a few hundred writes, which
			// keeps this quick under the race detector.
			c.(*Conn).NetConn().(*net.TCPConn).SetReadBuffer(4096)
			sc.(*Conn).NetConn().(*net.TCPConn).SetWriteBuffer(4096)
			clients, servers = append(clients, c), append(servers, sc)
		}
		base := settledMemStats().HeapAlloc
		var written atomic.Int64
		var writers sync.WaitGroup
		for _, sc := range servers {
			writers.Add(1)
			go func() {
				defer writers.Done()
				writeForever(sc, 100, &written, nil)
			}()
		}
		// Wait until every writer is blocked: no progress for 200ms.
		last := int64(-1)
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
			time.Sleep(200 * time.Millisecond)
			if w := written.Load(); w == last {
				break
			} else {
				last = w
			}
		}
		held := int64(settledMemStats().HeapAlloc) - int64(base)
		t.Logf("%d connections whose peer never reads: %d KiB written in all, then every server Write blocked holding %d KiB of heap per connection",
			conns, last>>10, held/conns>>10)
		if held/conns > perConnLimit {
			t.Errorf("each blocked connection holds %d KiB", held/conns>>10)
		}
		for _, c := range append(clients, servers...) {
			c.Close()
		}
		writers.Wait()
	})
}
