package tortest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cretz/bine/control"
	"github.com/cretz/bine/process"
	"github.com/cretz/bine/tor"
)

// TorOptions configures a client or onion-service tor started by
// Network.StartTor.
type TorOptions struct {
	// Name names the tor's directory under Network.Dir. Default "torN".
	Name string

	// Torrc holds extra torrc lines, for example HiddenServiceDir and
	// HiddenServicePort, or options of the code under test.
	Torrc []string

	// ControlPassword, if set, makes the control port require this password
	// (HashedControlPassword) instead of cookie authentication.
	ControlPassword string

	// BootstrapTimeout bounds the wait for the tor to bootstrap. Default 60s.
	BootstrapTimeout time.Duration
}

// A Tor is a client or onion-service tor of a Network, run by the fixture.
// Code under test attaches to it through its control port, as it would to a
// system tor, and dials through its SOCKS port.
type Tor struct {
	// Name is the TorOptions.Name.
	Name string

	// DataDir is tor's DataDirectory.
	DataDir string

	// ControlAddr is the control port, "127.0.0.1:<port>".
	ControlAddr string

	// CookieFile is the control-port authentication cookie, or "" if the
	// tor uses ControlPassword.
	CookieFile string

	// ControlPassword is the TorOptions.ControlPassword.
	ControlPassword string

	// SocksAddr is the SOCKS5 port, "127.0.0.1:<port>". It has the
	// ExtendedErrors flag, so SOCKS replies carry tor's onion-service error
	// codes (0xF0-0xF7).
	SocksAddr string

	// StartupTime is how long the last Start or Restart took, until the tor
	// had bootstrapped.
	StartupTime time.Duration

	n         *Network
	p         *torProc
	extra     string
	bootstrap time.Duration
}

