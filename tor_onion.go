package noisetor

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cretz/bine/control"
)

// Onion services: OnionConfig, OnionListener and OnionAddr, published with
// ADD_ONION. Their reachability checks are in tor_watchdog.go, their client
// authorization following the keyring in tor_revoke.go.

// OnionConfig configures Tor.ListenOnion.
type OnionConfig struct {
	// KeyFile is the onion service's ed25519 key file. If it does not exist,
	// a new key is generated and saved there (mode 0600); after that the
	// service keeps its address. A file that group or others may read is
	// refused. Either KeyFile or Key is required.
	KeyFile string

	// Key is the onion service key, if not read from KeyFile.
	Key *OnionKey

	// Port is the virtual port clients connect to, as in "<id>.onion:Port".
	// Required.
	Port int

	// Keyring lists the peers that may connect: the ClientAuth keys of its
	// peers are the service's client authorizations (Tor v3 client auth), so
	// nobody else can even fetch the service's descriptor. The keyring is
	// read each time the service is published (also after a tor restart),
	// and when a change of it (Keyring.Remove, Keyring.Update) changes its
	// set of ClientAuth keys, the service is published again with the new
	// set, which keeps established connections: from then on, tor refuses
	// a removed peer's new rendezvous. If no key is left (and ClientAuth
	// adds none), the service is removed from tor until the keyring has one
	// again.
	Keyring *Keyring

	// ClientAuth lists more client-authorization public keys (52-character
	// base32), beyond those of Keyring.
	ClientAuth []string

	// NoClientAuth publishes the service without client authorization,
	// ignoring any auth= keys of Keyring and ClientAuth: anyone who learns
	// the address can connect (the Noise handshake still admits only
	// keyring peers). Without it, ListenOnion refuses to publish a service
	// that no key is authorized for.
	NoClientAuth bool

	// PoWDefense selects tor's proof-of-work defense against introduction
	// floods (PoWDefensesEnabled=1): while the service is flooded, clients
	// must solve a puzzle, which a member's tor does in the background.
	// Default PoWAuto.
	PoWDefense PoWMode

	// MaxStreams bounds the streams (connections) one client circuit may
	// open to the service at once (ADD_ONION MaxStreams), so that one
	// client, authorized or not, cannot open connections without end.
	// A TorDialer puts every connection to one service on one circuit.
	// Default DefaultOnionMaxStreams; negative: no limit.
	MaxStreams int

	// MaxStreamsKeepCircuit makes tor refuse the streams beyond MaxStreams
	// and keep the circuit. By default tor closes a circuit that asks for
	// more (MaxStreamsCloseCircuit=1): a client doing that is misbehaving,
	// and closing costs it a new rendezvous.
	MaxStreamsKeepCircuit bool

	// Listener is the local listener that tor forwards connections to.
	// Default: with a Tor from StartTor, a Unix socket in tor's data
	// directory (mode 0700), which no other local user can reach; with an
	// attached Tor, whose tor may run as another user, a TCP listener on
	// 127.0.0.1 with a random port, which any local user can reach,
	// bypassing client authorization (the Noise handshake still admits only
	// keyring peers). A *net.UnixListener is forwarded to as unix:<path>.
	Listener net.Listener

	// CheckInterval is how often the service checks that it can be reached
	// (see OnionListener.Status): it connects to its own address through
	// tor, on a new circuit each time, as a client would. After two failed
	// checks in a row it publishes itself again (DEL_ONION, ADD_ONION),
	// which heals a service that tor no longer makes reachable. Default
	// DefaultOnionCheckInterval; negative: no checks.
	CheckInterval time.Duration

	// CheckTimeout bounds one check. Default DefaultOnionCheckTimeout.
	CheckTimeout time.Duration

	// OnStatus, if set, is called with the service's status each time its
	// State changes (changes in quick succession may be reported once, with
	// the latest status), from when ListenOnion returns until Close. It runs
	// on its own goroutine, one call at a time; Close waits for a call in
	// progress, so it must not block.
	OnStatus func(OnionStatus)
}

