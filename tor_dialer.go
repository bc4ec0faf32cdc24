package noisetor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/proxy"
)

// Dialing through tor's SOCKS port: TorDialer, TorDialError and what tor's
// SOCKS replies mean.

// A TorDialer connects through tor's SOCKS5 port. Each destination gets its
// own circuits (stream isolation by SOCKS username). Use it as the
// NetDialer of a noisetor Dialer:
//
//	d := &noisetor.Dialer{Config: cfg, NetDialer: &noisetor.TorDialer{Tor: t, ClientAuth: key}}
type TorDialer struct {
	// Tor is the tor to dial through. Required.
	Tor *Tor

	// ClientAuth, if set, is this machine's client-authorization key. Before
	// the first dial to an onion address it is registered with tor for that
	// address (ONION_CLIENT_AUTH_ADD), and again after a tor restart.
	ClientAuth *ClientAuthKey

	// RetryFor bounds how long a dial takes: failures that may pass
	// (descriptor not found yet, introduction or rendezvous failures) are
	// retried with backoff until then, and an attempt still waiting on tor
	// is cut off then (or at the context's deadline, if sooner), with an
	// error that matches context.DeadlineExceeded. Default
	// DefaultTorRetryFor; negative: one attempt, bounded by
	// DefaultTorRetryFor. Failures that will not pass (client authorization
	// refused, tor down) return at once.
	RetryFor time.Duration

	isolation string // SOCKS username; default "noisetor:" + the address
}

var (
	_ ContextDialer = (*TorDialer)(nil)
	_ ContextDialer = (*Tor)(nil)
)

// Dialer returns a TorDialer through t that registers clientAuth (which may
// be nil) for the onion services it dials.
func (t *Tor) Dialer(clientAuth *ClientAuthKey) *TorDialer {
	return &TorDialer{Tor: t, ClientAuth: clientAuth}
}

// DialContext is TorDialer{Tor: t}.DialContext: it dials addr through tor.
func (t *Tor) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return (&TorDialer{Tor: t}).DialContext(ctx, network, addr)
}

// DefaultTorRetryFor is TorDialer.RetryFor's default.
const DefaultTorRetryFor = 30 * time.Second