// StartTor starts a tor that joins the network with a SOCKS port and a
// control port, and returns once it has bootstrapped. ctx bounds only the
// start-up. Network.Close stops it if Tor.Close has not.
func (n *Network) StartTor(ctx context.Context, opts *TorOptions) (*Tor, error) {
	var o TorOptions
	if opts != nil {
		o = *opts
	}
	if o.BootstrapTimeout == 0 {
		o.BootstrapTimeout = 60 * time.Second
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil, errors.New("tortest: network is closed")
	}
	// The data directory is the tor's identity in the network: create it
	// under the lock, with a fresh name if this one is taken (a test run
	// with -count=2 asks for the same name twice).
	base := o.Name
	for i := 1; ; i++ {
		name := fmt.Sprintf("tor%d", i)
		if base != "" {
			name = base
			if i > 1 {
				name = fmt.Sprintf("%s-%d", base, i)
			}
		}
		err := os.Mkdir(filepath.Join(n.Dir, name), 0o700)
		if err == nil {
			o.Name = name
			break
		}
		if !errors.Is(err, os.ErrExist) {
			n.mu.Unlock()
			return nil, fmt.Errorf("tortest: %w", err)
		}
	}
	t := &Tor{Name: o.Name, ControlPassword: o.ControlPassword, n: n, bootstrap: o.BootstrapTimeout,
		DataDir: filepath.Join(n.Dir, o.Name)}
	// t.p exists from here on, so Close works on a tor whose start failed.
	t.p = &torProc{name: o.Name, dir: t.DataDir, tor: n.tor}
	n.tors = append(n.tors, t)
	n.mu.Unlock()

	var b strings.Builder
	b.WriteString(n.commonTorrc(t.DataDir))
	b.WriteString("UseEntryGuards 0\n")
	if o.ControlPassword != "" {
		hash, err := hashPassword(ctx, n.tor, o.ControlPassword)
		if err != nil {
			return nil, err
		}
		b.WriteString("CookieAuthentication 0\nHashedControlPassword " + hash + "\n")
	} else {
		t.CookieFile = filepath.Join(t.DataDir, "control_auth_cookie")
		b.WriteString("CookieAuthentication 1\n")
	}
	for _, l := range o.Torrc {
		b.WriteString(strings.TrimSpace(l) + "\n")
	}
	t.extra = b.String()

	// The first start lets tor pick its ports ("auto"), so they cannot
	// clash; restarts reuse them, so that whoever holds the addresses can
	// reconnect.
	portFile := filepath.Join(t.DataDir, "control.port")
	t.p.torrc = t.extra + "ControlPort auto\nControlPortWriteToFile " + portFile + "\n" +
		"SocksPort 127.0.0.1:auto ExtendedErrors\n"
	start := time.Now()
	if err := t.p.start(); err != nil {
		return nil, err
	}
	err := func() error {
		ctx, cancel := context.WithTimeout(ctx, o.BootstrapTimeout)
		defer cancel()
		for {
			b, _ := os.ReadFile(portFile)
			if port, err := process.ControlPortFromFileContents(string(b)); err == nil {
				t.ControlAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
				return nil
			}
			if err := t.p.exitError(); err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("tortest: tor %s wrote no control port: %w\n%s", o.Name, ctx.Err(), t.p.logTail())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	if err == nil {
		err = t.waitBootstrapped(ctx)
	}
	if err != nil {
		t.Close()
		return nil, err
	}
	t.StartupTime = time.Since(start)
	t.p.torrc = t.extra + "ControlPort " + t.ControlAddr + "\nSocksPort " + t.SocksAddr + " ExtendedErrors\n"
	n.logf("tortest: tor %s bootstrapped in %.1fs (control %s, SOCKS %s)", o.Name, t.StartupTime.Seconds(), t.ControlAddr, t.SocksAddr)
	return t, nil
}

// TB is the part of testing.TB that the helpers use.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// NewTor is StartTor for tests: it fails t if the tor does not come up,
// logs its start-up time, and closes it when t ends.
func (n *Network) NewTor(t TB, opts *TorOptions) *Tor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tr, err := n.StartTor(ctx, opts)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Logf("tortest: tor %s ready in %.1fs (control %s, SOCKS %s)", tr.Name, tr.StartupTime.Seconds(), tr.ControlAddr, tr.SocksAddr)
	t.Cleanup(func() { tr.Close() })
	return tr
}

// Stop stops the tor (SIGTERM) and waits for it to exit. Start brings it
// back.
func (t *Tor) Stop() { t.p.stop() }

// Kill kills the tor (SIGKILL), like a crash, and waits for it to exit.
// Start brings it back.
func (t *Tor) Kill() { t.p.kill() }

// Running reports whether the tor process is alive.
func (t *Tor) Running() bool { return t.p.running() }

// Start starts a stopped or killed tor again, with the same data
// directory and ports, and waits for it to bootstrap.
func (t *Tor) Start(ctx context.Context) error {
	if t.p.running() {
		return fmt.Errorf("tortest: tor %s is already running", t.Name)
	}
	t.n.mu.Lock()
	closed := t.n.closed
	t.n.mu.Unlock()
	if closed {
		return errors.New("tortest: network is closed")
	}
	start := time.Now()
	if err := t.p.start(); err != nil {
		return err
	}
	if err := t.waitBootstrapped(ctx); err != nil {
		return err
	}
	t.StartupTime = time.Since(start)
	return nil
}

// Restart stops the tor and starts it again (Stop, then Start).
func (t *Tor) Restart(ctx context.Context) error {
	t.Stop()
	return t.Start(ctx)
}

// Close stops the tor. It is safe to call more than once.
func (t *Tor) Close() error {
	t.p.stop()
	return nil
}

// Control returns a new authenticated connection to the tor's control port.
// The caller closes it.
func (t *Tor) Control() (*control.Conn, error) {
	tc, err := textproto.Dial("tcp", t.ControlAddr)
	if err != nil {
		return nil, fmt.Errorf("tortest: control port of tor %s: %w", t.Name, err)
	}
	c := control.NewConn(tc)
	if err := c.Authenticate(t.ControlPassword); err != nil {
		c.Close()
		return nil, fmt.Errorf("tortest: authenticating to tor %s: %w", t.Name, err)
	}
	return c, nil
}

// Bine returns a github.com/cretz/bine handle on the tor, attached to its
// control port, for code that drives tor with bine directly. Closing the
// handle closes its control connection and leaves the tor running.
func (t *Tor) Bine() (*tor.Tor, error) {
	c, err := t.Control()
	if err != nil {
		return nil, err
	}
	_, port, _ := net.SplitHostPort(t.ControlAddr)
	p, _ := strconv.Atoi(port)
	return &tor.Tor{Control: c, ControlPort: p, DataDir: t.DataDir}, nil
}

// waitBootstrapped polls the control port until tor reports 100 %
// bootstrap, and records the SOCKS address.
func (t *Tor) waitBootstrapped(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, t.bootstrap)
	defer cancel()
	var c *control.Conn
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	var last string
	for {
		if err := t.p.exitError(); err != nil {
			return err
		}
		if c == nil {
			c, _ = t.Control()
		}
		if c != nil {
			kv, err := c.GetInfo("status/bootstrap-phase", "net/listeners/socks")
			if err != nil {
				c.Close()
				c = nil
			} else {
				for _, v := range kv {
					switch v.Key {
					case "status/bootstrap-phase":
						last = v.Val
					case "net/listeners/socks":
						// `"127.0.0.1:9050" ...`; bine unquotes a lone value.
						if f := strings.Fields(v.Val); len(f) > 0 {
							t.SocksAddr = strings.Trim(f[0], `"`)
						}
					}
				}
				if strings.Contains(last, "PROGRESS=100 ") {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("tortest: tor %s did not bootstrap (%s): %w\n%s", t.Name, last, ctx.Err(), t.p.logTail())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// hashPassword runs tor --hash-password.
func hashPassword(ctx context.Context, tor torExe, pw string) (string, error) {
	out, err := tor.command(ctx, "--quiet", "--hash-password", pw).Output()
	if err != nil {
		return "", fmt.Errorf("tortest: tor --hash-password: %w", err)
	}
	fields := strings.Fields(string(out))
	if len(fields) == 0 || !strings.HasPrefix(fields[len(fields)-1], "16:") {
		return "", errors.New("tortest: tor --hash-password printed no hash")
	}
	return fields[len(fields)-1], nil
}