// A PoWMode selects an onion service's proof-of-work defense.
type PoWMode int

const (
	// PoWAuto turns the defense on where the tor has it. The tors of
	// Debian and the Tor Project have it; the embedded tor of the default
	// (BSD-licensed) build does not, and then ListenOnion logs that the
	// service runs without it. (Such a tor accepts PoWDefensesEnabled=1 and
	// silently ignores it.) An attached tor is asked for it and cannot be
	// checked.
	PoWAuto PoWMode = iota

	// PoWRequire is PoWAuto, except that ListenOnion fails on a tor known to
	// lack the defense.
	PoWRequire

	// PoWOff publishes without the defense.
	PoWOff
)

// DefaultOnionMaxStreams is OnionConfig.MaxStreams's default: above
// RelayServer's default MaxSessionsPerPeer (64), so that a sync server's
// client can use all its sessions over its one circuit.
const DefaultOnionMaxStreams = 128

// Defaults of the reachability checks of an onion service.
const (
	DefaultOnionCheckInterval = 5 * time.Minute
	DefaultOnionCheckTimeout  = time.Minute
)

// An OnionListener is a v3 onion service whose connections arrive on a
// local listener. It implements net.Listener; wrap it with NewListener to
// accept only authenticated noisetor connections. Every connection appears
// to come from 127.0.0.1 (or the unix socket).
type OnionListener struct {
	t          *Tor
	key        *OnionKey
	id         string // service ID: the address without ".onion"
	port       int
	inner      net.Listener
	target     string
	keyring    *Keyring
	extraAuth  []string
	noAuth     bool
	pow        bool // send PoWDefensesEnabled=1
	maxStreams int  // 0: no limit
	keepCirc   bool
	check      *onionCheck // nil: no reachability checks
	onStatus   func(OnionStatus)
	pubMu      sync.Mutex // serializes publish and Close
	mu         sync.Mutex
	pubSess    *torSession   // session the service was added on
	published  chan struct{} // closed once a descriptor is uploaded on pubSess
	isPub      bool
	pubCount   int    // descriptors published, over all runs of tor
	pubErr     string // reason of the last failed upload
	closed     bool
	health     onionHealth // reachability checks; see tor_watchdog.go
	published0 time.Time   // when ListenOnion began, for the log

	pubAuth []string  // client-auth keys sent to tor on pubSess, sorted (the checks' excluded)
	pubAt   time.Time // when isPub was last set
	auth    authSync  // republishing on keyring changes; see tor_revoke.go

	lastUpload time.Time // when a directory last accepted the descriptor, for Status
}

var _ net.Listener = (*OnionListener)(nil)

