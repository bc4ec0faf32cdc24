package noisetor

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cretz/bine/control"
	"github.com/cretz/bine/process"
)

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
