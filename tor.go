package noisetor

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha3"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cretz/bine/control"
	"github.com/cretz/bine/process"
	torEd25519 "github.com/cretz/bine/torutil/ed25519"
	"golang.org/x/net/proxy"
)

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

// A torSession is one control connection to one run of tor (and, for a
// Tor from StartTor, that tor process).
type torSession struct {
	t         *Tor
	ctl       *torControl
	version   string
	socksNet  string // "tcp" or "unix"
	socksAddr string
	pid       int

	proc       process.Process // StartTor only
	owning     bool            // TAKEOWNERSHIP done: tor exits when ctl closes
	procCancel context.CancelFunc
	procDone   chan struct{}
	procOut    *torOutput

	bootstrapped chan struct{} // closed at 100 % bootstrap
	bootOnce     sync.Once
	done         chan struct{} // closed when tor or the control connection is gone
	doneOnce     sync.Once
	err          error // why done
	closeOnce    sync.Once

	authMu     sync.Mutex
	registered map[string]*ClientAuthKey // client-auth keys registered with this tor

	noExtendedErrors bool // an attached tor's SocksPort lacks ExtendedErrors

	lpMu      sync.Mutex
	longLived map[int]bool // ports added to LongLivedPorts on this tor
}

func (s *torSession) end(err error) {
	s.doneOnce.Do(func() {
		s.err = err
		close(s.done)
	})
}

// close ends the session: it closes the control connection (which makes a
// tor launched by StartTor exit: it is the owning controller) and waits for
// the process, killing it if it has not exited after 5 s.
func (s *torSession) close() {
	s.closeOnce.Do(func() {
		s.end(ErrTorClosed)
		s.ctl.close()
		if s.proc != nil {
			if !s.owning {
				s.procCancel()
			}
			select {
			case <-s.procDone:
			case <-time.After(5 * time.Second):
				s.procCancel()
				<-s.procDone
			}
			s.procCancel()
		}
	})
}