// ListenOnion publishes an onion service and returns once its descriptor
// has been uploaded to the network, or ctx ends. The service stays
// published (and is published again after a tor restart) until the
// listener is closed.
func (t *Tor) ListenOnion(ctx context.Context, cfg *OnionConfig) (*OnionListener, error) {
	if cfg == nil || cfg.Port <= 0 || cfg.Port > 65535 {
		return nil, errors.New("noisetor: OnionConfig.Port must be a port number")
	}
	key := cfg.Key
	pow := false
	switch cfg.PoWDefense {
	case PoWAuto, PoWRequire:
		pow = t.pow != powNo
		if t.pow == powNo {
			// Such a tor accepts PoWDefensesEnabled=1 and silently runs
			// without it.
			what := "the tor executable was built without onion-service proof-of-work (tor --list-modules says pow: no)"
			if t.embedded {
				what = "the embedded tor was built without onion-service proof-of-work (scripts/build-libtor.sh --gpl adds it, under the GPL-3.0)"
			}
			if cfg.PoWDefense == PoWRequire {
				return nil, errors.New("noisetor: PoWRequire: " + what)
			}
			t.log.Warn("noisetor: the onion service runs without proof-of-work defense against introduction floods: " + what)
		}
	case PoWOff:
	default:
		return nil, fmt.Errorf("noisetor: OnionConfig.PoWDefense %d is not a PoWMode", cfg.PoWDefense)
	}
	if key == nil {
		if cfg.KeyFile == "" {
			return nil, errors.New("noisetor: OnionConfig needs a KeyFile (or a Key)")
		}
		var created bool
		var err error
		if key, created, err = LoadOrCreateOnionKey(cfg.KeyFile); err != nil {
			return nil, err
		}
		if created {
			t.log.Info("noisetor: created onion service key", "file", cfg.KeyFile, "onion", key.Address())
		}
	}
	l := &OnionListener{
		t:          t,
		key:        key,
		id:         key.ServiceID(),
		port:       cfg.Port,
		keyring:    cfg.Keyring,
		extraAuth:  slices.Clone(cfg.ClientAuth),
		noAuth:     cfg.NoClientAuth,
		pow:        pow,
		maxStreams: cfg.MaxStreams,
		keepCirc:   cfg.MaxStreamsKeepCircuit,
		onStatus:   cfg.OnStatus,
		published:  make(chan struct{}),
		published0: time.Now(),
	}
	switch {
	case l.maxStreams == 0:
		l.maxStreams = DefaultOnionMaxStreams
	case l.maxStreams < 0:
		l.maxStreams = 0
	case l.maxStreams > 65535:
		return nil, errors.New("noisetor: OnionConfig.MaxStreams must be at most 65535")
	}
	if _, err := l.clientAuthKeys(); err != nil {
		return nil, err
	}
	var err error
	if l.inner, l.target, err = t.onionTarget(cfg.Listener, "onion-"+l.id[:16]); err != nil {
		return nil, err
	}
	if cfg.Listener != nil && t.owned {
		if _, ok := cfg.Listener.Addr().(*net.TCPAddr); ok {
			t.log.Warn("noisetor: the onion service forwards to a TCP listener, which any local user can connect to, bypassing Tor client authorization; leave OnionConfig.Listener nil for a Unix socket in tor's data directory",
				"onion", key.Address(), "listener", cfg.Listener.Addr().String())
		}
	}
	if cfg.CheckInterval >= 0 {
		if l.check, err = newOnionCheck(l, cfg); err != nil {
			l.inner.Close()
			return nil, err
		}
	}

	closeListeners := func() {
		l.inner.Close()
		if l.check != nil {
			l.check.ln.Close()
		}
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		closeListeners()
		return nil, ErrTorClosed
	}
	for o := range t.onions {
		if o.id == l.id {
			t.mu.Unlock()
			closeListeners()
			return nil, fmt.Errorf("noisetor: onion service %s is already open", key.Address())
		}
	}
	t.onions[l] = struct{}{}
	s := t.sess
	t.mu.Unlock()
	l.watchKeyring()
	if s != nil {
		if err := l.publish(s); err != nil {
			l.Close()
			return nil, err
		}
	}
	if err := l.WaitPublished(ctx); err != nil {
		l.Close()
		return nil, err
	}
	l.startCheck()
	l.startAuthSync()
	return l, nil
}

// onionTarget returns the listener that tor forwards an onion service's
// connections to, and its ADD_ONION target: ln if set, else a new Unix
// socket named name in a launched tor's data directory, or a TCP listener
// on 127.0.0.1 for an attached tor.
func (t *Tor) onionTarget(ln net.Listener, name string) (net.Listener, string, error) {
	if ln == nil && t.owned {
		path, err := torSocketPath(t.cfg.DataDir, name)
		if err != nil {
			return nil, "", err
		}
		os.Remove(path) // left by a killed process; the name is ours
		if ln, err = net.Listen("unix", path); err != nil {
			return nil, "", fmt.Errorf("noisetor: %w", err)
		}
	}
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return nil, "", fmt.Errorf("noisetor: %w", err)
		}
	}
	if a, ok := ln.Addr().(*net.UnixAddr); ok {
		// ADD_ONION's arguments are separated by spaces.
		if strings.ContainsAny(a.Name, " \t\r\n\"") {
			ln.Close()
			return nil, "", fmt.Errorf("noisetor: tor cannot forward an onion service to the Unix socket %q: its path has a space or quote", a.Name)
		}
		return ln, "unix:" + a.Name, nil
	}
	return ln, ln.Addr().String(), nil
}

