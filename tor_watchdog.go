package noisetor

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Reachability checks of our own onion services. An onion service can stop
// being reachable while its tor looks healthy: introduction circuits that
// hang, a descriptor that the directories lost. Tor heals some of this by
// itself, in tens of minutes; operators heal it by removing the service and
// adding it again. The watchdog does what a client does, from the service's
// own tor: it connects to the service's address on a fresh circuit (new
// SOCKS credentials), fetching the descriptor and going through an
// introduction point and a rendezvous like anyone else, and republishes the
// service when that fails twice in a row.
//
// The check connects to a second virtual port of the service (checkPort),
// forwarded to a listener of its own that echoes a 16-byte nonce, so that
// checks never reach the application's Accept and a success proves the
// whole path. With client authorization, the service lists one more
// client-auth key, made for the checks and never stored.

// checkFailuresBeforeRepublish: one failed check may be a slow circuit.
const checkFailuresBeforeRepublish = 2

// An OnionState is the state of an onion service, as OnionListener.Status
// reports it.
type OnionState int

const (
	// OnionPublishing: the service is being published (descriptor not yet
	// uploaded on the current run of tor, e.g. after a tor restart).
	OnionPublishing OnionState = iota
	// OnionPublished: the descriptor is uploaded, and no check has reached
	// the service since (or checks are off).
	OnionPublished
	// OnionReachable: the last check reached the service through Tor.
	OnionReachable
	// OnionUnreachable: the last checks failed; the service is republished
	// until a check succeeds again.
	OnionUnreachable
	// OnionClosed: the listener (or its Tor) is closed.
	OnionClosed
)

var onionStateNames = [...]string{"publishing", "published", "reachable", "unreachable", "closed"}

// String returns the state's name: "publishing", "published", "reachable",
// "unreachable" or "closed".
func (s OnionState) String() string {
	if s >= 0 && int(s) < len(onionStateNames) {
		return onionStateNames[s]
	}
	return fmt.Sprintf("OnionState(%d)", int(s))
}

// OnionStatus is the state of an onion service and of its reachability
// checks.
type OnionStatus struct {
	State        OnionState
	Publications int       // descriptors uploaded, over every run of tor
	LastUpload   time.Time // when a directory last accepted the descriptor; zero if none yet
	LastCheck    time.Time // when the last check ended; zero if none yet
	LastReached  time.Time // when a check last reached the service
	Failures     int       // checks failed in a row
	Err          error     // why the last check failed, if it did
	Republished  int       // times the checks removed and added the service again
}

// onionCheck is the configuration and machinery of the checks of one
// service.
type onionCheck struct {
	port     int          // virtual port of the checks
	target   string       // its ADD_ONION target
	ln       net.Listener // echoes the checks' nonces
	key      *ClientAuthKey
	authPub  string // key's public half, for ADD_ONION ClientAuthV3
	interval time.Duration
	timeout  time.Duration
}

// onionHealth is the state of the checks, guarded by OnionListener.mu.
type onionHealth struct {
	lastCheck, lastOK time.Time
	failures          int
	err               error
	republished       int

	notify chan struct{} // a state change to report to OnStatus
	cancel context.CancelFunc
	wg     sync.WaitGroup
	conns  map[net.Conn]struct{} // check connections being echoed
}

func newOnionCheck(l *OnionListener, cfg *OnionConfig) (*onionCheck, error) {
	c := &onionCheck{interval: cfg.CheckInterval, timeout: cfg.CheckTimeout, port: 65535}
	if c.interval == 0 {
		c.interval = DefaultOnionCheckInterval
	}
	if c.timeout <= 0 {
		c.timeout = DefaultOnionCheckTimeout
	}
	if cfg.Port == c.port {
		c.port--
	}
	if !l.noAuth {
		var err error
		if c.key, err = GenerateClientAuthKey(nil); err != nil {
			return nil, err
		}
		c.authPub = c.key.PublicKey()
	}
	var err error
	if c.ln, c.target, err = l.t.onionTarget(nil, "check-"+l.id[:16]); err != nil {
		return nil, err
	}
	return c, nil
}

// Status returns the service's state and that of its reachability checks.
func (l *OnionListener) Status() OnionStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.statusLocked()
}