// connect launches tor (StartTor) or dials its control port (AttachTor),
// authenticates and reads what the session needs.
func (t *Tor) connect(ctx context.Context) (_ *torSession, err error) {
	s := &torSession{
		t:            t,
		bootstrapped: make(chan struct{}),
		done:         make(chan struct{}),
		registered:   make(map[string]*ClientAuthKey),
	}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	var ctlNet, ctlAddr, password string
	if t.owned {
		if ctlAddr, err = s.launch(ctx); err != nil {
			return nil, err
		}
		ctlNet = "unix"
	} else {
		ctlNet, ctlAddr = splitNetAddr(t.controlAddr)
		if t.password != nil {
			password = *t.password
		}
	}
	for try := 0; ; try++ {
		s.ctl, err = dialTorControl(ctx, ctlNet, ctlAddr, password, s.onEvent)
		// A launched tor creates its socket just before it listens on it.
		if err == nil || !t.owned || !errors.Is(err, syscall.ECONNREFUSED) || try == 100 {
			break
		}
		select {
		case <-s.done:
			return nil, s.err
		case <-ctx.Done():
			return nil, err
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, err
	}
	go func() {
		<-s.ctl.done
		s.end(fmt.Errorf("%w: control connection lost: %v", ErrTorDown, s.ctl.err))
	}()
	if s.proc != nil {
		// The owning controller: tor exits when this connection closes, so
		// it cannot outlive this process even if it is killed.
		if _, err := s.ctl.request(ctx, "TAKEOWNERSHIP", "TAKEOWNERSHIP"); err != nil {
			return nil, err
		}
		s.owning = true
	}
	info, err := s.ctl.getInfo(ctx, "version", "net/listeners/socks", "process/pid")
	if err != nil {
		return nil, err
	}
	s.version = info["version"]
	if err := checkTorVersion(s.version); err != nil {
		return nil, err
	}
	s.pid, _ = strconv.Atoi(info["process/pid"])
	socks := parseQuotedList(info["net/listeners/socks"])
	if t.socksAddr != "" {
		s.socksNet, s.socksAddr = splitNetAddr(t.socksAddr)
	} else {
		if len(socks) == 0 {
			return nil, fmt.Errorf("noisetor: tor at %s has no SOCKS port (add SocksPort to its torrc, or set TorAttachConfig.SocksAddr)", ctlAddr)
		}
		if t.owned {
			// Ours is the Unix socket; a torrc may add more listeners.
			for _, a := range socks {
				if a == "unix:"+filepath.Join(t.cfg.DataDir, torSocksSocket) {
					s.socksNet, s.socksAddr = splitNetAddr(a)
				}
			}
			if s.socksAddr == "" {
				return nil, fmt.Errorf("noisetor: tor did not open its SOCKS socket in %s (it lists %q)", t.cfg.DataDir, socks)
			}
		} else {
			s.socksNet, s.socksAddr = splitNetAddr(socks[0])
		}
	}
	if !t.owned {
		if err := s.checkSocksFlags(ctx); err != nil {
			return nil, err
		}
	}
	// SIGNAL: a NEWNYM from any controller makes tor forget the client-auth
	// keys added by ONION_CLIENT_AUTH_ADD; see onEvent.
	if _, err := s.ctl.request(ctx, "SETEVENTS", "SETEVENTS HS_DESC SIGNAL"); err != nil {
		return nil, err
	}
	return s, nil
}

// checkSocksFlags reads the configuration of the SocksPort that an attached
// tor's session uses (GETCONF SocksPort) and says what it lacks. Without
// ExtendedErrors tor reports every onion-service failure as "general
// failure" (0x01): a refused client authorization cannot be told from a
// passing failure and is retried until RetryFor runs out. NoIsolateSOCKSAuth
// would put every peer on the same circuits; NoOnionTraffic makes onion
// services unreachable.
func (s *torSession) checkSocksFlags(ctx context.Context) error {
	resp, err := s.ctl.request(ctx, "GETCONF", "GETCONF SocksPort")
	if err != nil {
		return err
	}
	var lines []string
	for _, d := range append(resp.Data, resp.Reply) {
		if v, ok := strings.CutPrefix(d, "SocksPort="); ok {
			lines = append(lines, v)
		}
	}
	line, ok := matchSocksPortLine(lines, s.socksNet, s.socksAddr)
	if !ok {
		s.t.log.Warn("noisetor: cannot tell which SocksPort line of tor's configuration is the SOCKS port in use; make sure it has the ExtendedErrors flag",
			"socks", s.socksAddr, "socks_ports", lines)
		return nil
	}
	flags := strings.Fields(line)[1:]
	has := func(f string) bool {
		return slices.ContainsFunc(flags, func(x string) bool { return strings.EqualFold(x, f) })
	}
	switch {
	case has("NoOnionTraffic"):
		return fmt.Errorf("noisetor: tor's SocksPort %q has NoOnionTraffic: it cannot reach onion services; use another SocksPort (TorAttachConfig.SocksAddr)", line)
	case has("NoIsolateSOCKSAuth"):
		return fmt.Errorf("noisetor: tor's SocksPort %q has NoIsolateSOCKSAuth: connections to different peers would share circuits; remove the flag or use another SocksPort (TorAttachConfig.SocksAddr)", line)
	}
	if !has("ExtendedErrors") {
		s.noExtendedErrors = true
		s.t.log.Warn("noisetor: tor's SocksPort lacks the ExtendedErrors flag: onion-service failures, a refused client authorization included, all look like \"general failure\" and are retried until TorDialer.RetryFor runs out; add ExtendedErrors to that SocksPort line of the torrc",
			"socks_port", line)
	}
	return nil
}

// matchSocksPortLine finds the SocksPort configuration line of the listener
// network/addr. Port "auto" matches any port; a lone line matches anything.
func matchSocksPortLine(lines []string, network, addr string) (string, bool) {
	var lone string
	n := 0
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] == "0" {
			continue
		}
		n++
		lone = l
		spec := f[0]
		if network == "unix" {
			if p, ok := strings.CutPrefix(spec, "unix:"); ok && strings.Trim(p, `"`) == addr {
				return l, true
			}
			continue
		}
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			continue
		}
		if spec == addr || spec == port || spec == "auto" || strings.HasSuffix(spec, ":"+port) || strings.HasSuffix(spec, ":auto") {
			return l, true
		}
	}
	if n == 1 {
		return lone, true
	}
	return "", false
}

// Names of the Unix sockets of a launched tor, in its data directory.
const (
	torControlSocket = "control"
	torSocksSocket   = "socks"
)

// maxUnixSocketPath is the longest path a Unix socket can have on Linux
// (sun_path is 108 bytes, with the terminating NUL), which is also below the
// limit of the BSDs and macOS (104).
const maxUnixSocketPath = 103

// torSocketPath returns the path of a Unix socket in a launched tor's data
// directory, or an error if the path is too long for one.
func torSocketPath(dir, name string) (string, error) {
	p := filepath.Join(dir, name)
	if len(p) > maxUnixSocketPath {
		return "", fmt.Errorf("noisetor: TorConfig.DataDir %s is too long: tor's Unix socket %s would exceed %d bytes; use a shorter path", dir, name, maxUnixSocketPath)
	}
	return p, nil
}

// launchedSocksTimeout is the SocksTimeout of the tors StartTor launches
// (tor's default is 2 minutes): how long tor keeps a SOCKS request waiting
// for a circuit before it gives up and says why.
const launchedSocksTimeout = 20 * time.Second