// clientAuthKeys returns the ADD_ONION ClientAuthV3 values.
func (l *OnionListener) clientAuthKeys() ([]string, error) {
	var keys []string
	add := func(who, k string) error {
		s, err := parseClientAuthPublic(strings.TrimSpace(k))
		if err != nil {
			return fmt.Errorf("noisetor: client-auth key of %s: %w", who, err)
		}
		if !slices.Contains(keys, s) {
			keys = append(keys, s)
		}
		return nil
	}
	if l.keyring != nil {
		for _, p := range l.keyring.Peers() {
			if p.ClientAuth != "" {
				if err := add("peer "+p.Name, p.ClientAuth); err != nil {
					return nil, err
				}
			}
		}
	}
	for _, k := range l.extraAuth {
		if err := add("OnionConfig.ClientAuth", k); err != nil {
			return nil, err
		}
	}
	if l.noAuth {
		return nil, nil
	}
	if len(keys) == 0 {
		return nil, errors.New("noisetor: no client-authorization keys for the onion service: give keyring peers an auth= key, or set OnionConfig.NoClientAuth to publish it to anyone who knows the address")
	}
	return keys, nil
}

// publish adds the service to tor on session s (ADD_ONION with our key). The
// descriptor upload that follows is reported by an HS_DESC event.
func (l *OnionListener) publish(s *torSession) error {
	l.pubMu.Lock()
	defer l.pubMu.Unlock()
	return l.addOnion(s, false)
}

// addOnion is publish with l.pubMu held. With replace, the service is
// first removed (DEL_ONION) in the same write as the ADD_ONION, so that tor
// never runs without it in between (see republish); tor answers a DEL_ONION
// of a service it does not have with 552, and the ADD_ONION goes ahead.
func (l *OnionListener) addOnion(s *torSession, replace bool) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrTorClosed
	}
	if l.pubSess == s {
		l.mu.Unlock()
		return nil
	}
	// Set before ADD_ONION: the upload event may be read before the reply
	// reaches us.
	l.pubSess = s
	l.mu.Unlock()

	// stillOn: tor may still have the service, with the keys of before,
	// because a DEL_ONION failed; then pubSess stays s, so that a retry
	// replaces it again rather than only adding.
	stillOn := false
	delFailed := func(resp *control.Response, err error) bool {
		return err != nil && (resp == nil || resp.Err.Code != 552)
	}
	auth, err := l.clientAuthKeys()
	if err != nil && replace {
		// The keys tor has may include revoked ones: take the service
		// down rather than leave it published with them.
		ctx, cancel := context.WithTimeout(l.t.ctx, 30*time.Second)
		resp, derr := s.ctl.request(ctx, "DEL_ONION", "DEL_ONION "+l.id)
		cancel()
		if delFailed(resp, derr) {
			stillOn = true
			err = fmt.Errorf("%w; and removing the service from tor: %w", err, derr)
		}
	}
	if err == nil {
		cmd := l.addOnionCommand(auth)
		ctx, cancel := context.WithTimeout(l.t.ctx, 30*time.Second)
		s.addLongLivedPort(ctx, l.port)
		cancel()
		ctx, cancel = context.WithTimeout(l.t.ctx, 30*time.Second)
		var resp *control.Response
		if replace {
			resps, errs := s.ctl.requestBatch(ctx, []string{"DEL_ONION", "ADD_ONION"}, []string{"DEL_ONION " + l.id, cmd})
			resp, err = resps[1], errs[1]
			if err != nil && delFailed(resps[0], errs[0]) {
				stillOn = true
				err = fmt.Errorf("%w (and before it: %w)", err, errs[0])
			}
		} else {
			resp, err = s.ctl.request(ctx, "ADD_ONION", cmd)
		}
		cancel()
		if err == nil {
			var id string
			for _, d := range resp.Data {
				if v, ok := strings.CutPrefix(d, "ServiceID="); ok {
					id = v
				}
			}
			if id != l.id {
				err = fmt.Errorf("noisetor: tor published the key as %q, not %s.onion", id, l.id)
			}
		}
	}
	l.mu.Lock()
	if err != nil {
		if l.pubSess == s && !stillOn {
			l.pubSess = nil
		}
		l.mu.Unlock()
		return fmt.Errorf("noisetor: publishing onion service %s: %w", l.Addr(), err)
	}
	if l.pubSess == s {
		l.pubAuth = slices.Sorted(slices.Values(auth))
	}
	l.mu.Unlock()
	l.t.log.Debug("noisetor: onion service added to tor; waiting for descriptor upload", "onion", l.Addr().String(), "client_auth_keys", len(auth))
	return nil
}