func (l *OnionListener) statusLocked() OnionStatus {
	h := &l.health
	st := OnionStatus{
		Publications: l.pubCount, LastUpload: l.lastUpload, LastCheck: h.lastCheck, LastReached: h.lastOK,
		Failures: h.failures, Err: h.err, Republished: h.republished,
	}
	switch {
	case l.closed:
		st.State = OnionClosed
	case h.failures >= checkFailuresBeforeRepublish:
		st.State = OnionUnreachable
	case !l.isPub:
		st.State = OnionPublishing
	case l.check != nil && !h.lastOK.IsZero() && h.failures == 0:
		st.State = OnionReachable
	default:
		st.State = OnionPublished
	}
	return st
}

// changed tells the OnStatus goroutine to look at the status. Called with
// l.mu held, or not.
func (l *OnionListener) changed() {
	select {
	case l.health.notify <- struct{}{}:
	default:
	}
}

// startCheck starts the checks and the OnStatus goroutine, once the
// service is first published.
func (l *OnionListener) startCheck() {
	if l.check == nil && l.onStatus == nil {
		return
	}
	ctx, cancel := context.WithCancel(l.t.ctx)
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		cancel()
		return
	}
	h := &l.health
	h.cancel = cancel
	h.notify = make(chan struct{}, 1)
	h.conns = make(map[net.Conn]struct{})
	l.mu.Unlock()
	if l.onStatus != nil {
		h.wg.Add(1)
		go l.reportStatus(ctx)
		l.changed()
	}
	if l.check != nil {
		h.wg.Add(2)
		go l.serveChecks()
		go l.checkLoop(ctx)
	}
}

// stopCheck stops what startCheck started and waits for it. It must not be
// called with l.pubMu held: checkLoop may be republishing.
func (l *OnionListener) stopCheck() {
	l.mu.Lock()
	h := &l.health
	cancel := h.cancel
	h.cancel = nil
	for c := range h.conns {
		c.Close()
	}
	l.mu.Unlock()
	if l.check != nil {
		l.check.ln.Close()
	}
	if cancel != nil {
		cancel()
		h.wg.Wait()
	}
	if l.check != nil && l.check.key != nil {
		t := l.t
		t.mu.Lock()
		if t.clientAuth[l.id] == l.check.key {
			delete(t.clientAuth, l.id)
		}
		t.mu.Unlock()
	}
}

// reportStatus calls OnStatus whenever the state changes, until the
// listener is closed.
func (l *OnionListener) reportStatus(ctx context.Context) {
	defer l.health.wg.Done()
	last := OnionState(-1)
	report := func() {
		if st := l.Status(); st.State != last {
			last = st.State
			l.onStatus(st)
		}
	}
	for {
		select {
		case <-l.health.notify:
			report()
		case <-ctx.Done():
			return
		}
	}
}

// serveChecks echoes the nonce of each check connection.
func (l *OnionListener) serveChecks() {
	defer l.health.wg.Done()
	for {
		c, err := l.check.ln.Accept()
		if err != nil {
			return
		}
		l.mu.Lock()
		if l.health.cancel == nil {
			l.mu.Unlock()
			c.Close()
			return
		}
		l.health.conns[c] = struct{}{}
		l.health.wg.Add(1)
		l.mu.Unlock()
		go func() {
			defer l.health.wg.Done()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.CopyN(c, c, 16)
			c.Close()
			l.mu.Lock()
			delete(l.health.conns, c)
			l.mu.Unlock()
		}()
	}
}

// checkLoop checks the service every interval (more often while it fails)
// and republishes it after checkFailuresBeforeRepublish failures in a row.
func (l *OnionListener) checkLoop(ctx context.Context) {
	defer l.health.wg.Done()
	c := l.check
	wait := min(c.interval, 10*time.Second)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		l.mu.Lock()
		published := l.isPub
		l.mu.Unlock()
		if !published {
			// tor is down or (re)publishing: the supervisor is on it.
			wait = min(c.interval, 5*time.Second)
			continue
		}
		start := time.Now()
		err := l.checkOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		l.mu.Lock()
		h := &l.health
		h.lastCheck = time.Now()
		if err == nil {
			recovered := h.failures >= checkFailuresBeforeRepublish
			h.failures, h.err, h.lastOK = 0, nil, h.lastCheck
			l.mu.Unlock()
			l.changed()
			if recovered {
				l.t.log.Info("noisetor: onion service reachable again", "onion", l.OnionAddress())
			} else {
				l.t.log.Debug("noisetor: onion service reachable", "onion", l.OnionAddress(), "check", time.Since(start).Round(time.Millisecond))
			}
			wait = c.interval
			continue
		}
		h.failures++
		h.err = err
		n := h.failures
		l.mu.Unlock()
		l.changed()
		wait = min(c.interval, 30*time.Second)
		if n < checkFailuresBeforeRepublish {
			l.t.log.Warn("noisetor: onion service check failed; checking again", "onion", l.OnionAddress(), "err", err, "retry_in", wait)
			continue
		}
		l.t.log.Error("noisetor: onion service unreachable through Tor; publishing it again", "onion", l.OnionAddress(), "failures", n, "err", err)
		if err := l.republish(true); err != nil && ctx.Err() == nil {
			l.t.log.Error("noisetor: republishing the onion service", "onion", l.OnionAddress(), "err", err)
		}
	}
}