// launch starts the tor process and returns the path of its control socket.
//
// A launched tor has no TCP port at all: its control port and SOCKS port are
// Unix sockets in the data directory, which is mode 0700, so no other local
// user can reach them. (On TCP, any local user could use the SOCKS port, and
// with it this machine's client-authorization keys, to reach the services
// that authorize this machine.)
func (s *torSession) launch(ctx context.Context) (string, error) {
	t := s.t
	dir := t.cfg.DataDir
	ctlPath, err := torSocketPath(dir, torControlSocket)
	if err != nil {
		return "", err
	}
	socksPath, err := torSocketPath(dir, torSocksSocket)
	if err != nil {
		return "", err
	}
	torrc := filepath.Join(dir, "noisetor.torrc")
	if err := os.WriteFile(torrc, []byte(strings.Join(t.cfg.Torrc, "\n")+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("noisetor: writing torrc: %w", err)
	}
	// Left by a tor that was killed; the data directory's lock keeps a
	// second tor from using the directory.
	os.Remove(ctlPath)
	os.Remove(socksPath)
	args := []string{
		"-f", torrc,
		"--DataDirectory", dir,
		"--ControlPort", "unix:" + strconv.Quote(ctlPath),
		"--CookieAuthentication", "1",
		// ExtendedErrors: SOCKS replies say why an onion service failed
		// (0xF0-0xF7). OnionTrafficOnly: this SOCKS port only reaches onion
		// services, so nothing can use it to leave Tor by an exit relay.
		"--SocksPort", "unix:" + strconv.Quote(socksPath) + " ExtendedErrors OnionTrafficOnly",
		"--SocksTimeout", strconv.Itoa(int(launchedSocksTimeout / time.Second)),
		// Until TAKEOWNERSHIP: tor exits if this process dies.
		"__OwningControllerProcess", strconv.Itoa(os.Getpid()),
	}
	args = append(args, t.cfg.ExtraArgs...)
	creator := t.cfg.ProcessCreator
	if creator == nil {
		s.procOut = &torOutput{log: t.log}
		creator = process.CmdCreatorFunc(func(ctx context.Context, args ...string) (*exec.Cmd, error) {
			cmd := exec.CommandContext(ctx, t.exe, args...)
			cmd.Stdout, cmd.Stderr = s.procOut, s.procOut
			cmd.WaitDelay = 2 * time.Second
			return cmd, nil
		})
	}
	// The tor process's life is bounded by close, never by ctx: ctx only
	// bounds this start-up (bine's exec.CommandContext kills tor when its
	// context ends).
	var procCtx context.Context
	procCtx, s.procCancel = context.WithCancel(context.Background())
	p, err := creator.New(procCtx, args...)
	if err != nil {
		s.procCancel()
		return "", fmt.Errorf("noisetor: creating tor process: %w", err)
	}
	if err := p.Start(); err != nil {
		s.procCancel()
		return "", fmt.Errorf("noisetor: starting tor: %w", err)
	}
	s.proc, s.procDone = p, make(chan struct{})
	go func() {
		err := p.Wait()
		if err == nil {
			err = errors.New("exited")
		}
		s.end(fmt.Errorf("%w: tor process: %v%s", ErrTorDown, err, s.procOut.tail()))
		close(s.procDone)
	}()
	// Poll for the socket: tor creates it within milliseconds of starting,
	// and a restart is only as quick as this loop notices it.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if st, err := os.Stat(ctlPath); err == nil && st.Mode().Type() == fs.ModeSocket {
			return ctlPath, nil
		}
		select {
		case <-s.done:
			return "", s.err
		case <-ctx.Done():
			return "", fmt.Errorf("noisetor: tor opened no control socket: %w%s", ctx.Err(), s.procOut.tail())
		case <-tick.C:
		}
	}
}