// addOnionCommand returns the ADD_ONION command line that publishes the
// service with the client-auth keys auth. It holds the private key.
func (l *OnionListener) addOnionCommand(auth []string) string {
	var b strings.Builder
	b.WriteString("ADD_ONION ED25519-V3:" + base64.StdEncoding.EncodeToString(l.key.expanded[:]))
	var flags []string
	if len(auth) > 0 {
		flags = append(flags, "V3Auth")
	}
	if l.maxStreams > 0 && !l.keepCirc {
		flags = append(flags, "MaxStreamsCloseCircuit")
	}
	if len(flags) > 0 {
		b.WriteString(" Flags=" + strings.Join(flags, ","))
	}
	fmt.Fprintf(&b, " Port=%d,%s", l.port, l.target)
	if l.check != nil {
		fmt.Fprintf(&b, " Port=%d,%s", l.check.port, l.check.target)
		if len(auth) > 0 {
			auth = append(auth[:len(auth):len(auth)], l.check.authPub)
		}
	}
	for _, k := range auth {
		b.WriteString(" ClientAuthV3=" + k)
	}
	if l.maxStreams > 0 {
		fmt.Fprintf(&b, " MaxStreams=%d", l.maxStreams)
	}
	if l.pow {
		b.WriteString(" PoWDefensesEnabled=1")
	}
	return b.String()
}

// descriptorEvent records an HS_DESC upload result for session s.
func (l *OnionListener) descriptorEvent(s *torSession, ev *control.HSDescEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pubSess != s || l.closed {
		return
	}
	if ev.Action == "UPLOAD_FAILED" {
		l.pubErr = ev.Reason
		return
	}
	l.lastUpload = time.Now()
	if !l.isPub {
		l.isPub = true
		l.pubAt = time.Now()
		l.pubCount++
		close(l.published)
		l.changed()
		l.t.log.Info("noisetor: onion service published", "onion", l.Addr().String(),
			"after", time.Since(l.published0).Round(time.Millisecond))
	}
}

// resetPublication marks the service unpublished after tor was lost.
// Called with l.t.mu held.
func (l *OnionListener) resetPublication() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pubSess = nil
	if l.isPub {
		l.isPub = false
		l.published = make(chan struct{})
		l.changed()
	}
	l.published0 = time.Now()
}

// WaitPublished waits until the service's descriptor has been uploaded on
// the current run of tor: at once after ListenOnion, and after a tor
// restart until it has been published again.
func (l *OnionListener) WaitPublished(ctx context.Context) error {
	for {
		l.mu.Lock()
		ch, closed := l.published, l.closed
		l.mu.Unlock()
		if closed {
			return ErrTorClosed
		}
		select {
		case <-ch:
			return nil
		case <-l.t.ctx.Done():
			return ErrTorClosed
		case <-ctx.Done():
			l.mu.Lock()
			reason := l.pubErr
			l.mu.Unlock()
			l.t.mu.Lock()
			down := l.t.downErr
			if l.t.sess != nil {
				down = nil
			}
			l.t.mu.Unlock()
			switch {
			case down != nil:
				return fmt.Errorf("noisetor: onion service %s not published: %w (%v)", l.Addr(), ctx.Err(), down)
			case reason != "":
				return fmt.Errorf("noisetor: onion service %s not published: %w (last upload failed: %s)", l.Addr(), ctx.Err(), reason)
			}
			return fmt.Errorf("noisetor: onion service %s not published: %w", l.Addr(), ctx.Err())
		case <-time.After(time.Second):
			// The channel is replaced when tor is lost; look again.
		}
	}
}