// checkOnce connects to the service's check port through tor on a new
// circuit and has a random nonce echoed.
func (l *OnionListener) checkOnce(ctx context.Context) error {
	c := l.check
	var nonce [16]byte
	rand.Read(nonce[:])
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	d := &TorDialer{Tor: l.t, ClientAuth: c.key, RetryFor: c.timeout, isolation: "noisetor-check:" + hex.EncodeToString(nonce[:8])}
	if c.key != nil && !l.t.owned {
		// An attached tor's SOCKS port may be open to other local users:
		// the checks' key must not stay registered there, or they could
		// use it to pass our client authorization. (Removing it also drops
		// the descriptor it decrypted.)
		defer l.forgetCheckKey()
	}
	conn, err := d.DialContext(ctx, "tcp", fmt.Sprintf("%s.onion:%d", l.id, c.port))
	if err != nil {
		return err
	}
	defer conn.Close()
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	if _, err := conn.Write(nonce[:]); err != nil {
		return fmt.Errorf("noisetor: onion service check: %w", err)
	}
	var echo [16]byte
	if _, err := io.ReadFull(conn, echo[:]); err != nil {
		return fmt.Errorf("noisetor: onion service check: no echo: %w", err)
	}
	if !bytes.Equal(echo[:], nonce[:]) {
		return fmt.Errorf("noisetor: onion service check: wrong echo")
	}
	return nil
}

// forgetCheckKey removes the checks' client-auth key from tor.
func (l *OnionListener) forgetCheckKey() {
	t := l.t
	t.mu.Lock()
	if t.clientAuth[l.id] == l.check.key {
		delete(t.clientAuth, l.id)
	}
	s := t.sess
	t.mu.Unlock()
	if s == nil {
		return
	}
	s.authMu.Lock()
	if s.registered[l.id] == l.check.key {
		delete(s.registered, l.id)
	}
	s.authMu.Unlock()
	ctx, cancel := context.WithTimeout(t.ctx, 5*time.Second)
	defer cancel()
	s.ctl.request(ctx, "ONION_CLIENT_AUTH_REMOVE", "ONION_CLIENT_AUTH_REMOVE "+l.id)
}

// republish removes the service from tor and adds it again (DEL_ONION,
// ADD_ONION, in one write): tor then picks new introduction points and
// uploads a new descriptor, made with the client-auth keys of the keyring
// as it is now. byChecks counts it in OnionStatus.Republished.
//
// Established connections survive it: DEL_ONION closes the service's
// introduction circuits but not its rendezvous circuits, "in order for any
// existing connections to finish" (hs_service_del_ephemeral in tor's
// src/feature/hs/hs_service.c). A new stream on such a circuit finds the
// service again by its identity key (hs_service_set_conn_addr_port), so it
// reaches us even from a client whose key the new descriptor lacks. But one
// that arrived while tor had no such service would make tor close the
// whole circuit, with the streams on it (handle_hs_exit_conn in
// connection_edge.c): hence one write, which tor runs without a break.
func (l *OnionListener) republish(byChecks bool) error {
	t := l.t
	t.mu.Lock()
	s := t.sess
	t.mu.Unlock()
	if s == nil {
		return ErrTorDown
	}
	l.pubMu.Lock()
	defer l.pubMu.Unlock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrTorClosed
	}
	l.pubSess = nil
	if l.isPub {
		l.isPub = false
		l.published = make(chan struct{})
	}
	l.published0 = time.Now()
	if byChecks {
		l.health.republished++
	}
	l.mu.Unlock()
	l.changed()
	// Replace even if l was not on s: a failed or timed-out ADD_ONION may
	// have left it there.
	return l.addOnion(s, true)
}
