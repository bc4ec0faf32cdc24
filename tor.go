package noisetor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cretz/bine/process"
)

// The Tor integration. A Tor supervises tor, launched (tor_launch.go) or
// attached to; each run of it is a torSession (tor_session.go), spoken to
// over the control port (tor_control.go). Onion services are in
// tor_onion.go, dialing in tor_dialer.go, tor's keys in tor_keys.go.

// Errors of the Tor integration. Errors returned by Tor, OnionListener and
// TorDialer wrap these where they apply, for errors.Is.
var (
	// ErrTorNotFound: the tor executable is not installed.
	ErrTorNotFound = errors.New("noisetor: tor executable not found (Debian/Ubuntu: apt-get install tor)")

	// ErrTorVersion: tor is older than MinTorVersion.
	ErrTorVersion = errors.New("noisetor: tor is too old")

	// ErrTorAuth: tor's control port refused our authentication.
	ErrTorAuth = errors.New("noisetor: tor control port refused authentication")

	// ErrTorDown: tor is not running or its control port cannot be reached;
	// a supervised Tor keeps trying to bring it back.
	ErrTorDown = errors.New("noisetor: tor is not available")

	// ErrTorClosed: the Tor (or the OnionListener) has been closed.
	ErrTorClosed = errors.New("noisetor: tor handle closed")

	// ErrOnionClientAuth: an onion service could not be reached because of
	// client authorization: this tor has no client-auth key for it, or the
	// service does not list our key (we are not in its keyring).
	ErrOnionClientAuth = errors.New("noisetor: onion service client authorization failed")

	// ErrOnionUnreachable: tor could not connect to the onion service (no
	// descriptor published, introduction or rendezvous failed, timeout).
	ErrOnionUnreachable = errors.New("noisetor: onion service unreachable")
)

// MinTorVersion is the oldest tor release that StartTor and AttachTor
// accept: the oldest series the Tor Project still supports when this was
// written.
const MinTorVersion = "0.4.8"

// TorConfig configures StartTor.
type TorConfig struct {
	// DataDir is tor's DataDirectory, where it keeps its state (consensus,
	// keys of the tor instance, lock file) and its Unix sockets: the control
	// port, the SOCKS port and the listeners behind onion services. Required:
	// use a persistent directory so that restarts are fast. It is created
	// with mode 0700, or set to it; its path must be short enough for a
	// Unix socket name (about 90 bytes).
	DataDir string

	// ExePath is the tor executable. Default: the tor linked into this
	// binary if it was built with -tags embedtor, else "tor" from PATH.
	ExePath string

	// ProcessCreator, if set, creates the tor process instead of running
	// ExePath; an embedded tor plugs in here. The process must accept tor's
	// command line, which names the Unix sockets of the control and SOCKS
	// ports (--ControlPort unix:PATH, --SocksPort unix:PATH ...).
	ProcessCreator process.Creator

	// Torrc holds extra torrc lines, for example Bridge lines, or a private
	// test network's DirAuthority (see package tortest). noisetor sets
	// DataDirectory, ControlPort, SocksPort, SocksTimeout and
	// CookieAuthentication itself on the command line, which takes
	// precedence over the torrc: the tor has no TCP port.
	Torrc []string

	// ExtraArgs are appended to tor's command line.
	ExtraArgs []string

	// Logger receives tor's state changes (started, lost, restarted, onion
	// services published) and tor's own log lines (warnings at Warn, the
	// rest at Debug). Default: slog.Default().
	Logger *slog.Logger
}

// TorAttachConfig configures AttachTor.
type TorAttachConfig struct {
	// Password is the control port password (HashedControlPassword), if tor
	// uses one. Otherwise the cookie (SAFECOOKIE) or no authentication is
	// used, whichever tor offers.
	Password string

	// SocksAddr is tor's SOCKS5 listener, "host:port" or "unix:/path".
	// Default: the first one tor reports (GETINFO net/listeners/socks).
	// AttachTor checks its flags (GETCONF SocksPort): it refuses
	// NoIsolateSOCKSAuth and NoOnionTraffic, and warns without
	// ExtendedErrors. A TCP SOCKS port is open to every local user, who can
	// then use the client-auth keys that TorDialer registers with this tor.
	SocksAddr string

	// Logger is as in TorConfig.
	Logger *slog.Logger
}