// waitBootstrap waits until tor reports 100 % bootstrap.
func (s *torSession) waitBootstrap(ctx context.Context) error {
	var last string
	for {
		select {
		case <-s.bootstrapped:
			return nil
		default:
		}
		info, err := s.ctl.getInfo(ctx, "status/bootstrap-phase")
		if err != nil {
			return err
		}
		last = info["status/bootstrap-phase"]
		if strings.Contains(last+" ", " PROGRESS=100 ") {
			s.bootOnce.Do(func() { close(s.bootstrapped) })
			return nil
		}
		select {
		case <-s.done:
			return s.err
		case <-ctx.Done():
			return fmt.Errorf("noisetor: tor did not bootstrap (%s): %w", last, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// onEvent handles an asynchronous event from tor. It runs on the control
// connection's reader goroutine, so it must not send commands.
func (s *torSession) onEvent(code, data string) {
	if code == "SIGNAL" && strings.TrimSpace(data) == "NEWNYM" {
		// tor has dropped every client-auth key: register them again.
		go s.reregisterClientAuth()
		return
	}
	if code != "HS_DESC" {
		return
	}
	ev := control.ParseHSDescEvent(data)
	if ev.Action != "UPLOADED" && ev.Action != "UPLOAD_FAILED" {
		return
	}
	s.t.mu.Lock()
	var l *OnionListener
	for o := range s.t.onions {
		if o.id == ev.Address {
			l = o
		}
	}
	s.t.mu.Unlock()
	if l != nil {
		l.descriptorEvent(s, ev)
	}
}

// registerClientAuth registers our client-auth key for an onion service
// with this tor (ONION_CLIENT_AUTH_ADD), once per session unless force.
func (s *torSession) registerClientAuth(ctx context.Context, serviceID string, k *ClientAuthKey, force bool) error {
	s.authMu.Lock()
	defer s.authMu.Unlock()
	if s.registered[serviceID] == k && !force {
		return nil
	}
	// 251 (replaced) and 252 (registered, and a cached descriptor decrypted)
	// are success codes.
	_, err := s.ctl.request(ctx, "ONION_CLIENT_AUTH_ADD",
		"ONION_CLIENT_AUTH_ADD "+serviceID+" x25519:"+base64.StdEncoding.EncodeToString(k.priv.Bytes()))
	if err != nil {
		return err
	}
	s.registered[serviceID] = k
	return nil
}

// reregisterClientAuth registers every client-auth key of the Tor again,
// after tor dropped them (SIGNAL NEWNYM, from any controller of this tor).
func (s *torSession) reregisterClientAuth() {
	t := s.t
	t.mu.Lock()
	auths := maps.Clone(t.clientAuth)
	t.mu.Unlock()
	ctx, cancel := context.WithTimeout(t.ctx, 30*time.Second)
	defer cancel()
	for id, k := range auths {
		if err := s.registerClientAuth(ctx, id, k, true); err != nil && t.ctx.Err() == nil {
			t.log.Warn("noisetor: registering a client-auth key again after NEWNYM", "onion", id+".onion", "err", err)
		}
	}
	if len(auths) > 0 {
		t.log.Info("noisetor: tor got NEWNYM, which drops client-auth keys; registered them again", "keys", len(auths))
	}
}

// forgetClientAuth removes the client-auth keys we registered with an
// attached tor, which other programs may share.
func (s *torSession) forgetClientAuth() {
	s.authMu.Lock()
	defer s.authMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for id := range s.registered {
		s.ctl.request(ctx, "ONION_CLIENT_AUTH_REMOVE", "ONION_CLIENT_AUTH_REMOVE "+id)
	}
	clear(s.registered)
}

// ---- control connection ----------------------------------------------------

// A torControl is a control-port connection with one reader goroutine, so
// that commands from many goroutines and asynchronous events interleave
// safely. (bine's control.Conn reads replies in the calling goroutine, which
// races with its own event loop.) bine parses the replies and authenticates.
type torControl struct {
	tc      *textproto.Conn
	c       *control.Conn
	onEvent func(code, data string)

	wmu     sync.Mutex // held while queueing and writing a command
	mu      sync.Mutex
	pending []chan *control.Response // FIFO: tor answers commands in order
	done    chan struct{}            // closed when the reader stops
	err     error                    // why; set before done is closed
}

func dialTorControl(ctx context.Context, network, addr, password string, onEvent func(code, data string)) (*torControl, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("%w: control port %s: %w", ErrTorDown, addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(30 * time.Second))
	}
	tc := textproto.NewConn(conn)
	c := control.NewConn(tc)
	if err := authenticateTor(c, password); err != nil {
		tc.Close()
		return nil, fmt.Errorf("%w: %s: %v", ErrTorAuth, addr, err)
	}
	conn.SetDeadline(time.Time{})
	k := &torControl{tc: tc, c: c, onEvent: onEvent, done: make(chan struct{})}
	go k.readLoop()
	return k, nil
}

// authenticateTor authenticates with the password if one is given and tor
// accepts passwords, and otherwise as bine chooses (NULL, SAFECOOKIE).
func authenticateTor(c *control.Conn, password string) error {
	pi, err := c.ProtocolInfo()
	if err != nil {
		return err
	}
	if password != "" && pi.HasAuthMethod("HASHEDPASSWORD") {
		// tor takes the password hex-encoded; it never appears in an error.
		if _, err := c.SendRequest("AUTHENTICATE %x", password); err != nil {
			return err
		}
		c.Authenticated = true
		return nil
	}
	if password == "" && !pi.HasAuthMethod("NULL") && !pi.HasAuthMethod("SAFECOOKIE") && pi.HasAuthMethod("HASHEDPASSWORD") {
		return errors.New("tor requires a control port password")
	}
	return c.Authenticate(password)
}

func (k *torControl) readLoop() {
	for {
		resp, err := k.c.ReadResponse()
		if err != nil {
			k.mu.Lock()
			k.err = err
			pending := k.pending
			k.pending = nil
			close(k.done)
			k.mu.Unlock()
			for _, ch := range pending {
				close(ch)
			}
			return
		}
		if resp.Err.Code == control.StatusAsyncEvent {
			line := resp.Reply
			if len(resp.Data) > 0 {
				line = resp.Data[0]
			}
			code, data, _ := strings.Cut(line, " ")
			k.onEvent(code, data)
			continue
		}
		k.mu.Lock()
		var ch chan *control.Response
		if len(k.pending) > 0 {
			ch = k.pending[0]
			k.pending = k.pending[1:]
		}
		k.mu.Unlock()
		if ch != nil {
			ch <- resp
		}
	}
}

// request sends one command line and waits for its reply. name is the
// command's name for errors: the line itself may hold key material and is
// never quoted. Any 2xx reply is success.
func (k *torControl) request(ctx context.Context, name, line string) (*control.Response, error) {
	resps, errs := k.requestBatch(ctx, []string{name}, []string{line})
	return resps[0], errs[0]
}

// requestBatch sends the command lines in one write and waits for each
// reply, returning them and their errors as request would. tor runs every
// complete command in its input buffer before it does anything else
// (connection_control_process_inbuf in tor's control.c loops until the
// buffer is empty), so no cell is handled between them.
func (k *torControl) requestBatch(ctx context.Context, names, lines []string) ([]*control.Response, []error) {
	resps, errs := make([]*control.Response, len(lines)), make([]error, len(lines))
	fail := func(err error) ([]*control.Response, []error) {
		for i := range errs {
			if errs[i] == nil && resps[i] == nil {
				errs[i] = err
			}
		}
		return resps, errs
	}
	chs := make([]chan *control.Response, len(lines))
	var b strings.Builder
	for i, line := range lines {
		chs[i] = make(chan *control.Response, 1)
		b.WriteString(line + "\r\n")
	}
	k.wmu.Lock()
	k.mu.Lock()
	select {
	case <-k.done:
		k.mu.Unlock()
		k.wmu.Unlock()
		return fail(fmt.Errorf("%w: control connection lost: %v", ErrTorDown, k.err))
	default:
	}
	k.pending = append(k.pending, chs...)
	k.mu.Unlock()
	// One Write on the empty buffer: one that is larger than the buffer
	// goes to the socket directly, a smaller one on Flush.
	_, err := k.tc.W.Write([]byte(b.String()))
	if err == nil {
		err = k.tc.W.Flush()
	}
	k.wmu.Unlock()
	if err != nil {
		k.tc.Close()
		return fail(fmt.Errorf("%w: control connection: %v", ErrTorDown, err))
	}
	for i, ch := range chs {
		select {
		case resp, ok := <-ch:
			if !ok {
				return fail(fmt.Errorf("%w: control connection lost: %v", ErrTorDown, k.err))
			}
			resps[i] = resp
			if resp.Err.Code/100 != 2 {
				errs[i] = fmt.Errorf("noisetor: tor refused %s: %d %s", names[i], resp.Err.Code, resp.Reply)
			}
		case <-ctx.Done():
			// The replies, when they come, go to the buffered channels and
			// are dropped.
			for j := i; j < len(chs); j++ {
				errs[j] = fmt.Errorf("noisetor: tor %s: %w", names[j], ctx.Err())
			}
			return resps, errs
		}
	}
	return resps, errs
}

// getInfo runs GETINFO and returns the values by key.
func (k *torControl) getInfo(ctx context.Context, keys ...string) (map[string]string, error) {
	resp, err := k.request(ctx, "GETINFO", "GETINFO "+strings.Join(keys, " "))
	if err != nil {
		return nil, err
	}
	m := make(map[string]string, len(keys))
	for _, d := range resp.Data {
		key, val, _ := strings.Cut(d, "=")
		// Multi-line values arrive as "key=\r\n<lines>".
		m[key] = strings.TrimPrefix(val, "\r\n")
	}
	return m, nil
}

func (k *torControl) close() {
	if k != nil {
		k.tc.Close()
		<-k.done
	}
}

// ---- onion services --------------------------------------------------------

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

// Launched reports whether StartTor launched this tor (rather than
// AttachTor attaching to one).
func (t *Tor) Launched() bool { return t.owned }

// addLongLivedPort adds port to tor's LongLivedPorts, once per session:
// circuits for such ports are built from relays with the Stable flag, which
// are less likely to go down under a long-lived connection. On the service's
// tor this applies to its introduction circuits, on a client's to its
// rendezvous circuits. Failures are logged: it is an optimization.
func (s *torSession) addLongLivedPort(ctx context.Context, port int) {
	s.lpMu.Lock()
	defer s.lpMu.Unlock()
	if s.longLived[port] {
		return
	}
	err := func() error {
		resp, err := s.ctl.request(ctx, "GETCONF", "GETCONF LongLivedPorts")
		if err != nil {
			return err
		}
		cur, _ := strings.CutPrefix(resp.Reply, "LongLivedPorts=")
		ports := strings.FieldsFunc(cur, func(r rune) bool { return r == ',' || r == ' ' })
		p := strconv.Itoa(port)
		if !slices.Contains(ports, p) {
			ports = append(ports, p)
			_, err = s.ctl.request(ctx, "SETCONF", "SETCONF LongLivedPorts="+strings.Join(ports, ","))
		}
		return err
	}()
	if err != nil {
		s.t.log.Warn("noisetor: adding the port to tor's LongLivedPorts", "port", port, "err", err)
		return
	}
	if s.longLived == nil {
		s.longLived = make(map[int]bool)
	}
	s.longLived[port] = true
}

// clientAuthKeys returns the ADD_ONION ClientAuthV3 values.
func (l *OnionListener) clientAuthKeys() ([]string, error) {
	var keys []string
	add := func(who, k string) error {
		raw, err := parseClientAuthPublic(k)
		if err != nil {
			return fmt.Errorf("noisetor: client-auth key of %s: %w", who, err)
		}
		s := torBase32.EncodeToString(raw)
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

// torStream is a connection carried by a Tor stream. It hides the TCP
// connection's CloseWrite: Tor streams cannot be half-closed, and tor ends
// the whole stream on a FIN, so noisetor's CloseWrite must send only its
// close record.
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

// ---- dialing ---------------------------------------------------------------

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
	_ net.Listener  = (*OnionListener)(nil)
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
	user := d.isolation
	if user == "" {
		user = "noisetor:" + addr
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
		c, err := s.dialSOCKS(dctx, user, addr)
		if err == nil {
			return torStream{c}, nil
		}
		if dctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, timeout()
		}
		derr := classifySOCKSError(addr, err)
		if derr.Reply == 0 && !derr.torDown && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
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

// ---- keys ------------------------------------------------------------------

// torBase32 is tor's base32: RFC 4648, no padding.
var torBase32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// An OnionKey is the ed25519 identity key of a v3 onion service; its public
// half is the service's address. It never prints its private part.
type OnionKey struct {
	// The secret is two pointers away, as PrivateKey's is: fmt prints a
	// value it cannot call methods on field by field, and for a bad verb
	// what a pointer field points to as well; only a pointer inside that is
	// printed as an address.
	*onionKey
}

type onionKey struct {
	expanded *[64]byte // tor's expanded secret key: clamped scalar || prefix
	pub      [32]byte
}

const onionKeyPrefix = "NOISETOR-ONION-KEY-ED25519-V3:"

// torSecretKeyHeader starts tor's hs_ed25519_secret_key file.
const torSecretKeyHeader = "== ed25519v1-secret: type0 ==\x00\x00\x00"

// GenerateOnionKey returns a new onion service key with entropy from random
// (crypto/rand if nil).
func GenerateOnionKey(random io.Reader) (*OnionKey, error) {
	if random == nil {
		random = rand.Reader
	}
	seed := make([]byte, ed25519.SeedSize)
	if _, err := io.ReadFull(random, seed); err != nil {
		return nil, fmt.Errorf("noisetor: generating onion key: %w", err)
	}
	kp := torEd25519.FromCryptoPrivateKey(ed25519.NewKeyFromSeed(seed))
	clear(seed)
	k := &OnionKey{&onionKey{expanded: new([64]byte)}}
	copy(k.expanded[:], kp.PrivateKey())
	copy(k.pub[:], kp.PublicKey())
	return k, nil
}

func newOnionKey(expanded []byte) (*OnionKey, error) {
	if len(expanded) != 64 {
		return nil, badKey("an onion service key is 64 bytes")
	}
	// A valid expanded key has a clamped scalar.
	if expanded[0]&7 != 0 || expanded[31]&0xC0 != 0x40 {
		return nil, badKey("not a valid ed25519 expanded secret key")
	}
	k := &OnionKey{&onionKey{expanded: new([64]byte)}}
	copy(k.expanded[:], expanded)
	copy(k.pub[:], torEd25519.PrivateKey(k.expanded[:]).PublicKey())
	return k, nil
}

// ServiceID returns the service's address without ".onion": 56 base32
// characters, per rend-spec-v3 §6.
func (k *OnionKey) ServiceID() string {
	h := sha3.New256()
	h.Write([]byte(".onion checksum"))
	h.Write(k.pub[:])
	h.Write([]byte{3})
	raw := append(append(k.pub[:], h.Sum(nil)[:2]...), 3)
	return strings.ToLower(torBase32.EncodeToString(raw))
}

// Address returns the service's address, "<56 characters>.onion".
func (k *OnionKey) Address() string { return k.ServiceID() + ".onion" }

// String returns the address only, never the private key.
func (k OnionKey) String() string { return "noisetor.OnionKey(" + k.Address() + ")" }

// GoString is like String.
func (k OnionKey) GoString() string { return k.String() }

// Format prints String for every verb.
func (k OnionKey) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// MarshalPrivateText returns the key file encoding,
// "NOISETOR-ONION-KEY-ED25519-V3:<base64url of tor's 64-byte expanded key>\n".
func (k *OnionKey) MarshalPrivateText() []byte {
	return []byte(onionKeyPrefix + base64.RawURLEncoding.EncodeToString(k.expanded[:]) + "\n")
}

// ParseOnionKey parses MarshalPrivateText's encoding, or the contents of
// tor's own hs_ed25519_secret_key file (so an existing service keeps its
// address). Errors never quote the input.
func ParseOnionKey(b []byte) (*OnionKey, error) {
	if rest, ok := bytes.CutPrefix(b, []byte(torSecretKeyHeader)); ok {
		return newOnionKey(rest)
	}
	s := strings.TrimSpace(string(b))
	enc, ok := strings.CutPrefix(s, onionKeyPrefix)
	if !ok {
		return nil, badKey("onion key must start with %s (or be tor's hs_ed25519_secret_key)", onionKeyPrefix)
	}
	raw, ok := decodeKeyBase64(enc) // one text form: no CR or LF inside, zero trailing bits
	if !ok {
		return nil, badKey("onion key is not unpadded base64url")
	}
	return newOnionKey(raw)
}

// LoadOnionKey reads an onion key file. It refuses a file that group or
// others may access (ErrKeyFilePermissions).
func LoadOnionKey(path string) (*OnionKey, error) {
	b, err := readPrivateFile(path)
	if err != nil {
		return nil, err
	}
	k, err := ParseOnionKey(b)
	clear(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// SaveOnionKey writes k to a new file with mode 0600; it never overwrites.
func SaveOnionKey(path string, k *OnionKey) error {
	return writePrivateFile(path, k.MarshalPrivateText())
}

// LoadOrCreateOnionKey loads the key at path, or generates one and saves it
// there if the file does not exist; created reports which.
func LoadOrCreateOnionKey(path string) (k *OnionKey, created bool, err error) {
	k, err = LoadOnionKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return k, false, err
	}
	if k, err = GenerateOnionKey(nil); err != nil {
		return nil, false, err
	}
	if err := SaveOnionKey(path, k); err != nil {
		return nil, false, err
	}
	return k, true, nil
}

// A ClientAuthKey is a Tor v3 onion client-authorization key pair
// (x25519). The public half goes in the keyrings of the services this
// machine connects to (Peer.ClientAuth); the private half stays here and is
// registered with this machine's tor. It never prints its private part.
type ClientAuthKey struct {
	*clientAuthKey // behind a pointer, as OnionKey's secret is
}

type clientAuthKey struct {
	priv *ecdh.PrivateKey
}

const clientAuthKeyPrefix = "NOISETOR-TOR-CLIENT-AUTH-X25519:"

// GenerateClientAuthKey returns a new key pair with entropy from random
// (crypto/rand if nil).
func GenerateClientAuthKey(random io.Reader) (*ClientAuthKey, error) {
	if random == nil {
		random = rand.Reader
	}
	b := make([]byte, 32)
	defer clear(b)
	if _, err := io.ReadFull(random, b); err != nil {
		return nil, fmt.Errorf("noisetor: generating client-auth key: %w", err)
	}
	priv, err := ecdh.X25519().NewPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	return &ClientAuthKey{&clientAuthKey{priv: priv}}, nil
}

// PublicKey returns the public key as tor writes it: 52 characters of
// base32, the form of Peer.ClientAuth and of the "descriptor:x25519:" line
// of a tor authorized_clients file.
func (k *ClientAuthKey) PublicKey() string {
	return torBase32.EncodeToString(k.priv.PublicKey().Bytes())
}

// String returns the public key only.
func (k ClientAuthKey) String() string { return "noisetor.ClientAuthKey(" + k.PublicKey() + ")" }

// GoString is like String.
func (k ClientAuthKey) GoString() string { return k.String() }

// Format prints String for every verb.
func (k ClientAuthKey) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// MarshalPrivateText returns the key file encoding,
// "NOISETOR-TOR-CLIENT-AUTH-X25519:<base32 private key>\n".
func (k *ClientAuthKey) MarshalPrivateText() []byte {
	return []byte(clientAuthKeyPrefix + torBase32.EncodeToString(k.priv.Bytes()) + "\n")
}

// ParseClientAuthKey parses MarshalPrivateText's encoding, or a line of a
// tor .auth_private file ("<onion>:descriptor:x25519:<base32 private key>").
// Errors never quote the input.
func ParseClientAuthKey(b []byte) (*ClientAuthKey, error) {
	s := strings.TrimSpace(string(b))
	var enc string
	if e, ok := strings.CutPrefix(s, clientAuthKeyPrefix); ok {
		enc = e
	} else if _, e, ok := strings.Cut(s, ":descriptor:x25519:"); ok {
		enc = e
	} else {
		return nil, badKey("client-auth key must start with %s (or be a tor .auth_private line)", clientAuthKeyPrefix)
	}
	raw, err := torBase32.DecodeString(strings.ToUpper(enc))
	defer clear(raw)
	if err != nil || len(raw) != 32 {
		return nil, badKey("client-auth key is not 32 bytes of base32")
	}
	priv, err := ecdh.X25519().NewPrivateKey(raw)
	if err != nil {
		return nil, badKey("client-auth key is invalid")
	}
	return &ClientAuthKey{&clientAuthKey{priv: priv}}, nil
}

// LoadClientAuthKey reads a client-auth key file. It refuses a file that
// group or others may access (ErrKeyFilePermissions).
func LoadClientAuthKey(path string) (*ClientAuthKey, error) {
	b, err := readPrivateFile(path)
	if err != nil {
		return nil, err
	}
	k, err := ParseClientAuthKey(b)
	clear(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// SaveClientAuthKey writes k to a new file with mode 0600; it never
// overwrites.
func SaveClientAuthKey(path string, k *ClientAuthKey) error {
	return writePrivateFile(path, k.MarshalPrivateText())
}

// parseClientAuthPublic decodes a 52-character base32 x25519 public key,
// with or without tor's "descriptor:x25519:" prefix.
func parseClientAuthPublic(s string) ([]byte, error) {
	s = strings.TrimPrefix(strings.TrimSpace(s), "descriptor:x25519:")
	raw, err := torBase32.DecodeString(strings.ToUpper(s))
	if err != nil || len(raw) != 32 {
		return nil, badKey("not a 52-character base32 x25519 public key")
	}
	if _, err := NewPublicKey(X25519, raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// ---- helpers ---------------------------------------------------------------

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

// torPoW says whether a tor has the onion-service proof-of-work module.
type torPoW int

const (
	powUnknown torPoW = iota // attached, or a custom ProcessCreator
	powYes
	powNo
)

// checkTorExecutable runs "tor --version", so that a too-old tor is
// reported as such rather than as a failure to start, and
// "tor --list-modules", which says whether it has proof-of-work.
func checkTorExecutable(ctx context.Context, exe string) (torPoW, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, exe, "--version").Output()
	if err != nil {
		return powUnknown, fmt.Errorf("noisetor: running %s --version: %w", exe, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	if err := checkTorVersion(line); err != nil {
		return powUnknown, err
	}
	out, err = exec.CommandContext(ctx, exe, "--list-modules").Output()
	if err != nil {
		return powUnknown, nil
	}
	for _, l := range strings.Split(string(out), "\n") {
		switch strings.TrimSpace(l) {
		case "pow: yes":
			return powYes, nil
		case "pow: no":
			return powNo, nil
		}
	}
	return powUnknown, nil
}

// splitNetAddr splits "unix:/path" into ("unix", "/path"); anything else
// is a TCP address.
func splitNetAddr(a string) (network, addr string) {
	if p, ok := strings.CutPrefix(a, "unix:"); ok {
		return "unix", p
	}
	return "tcp", a
}

// parseQuotedList splits a GETINFO value such as `"127.0.0.1:9050" "unix:/x"`.
func parseQuotedList(v string) []string {
	var out []string
	for _, f := range strings.Fields(v) {
		if f = strings.Trim(f, `"`); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// torOutput receives tor's stdout and stderr and passes its lines to the
// logger: warnings and errors at Warn, the rest at Debug. It keeps the last
// lines for error messages.
type torOutput struct {
	log  *slog.Logger
	mu   sync.Mutex
	buf  []byte
	last []string
}

func (o *torOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf = append(o.buf, p...)
	for {
		i := bytes.IndexByte(o.buf, '\n')
		if i < 0 {
			if len(o.buf) > 4096 {
				o.buf = o.buf[:0]
			}
			return len(p), nil
		}
		line := string(bytes.TrimSpace(o.buf[:i]))
		o.buf = o.buf[i+1:]
		if line == "" {
			continue
		}
		if len(o.last) == 5 {
			o.last = o.last[1:]
		}
		o.last = append(o.last, line)
		level := slog.LevelDebug
		if strings.Contains(line, "[warn]") || strings.Contains(line, "[err]") {
			level = slog.LevelWarn
		}
		o.log.Log(context.Background(), level, "tor: "+line)
	}
}

// tail returns the last lines tor printed, for an error message.
func (o *torOutput) tail() string {
	if o == nil {
		return ""
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.last) == 0 {
		return ""
	}
	return "; tor said: " + strings.Join(o.last, " | ")
}