// Accept waits for the next connection to the onion service.
func (l *OnionListener) Accept() (net.Conn, error) {
	c, err := l.inner.Accept()
	if err != nil {
		l.mu.Lock()
		closed := l.closed
		l.mu.Unlock()
		if closed {
			return nil, &net.OpError{Op: "accept", Net: "onion", Addr: l.Addr(), Err: net.ErrClosed}
		}
		return nil, err
	}
	return torStream{c}, nil
}

// torStream is a connection carried by a Tor stream.
//
// How a stream ends over Tor, the one place this is said (the record layer,
// the relay and its splice follow it):
//   - A Tor stream cannot be half-closed: tor ends the whole stream on a FIN.
//     So a torStream hides the TCP CloseWrite, and noisetor's CloseWrite
//     sends only its close record; the relay keeps its outer connection
//     whole until Close.
//   - A socket closed with unread data sends a reset instead of a FIN, and
//     tor, seeing the reset, drops the stream's last cells: what we wrote
//     just before, close records included. So whoever closes first reads
//     and discards what has arrived (Conn.drainUnread, relayStream.Close),
//     and the relay ends a direction without a record of its own after the
//     end-to-end close record.
type torStream struct{ net.Conn }

// NetConn returns the local TCP connection to or from tor.
func (s torStream) NetConn() net.Conn { return s.Conn }

// Close removes the onion service from tor and closes the local listener.
func (l *OnionListener) Close() error {
	l.stopAuthSync()
	l.stopCheck()
	l.pubMu.Lock()
	defer l.pubMu.Unlock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	s := l.pubSess
	l.pubSess = nil
	l.mu.Unlock()
	l.t.mu.Lock()
	delete(l.t.onions, l)
	l.t.mu.Unlock()
	if s != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.ctl.request(ctx, "DEL_ONION", "DEL_ONION "+l.id)
		if l.check != nil && l.check.key != nil {
			s.ctl.request(ctx, "ONION_CLIENT_AUTH_REMOVE", "ONION_CLIENT_AUTH_REMOVE "+l.id)
		}
		cancel()
	}
	return l.inner.Close()
}

// closeLocal closes the listener without talking to tor (Tor.Close).
func (l *OnionListener) closeLocal() {
	l.stopAuthSync()
	l.stopCheck()
	l.mu.Lock()
	l.closed = true
	l.pubSess = nil
	l.mu.Unlock()
	l.t.mu.Lock()
	delete(l.t.onions, l)
	l.t.mu.Unlock()
	l.inner.Close()
}

// Addr returns the onion address, an *OnionAddr.
func (l *OnionListener) Addr() net.Addr { return &OnionAddr{ServiceID: l.id, Port: l.port} }

// OnionAddress returns the service's onion address, "<56 characters>.onion".
// Clients dial Addr().String(), "<address>:<port>", which is what goes in
// their keyrings.
func (l *OnionListener) OnionAddress() string { return l.id + ".onion" }

// LocalAddr returns the address of the local listener that tor forwards to.
func (l *OnionListener) LocalAddr() net.Addr { return l.inner.Addr() }

// An OnionAddr is the address of an onion service.
type OnionAddr struct {
	ServiceID string // the 56 base32 characters before ".onion"
	Port      int
}

// Network returns "onion".
func (a *OnionAddr) Network() string { return "onion" }

// String returns "<ServiceID>.onion:<Port>".
func (a *OnionAddr) String() string {
	return net.JoinHostPort(a.ServiceID+".onion", strconv.Itoa(a.Port))
}