// A Tor is a running tor process, launched by StartTor or attached to by
// AttachTor, and supervised: when tor dies or its control connection drops,
// a Tor started by StartTor launches tor again and an attached Tor
// reconnects (within 200 ms of tor answering again), both with backoff; then
// every open OnionListener is published again under the same address, at
// once, and every client-authorization key is registered again (as after a
// SIGNAL NEWNYM from any controller, which makes tor drop them). While tor
// is down, dials fail at once with ErrTorDown.
//
// It is safe for concurrent use. Close stops the supervision (and the tor
// process, if StartTor launched it).
type Tor struct {
	log         *slog.Logger
	owned       bool
	cfg         TorConfig // StartTor
	exe         string    // StartTor without ProcessCreator: resolved ExePath
	embedded    bool      // StartTor runs the tor linked into this binary (embedtor tag)
	pow         torPoW    // whether the tor has onion-service proof-of-work
	controlAddr string    // AttachTor
	password    *string   // AttachTor; a pointer, so that %+v of a Tor shows no password
	socksAddr   string    // AttachTor override

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu         sync.Mutex
	sess       *torSession // nil while tor is down
	downErr    error       // why sess is nil
	closed     bool
	onions     map[*OnionListener]struct{}
	clientAuth map[string]*ClientAuthKey // service ID → our key for it
	circuits   map[string]uint64         // isolation → its generation; see TorDialer.DialContext
}

// StartTor launches tor with cfg and returns once it has bootstrapped.
// ctx bounds only the start-up: tor runs until Close.
func StartTor(ctx context.Context, cfg *TorConfig) (*Tor, error) {
	if cfg == nil || cfg.DataDir == "" {
		return nil, errors.New("noisetor: TorConfig.DataDir is required (tor keeps its state there)")
	}
	t := newTor(cfg.Logger)
	t.owned = true
	t.cfg = *cfg
	t.cfg.Torrc = slices.Clone(cfg.Torrc)
	t.cfg.ExtraArgs = slices.Clone(cfg.ExtraArgs)
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	t.cfg.DataDir = dir
	if t.cfg.ProcessCreator == nil && t.cfg.ExePath == "" {
		// With the embedtor build tag: the tor linked into this binary.
		t.cfg.ProcessCreator = defaultTorProcessCreator
		t.embedded = defaultTorProcessCreator != nil
		if t.embedded {
			t.pow = powNo
			if embeddedTorHasPoW() {
				t.pow = powYes
			}
		}
		if v, ok := EmbeddedTorVersion(); ok {
			t.log.Info("noisetor: starting the embedded tor", "version", v)
		}
	}
	if t.cfg.ProcessCreator == nil {
		exe := cfg.ExePath
		if exe == "" {
			exe = "tor"
		}
		if t.exe, err = exec.LookPath(exe); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrTorNotFound, err)
		}
		if t.pow, err = checkTorExecutable(ctx, t.exe); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("noisetor: tor data directory: %w", err)
	}
	// The directory guards tor's sockets (and tor refuses to make them in
	// a directory that others can enter).
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("noisetor: tor data directory: %w", err)
	}
	return t.start(ctx)
}

// AttachTor connects to an already running tor's control port, "host:port"
// or "unix:/path", and returns once tor has bootstrapped. ctx bounds only
// the start-up. The Tor reconnects if tor restarts; Close leaves tor
// running.
func AttachTor(ctx context.Context, controlAddr string, cfg *TorAttachConfig) (*Tor, error) {
	if cfg == nil {
		cfg = &TorAttachConfig{}
	}
	t := newTor(cfg.Logger)
	t.controlAddr = controlAddr
	pw := cfg.Password
	t.password = &pw
	t.socksAddr = cfg.SocksAddr
	return t.start(ctx)
}

func newTor(log *slog.Logger) *Tor {
	if log == nil {
		log = slog.Default()
	}
	t := &Tor{
		log:        log,
		onions:     make(map[*OnionListener]struct{}),
		clientAuth: make(map[string]*ClientAuthKey),
		circuits:   make(map[string]uint64),
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	return t
}

func (t *Tor) start(ctx context.Context) (*Tor, error) {
	s, err := t.connect(ctx)
	if err != nil {
		t.cancel()
		return nil, err
	}
	t.mu.Lock()
	t.sess = s
	t.mu.Unlock()
	if err := s.waitBootstrap(ctx); err != nil {
		s.close()
		t.cancel()
		return nil, err
	}
	t.log.Info("noisetor: tor ready", "version", s.version, "socks", s.socksAddr, "pid", s.pid)
	t.wg.Add(1)
	go t.supervise(s)
	return t, nil
}

// Close stops supervising tor, closes every OnionListener of this Tor and,
// if StartTor launched tor, stops it. It waits for its goroutines to end.
func (t *Tor) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	s := t.sess
	t.sess = nil
	t.downErr = ErrTorClosed
	var ls []*OnionListener
	for l := range t.onions {
		ls = append(ls, l)
	}
	t.mu.Unlock()
	t.cancel()
	for _, l := range ls {
		l.closeLocal()
	}
	if s != nil {
		if !t.owned {
			s.forgetClientAuth()
		}
		s.close()
	}
	t.wg.Wait()
	return nil
}

// SocksAddr returns the address of tor's SOCKS5 listener, or "" while tor
// is down. It can change when tor is restarted.
func (t *Tor) SocksAddr() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sess == nil {
		return ""
	}
	return t.sess.socksAddr
}