// DialContext connects to addr, "host:port" (normally "<id>.onion:port"),
// through tor. network must be "tcp".
//
// It returns within RetryFor (or ctx's deadline, if sooner) whatever tor
// does: each SOCKS attempt is cut off there, and then the error matches
// context.DeadlineExceeded and says what tor last reported.
func (d *TorDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if d.Tor == nil {
		return nil, errors.New("noisetor: TorDialer.Tor is nil")
	}
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("noisetor: tor dials tcp only, not %q", network)
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	port, _ := strconv.Atoi(portStr)
	t := d.Tor
	retryFor := d.RetryFor
	if retryFor == 0 {
		retryFor = DefaultTorRetryFor
	}
	start := time.Now()
	// Without retries, the one attempt is still bounded.
	giveUp := start.Add(retryFor)
	if retryFor < 0 {
		giveUp = start.Add(DefaultTorRetryFor)
	}
	isOnion := strings.HasSuffix(strings.ToLower(host), ".onion")
	id := strings.TrimSuffix(strings.ToLower(host), ".onion")
	// Everything below, control-port requests included, ends at giveUp.
	dctx, dcancel := context.WithDeadline(ctx, giveUp)
	defer dcancel()
	var last *TorDialError
	timeout := func() error {
		if err := ctx.Err(); err != nil {
			return torTimeout(addr, start, err, last, isOnion)
		}
		return torTimeout(addr, start, context.DeadlineExceeded, last, isOnion)
	}
	if d.ClientAuth != nil && isOnion {
		t.mu.Lock()
		t.clientAuth[id] = d.ClientAuth
		t.mu.Unlock()
		s, err := t.session(dctx)
		if err != nil {
			if dctx.Err() != nil {
				return nil, timeout()
			}
			return nil, err
		}
		if err := s.registerClientAuth(dctx, id, d.ClientAuth, false); err != nil {
			if dctx.Err() != nil {
				return nil, timeout()
			}
			return nil, fmt.Errorf("noisetor: registering client-auth key for %s: %w", host, err)
		}
	}
	isolation := d.isolation
	if isolation == "" {
		isolation = "noisetor:" + addr
	}
	// After a failed attempt, later ones use new circuits. A dial that
	// reached a service's introduction point just as the service's tor died
	// leaves tor waiting for a rendezvous that never comes, and tor attaches
	// every later stream of the same isolation to that circuit: a client
	// stayed out for over a minute after the service was back.
	user := func() string {
		t.mu.Lock()
		defer t.mu.Unlock()
		return fmt.Sprintf("%s#%d", isolation, t.circuits[isolation])
	}
	freshCircuits := func() {
		t.mu.Lock()
		t.circuits[isolation]++
		t.mu.Unlock()
	}
	backoff := 250 * time.Millisecond
	authRetried := false
	for attempt := 1; ; attempt++ {
		s, err := t.session(dctx)
		if err != nil {
			if dctx.Err() != nil {
				return nil, timeout()
			}
			return nil, err
		}
		if isOnion && port > 0 {
			s.addLongLivedPort(dctx, port)
		}
		c, err := s.dialSOCKS(dctx, user(), addr)
		if err == nil {
			return torStream{c}, nil
		}
		freshCircuits()
		if dctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, timeout()
		}
		derr := classifySOCKSError(addr, err)
		if derr.Reply == 0 && !derr.torDown && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
			// tor hung up mid-exchange: if it is dying, say so.
			select {
			case <-s.done:
				derr.Reason, derr.torDown = "tor went down", true
			case <-time.After(500 * time.Millisecond):
			}
		}
		if derr.Reply == 0x01 && s.noExtendedErrors {
			derr.Reason = "general failure (tor's SocksPort lacks the ExtendedErrors flag, so tor does not say why)"
		}
		if derr.Reply == 0xF4 && d.ClientAuth != nil && !authRetried {
			// tor has lost our key (a NEWNYM from another controller drops
			// them all, and the SIGNAL event may not have been handled
			// yet): register it again and retry at once, once.
			authRetried = true
			if err := s.registerClientAuth(dctx, id, d.ClientAuth, true); err == nil {
				t.log.Info("noisetor: tor had lost our client-auth key; registered it again", "onion", host)
				continue
			}
		}
		if !derr.temporary() || retryFor < 0 {
			return nil, derr
		}
		last = derr
		if dl, _ := dctx.Deadline(); time.Now().Add(backoff).After(dl) {
			return nil, timeout()
		}
		t.log.Debug("noisetor: tor dial failed; retrying", "addr", addr, "attempt", attempt, "err", derr, "retry_in", backoff)
		select {
		case <-time.After(backoff):
		case <-dctx.Done():
			return nil, timeout()
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// dialSOCKS makes one SOCKS5 request to tor. Tor isolates streams with
// different SOCKS credentials onto different circuits (IsolateSOCKSAuth is
// on by default).
func (s *torSession) dialSOCKS(ctx context.Context, user, addr string) (net.Conn, error) {
	auth := &proxy.Auth{User: user, Password: "noisetor"}
	sd, err := proxy.SOCKS5(s.socksNet, s.socksAddr, auth, &net.Dialer{})
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	return sd.(proxy.ContextDialer).DialContext(ctx, "tcp", addr)
}

// torTimeout is the error of a dial that ran out of time: cause is the
// context's error, last what tor said on the attempt before, if anything.
func torTimeout(addr string, start time.Time, cause error, last *TorDialError, onion bool) *TorDialError {
	return &TorDialError{
		Addr:    addr,
		Reason:  fmt.Sprintf("no connection after %v", time.Since(start).Round(100*time.Millisecond)),
		Err:     cause,
		Last:    last,
		timeout: onion,
	}
}

// A TorDialError reports a connection that tor could not make.
type TorDialError struct {
	Addr   string // the destination
	Reply  int    // the SOCKS5 reply code, or 0 if the SOCKS exchange did not get that far
	Reason string // what the reply code means
	Err    error  // the underlying error; context.DeadlineExceeded if the dial ran out of time

	// Last, for a dial that ran out of time, is the failure tor reported on
	// the attempt before, if any.
	Last *TorDialError

	torDown bool // tor's SOCKS port could not be reached
	timeout bool // an onion dial that ran out of time
}

// Error says which destination failed and why, in tor's terms.
func (e *TorDialError) Error() string {
	if e.Reply != 0 {
		return fmt.Sprintf("noisetor: tor could not connect to %s: %s (SOCKS reply 0x%02x)", e.Addr, e.Reason, e.Reply)
	}
	msg := fmt.Sprintf("noisetor: tor could not connect to %s: %s: %v", e.Addr, e.Reason, e.Err)
	if errors.Is(e.Err, context.DeadlineExceeded) || errors.Is(e.Err, context.Canceled) {
		if e.Last != nil {
			msg += fmt.Sprintf("; tor said last: %s (SOCKS reply 0x%02x)", e.Last.Reason, e.Last.Reply)
		} else {
			msg += "; tor gave no reason (no circuit in time: is the Tor network reachable?)"
		}
	}
	return msg
}

// Unwrap returns the underlying error and, where one applies,
// ErrOnionClientAuth, ErrOnionUnreachable or ErrTorDown.
func (e *TorDialError) Unwrap() []error {
	errs := []error{e.Err}
	switch e.Reply {
	case 0xF4, 0xF5:
		errs = append(errs, ErrOnionClientAuth)
	case 0xF0, 0xF1, 0xF2, 0xF3, 0xF6, 0xF7, 0x01, 0x04, 0x06:
		errs = append(errs, ErrOnionUnreachable)
	case 0:
		if e.torDown {
			errs = append(errs, ErrTorDown)
		}
		if e.timeout {
			errs = append(errs, ErrOnionUnreachable)
		}
	}
	return errs
}

// temporary reports whether a retry may succeed.
func (e *TorDialError) temporary() bool {
	switch e.Reply {
	case 0xF0, 0xF2, 0xF3, 0xF7, 0x01, 0x04, 0x06:
		return true
	}
	return false
}

// socksReasons explains the SOCKS5 replies, including tor's extended
// onion-service codes (SocksPort ExtendedErrors; tor(1)).
var socksReasons = map[int]string{
	0x01: "general failure (tor gives details only if its SocksPort has the ExtendedErrors flag)",
	0x02: "not allowed by tor's rules",
	0x03: "network unreachable",
	0x04: "host unreachable",
	0x05: "connection refused by the destination (nothing listening on that port, or the onion service's MaxStreams reached?)",
	0x06: "timed out",
	0x07: "command not supported",
	0x08: "address type not supported",
	0xF0: "onion service descriptor not found (not published, or not yet)",
	0xF1: "onion service descriptor is invalid",
	0xF2: "onion service introduction failed",
	0xF3: "onion service rendezvous failed",
	0xF4: "the onion service requires client authorization and this tor has no key for it",
	0xF5: "client authorization refused: the onion service does not list our client-auth key (are we in its keyring?)",
	0xF6: "invalid onion address",
	0xF7: "onion service introduction timed out",
}

// classifySOCKSError turns an error of golang.org/x/net/proxy into a
// *TorDialError. x/net reports a failed reply only as text: "unknown error
// <reply>", where <reply> is its name for codes 1-8 and "unknown code: N"
// for the rest.
func classifySOCKSError(addr string, err error) *TorDialError {
	e := &TorDialError{Addr: addr, Err: err}
	msg := err.Error()
	if i := strings.Index(msg, "unknown code: "); i >= 0 {
		n, _ := strconv.Atoi(strings.TrimRightFunc(msg[i+len("unknown code: "):], func(r rune) bool { return r < '0' || r > '9' }))
		e.Reply = n
	} else {
		for code, name := range socksStandardNames {
			if strings.Contains(msg, "unknown error "+name) {
				e.Reply = code
			}
		}
	}
	if e.Reply != 0 {
		e.Reason = socksReasons[e.Reply]
		if e.Reason == "" {
			e.Reason = "SOCKS failure"
		}
		return e
	}
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist) {
		e.Reason = "cannot reach tor's SOCKS port (tor is down?)"
		e.torDown = true
	} else {
		e.Reason = "SOCKS exchange with tor failed"
	}
	return e
}

// socksStandardNames are x/net's names of the SOCKS5 replies 1-8.
var socksStandardNames = map[int]string{
	0x01: "general SOCKS server failure",
	0x02: "connection not allowed by ruleset",
	0x03: "network unreachable",
	0x04: "host unreachable",
	0x05: "connection refused",
	0x06: "TTL expired",
	0x07: "command not supported",
	0x08: "address type not supported",
}