// supervise waits for the session to end, then brings tor back, for as
// long as the Tor is open.
func (t *Tor) supervise(s *torSession) {
	defer t.wg.Done()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-s.done:
		}
		if t.ctx.Err() != nil {
			return
		}
		t.mu.Lock()
		if t.sess == s {
			t.sess = nil
			t.downErr = s.err
			for l := range t.onions {
				l.resetPublication()
			}
		}
		t.mu.Unlock()
		what := "reconnecting"
		if t.owned {
			what = "restarting it"
		}
		t.log.Warn("noisetor: lost tor; "+what, "err", s.err)
		s.close()

		// Launching tor costs CPU, so a tor that keeps dying is relaunched
		// less and less often; an attached tor is only a local socket to
		// try, so one that comes back is found within maxBackoff.
		backoff, maxBackoff := 100*time.Millisecond, 10*time.Second
		if !t.owned {
			maxBackoff = 200 * time.Millisecond
		}
		for {
			select {
			case <-t.ctx.Done():
				return
			case <-time.After(backoff):
			}
			ctx, cancel := context.WithTimeout(t.ctx, 2*time.Minute)
			ns, err := t.connect(ctx)
			cancel()
			if err == nil {
				s = ns
				break
			}
			t.mu.Lock()
			t.downErr = err
			t.mu.Unlock()
			backoff = min(2*backoff, maxBackoff)
			if t.ctx.Err() == nil {
				t.log.Warn("noisetor: tor still unavailable", "err", err, "retry_in", backoff)
			}
		}
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			s.close()
			return
		}
		t.sess = s
		var ls []*OnionListener
		for l := range t.onions {
			ls = append(ls, l)
		}
		t.mu.Unlock()
		t.log.Info("noisetor: tor is back", "version", s.version, "socks", s.socksAddr, "pid", s.pid, "onion_services", len(ls))
		// At once, not after bootstrap: tor publishes as soon as it can.
		for _, l := range ls {
			if err := l.publish(s); err != nil {
				t.log.Error("noisetor: republishing onion service", "onion", l.Addr().String(), "err", err)
			}
		}
		// Register client-auth keys before dials can go ahead.
		t.mu.Lock()
		auths := make(map[string]*ClientAuthKey, len(t.clientAuth))
		for id, k := range t.clientAuth {
			auths[id] = k
		}
		t.mu.Unlock()
		for id, k := range auths {
			if err := s.registerClientAuth(t.ctx, id, k, false); err != nil {
				t.log.Error("noisetor: registering client-auth key", "onion", id+".onion", "err", err)
			}
		}
		if err := s.waitBootstrap(t.ctx); err != nil && t.ctx.Err() == nil {
			t.log.Warn("noisetor: tor did not bootstrap", "err", err)
		}
	}
}

// session returns the current session once tor has bootstrapped. It fails
// at once with ErrTorDown while tor is down.
func (t *Tor) session(ctx context.Context) (*torSession, error) {
	t.mu.Lock()
	s, closed, downErr := t.sess, t.closed, t.downErr
	t.mu.Unlock()
	if closed {
		return nil, ErrTorClosed
	}
	if s == nil {
		return nil, torDownError(downErr)
	}
	select {
	case <-s.bootstrapped:
		return s, nil
	case <-s.done:
		return nil, torDownError(s.err)
	case <-ctx.Done():
		return nil, fmt.Errorf("noisetor: waiting for tor to bootstrap: %w", ctx.Err())
	}
}

// torDownError returns err as an ErrTorDown, wrapping it only once.
func torDownError(err error) error {
	if err == nil || errors.Is(err, ErrTorDown) {
		if err == nil {
			return ErrTorDown
		}
		return err
	}
	return fmt.Errorf("%w: %v", ErrTorDown, err)
}

// Launched reports whether StartTor launched this tor (rather than
// AttachTor attaching to one).
func (t *Tor) Launched() bool { return t.owned }

var torVersionRE = regexp.MustCompile(`(\d+)\.(\d+)\.(\d+)`)

// checkTorVersion checks a tor version string ("0.4.9.11 (git-…)" or
// "Tor version 0.4.9.11.") against MinTorVersion.
func checkTorVersion(v string) error {
	m := torVersionRE.FindStringSubmatch(v)
	if m == nil {
		return fmt.Errorf("%w: cannot parse tor version %q", ErrTorVersion, v)
	}
	have := [3]int{}
	for i := range have {
		have[i], _ = strconv.Atoi(m[i+1])
	}
	want := [3]int{}
	for i, f := range strings.Split(MinTorVersion, ".") {
		want[i], _ = strconv.Atoi(f)
	}
	if slices.Compare(have[:], want[:]) < 0 {
		return fmt.Errorf("%w: tor %s is installed; noisetor needs %s or newer", ErrTorVersion, m[0], MinTorVersion)
	}
	return nil
}
