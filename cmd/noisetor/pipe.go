package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/noisetor/noisetor"
	"golang.org/x/net/proxy"
)

func init() {
	register(serveCmd)
	register(connectCmd)
}

// linkOptions are the flags common to serve and connect.
type linkOptions struct {
	key      keyOptions
	previous previousKeyOptions
	keyring  string
	patterns string
	ciphers  string
	timeout  time.Duration
	quiet    bool
}

func (o *linkOptions) register(fs *flag.FlagSet, defPatterns string) {
	o.key.register(fs)
	fs.StringVar(&o.keyring, "r", "", "keyring `file` listing the peers this machine may talk to")
	fs.StringVar(&o.patterns, "pattern", defPatterns, "handshake `patterns`: kk, xk, or a list such as kk,xk")
	fs.StringVar(&o.ciphers, "cipher", "chachapoly", "`ciphers`: chachapoly, aesgcm, or a list")
	fs.DurationVar(&o.timeout, "timeout", 60*time.Second, "give up on the handshake after `duration` (WIRE.md §7)")
	fs.BoolVar(&o.quiet, "q", false, "do not log connection attempts on standard error")
}

// config loads the key and keyring and builds the noisetor configuration.
func (o *linkOptions) config(e *env) (*noisetor.Config, func(), error) {
	if o.keyring == "" {
		return nil, nil, usagef("missing -r KEYRING")
	}
	pats, err := parsePatterns(o.patterns)
	if err != nil {
		return nil, nil, err
	}
	ciphers, err := parseCiphers(o.ciphers)
	if err != nil {
		return nil, nil, err
	}
	kr, err := noisetor.LoadKeyring(o.keyring)
	if err != nil {
		return nil, nil, err
	}
	key, closeKey, err := o.key.load()
	if err != nil {
		return nil, nil, err
	}
	previous, closePrevious, err := o.previous.load(&o.key)
	if err != nil {
		closeKey()
		return nil, nil, err
	}
	closeKeys := func() { closePrevious(); closeKey() }
	var logOut io.Writer = e.stderr
	if o.quiet {
		logOut = io.Discard
	}
	return &noisetor.Config{
		StaticKey:         key,
		PreviousStaticKey: previous,
		Keyring:           kr,
		Patterns:          pats,
		CipherSuites:      ciphers,
		HandshakeTimeout:  o.timeout,
		Logger:            slog.New(slog.NewTextHandler(logOut, nil)),
	}, closeKeys, nil
}

func parsePatterns(s string) ([]noisetor.Pattern, error) {
	var out []noisetor.Pattern
	for _, f := range strings.Split(s, ",") {
		switch strings.ToLower(strings.TrimSpace(f)) {
		case "kk":
			out = append(out, noisetor.KK)
		case "xk":
			out = append(out, noisetor.XK)
		default:
			return nil, usagef("unknown pattern %q (want kk or xk)", f)
		}
	}
	return out, nil
}

func parseCiphers(s string) ([]noisetor.CipherSuite, error) {
	var out []noisetor.CipherSuite
	for _, f := range strings.Split(s, ",") {
		switch strings.ToLower(strings.TrimSpace(f)) {
		case "chachapoly", "chacha20poly1305", "chacha":
			out = append(out, noisetor.ChaChaPoly)
		case "aesgcm", "aes", "aes-gcm":
			out = append(out, noisetor.AESGCM)
		default:
			return nil, usagef("unknown cipher %q (want chachapoly or aesgcm)", f)
		}
	}
	return out, nil
}

type serveOptions struct {
	link       linkOptions
	via        viaOptions
	clientAuth string // with --via over tor
	listen     string
	tor        torOptions
	onion      onionOptions
	status     statusOptions
}

var serveCmd = &command{
	name:  "serve",
	args:  "-k KEYFILE -r KEYRING [-l ADDR] [flags]",
	short: "accept one noisetor connection and pipe it to stdin and stdout",
	long: `
Serve listens on ADDR, waits for one peer from the keyring to complete the
handshake, then copies standard input to the peer and the peer's data to
standard output, like "nc -l". Each direction ends on its own: after the
peer has closed its side, serve goes on sending until standard input ends. It
exits when both directions have ended: 0 if all of standard input was sent and
the peer closed its side cleanly, 1 if the stream was cut or not all input
could be sent (data may be missing; the peer then sees a cut stream too). Use
it with 'noisetor connect' on the other machine to test a link.

With --onion-key and a tor (--tor-data or --tor-control) it publishes an
onion service and listens there; only peers with an auth= key in the keyring
can reach it. Every connection attempt, refused ones included, is logged on
standard error.

With --via SYNC it registers with the sync server SYNC (a keyring name;
dialed at its addr=, over tor if one is given) instead of listening, and
takes the first peer relayed to it: the watchtower's side of a relayed link.

While this machine's key is being rotated (keyring rotate), run it with -k
NEW-KEY and --previous-key OLD-KEY: peers dial it with the old key until the
overlap ends.

` + reloadHelp,
	flags: func(fs *flag.FlagSet) any {
		o := new(serveOptions)
		o.link.register(fs, "kk") // XK only when asked: it lets anyone with our public key make us compute a DH (WIRE.md §3.3)
		o.link.previous.register(fs)
		o.via.register(fs)
		fs.StringVar(&o.clientAuth, "client-auth-key", "", "with --via over tor: this machine's client-authorization key `file`\nfor the sync server's onion service")
		fs.StringVar(&o.listen, "l", "127.0.0.1:9000", "listen on `host:port` (with --onion-key: the local address tor forwards to)")
		o.tor.register(fs)
		o.onion.register(fs, 9000)
		o.status.register(fs)
		return o
	},
	run: runServe,
}

func runServe(e *env, _ *flag.FlagSet, opts any, args []string) error {
	o := opts.(*serveOptions)
	if err := wantArgs(args, 0, 0, ""); err != nil {
		return err
	}
	cfg, closeKey, err := o.link.config(e)
	if err != nil {
		return err
	}
	defer closeKey()
	reloadLog := cfg.Logger
	if o.link.quiet { // -q silences connection attempts, not a keyring that failed to reload
		reloadLog = slog.New(slog.NewTextHandler(e.stderr, nil))
	}
	defer followKeyring(e.ctx, o.link.keyring, cfg.Keyring, reloadLog)()
	tor, err := o.tor.start(e.ctx, cfg.Logger)
	if err != nil {
		return err
	}
	if tor != nil {
		defer tor.Close()
	}
	var ln, inner net.Listener // inner: the onion or TCP listener, if not --via
	var addr string
	if o.via.server != "" {
		if o.onion.keyFile != "" {
			return usagef("--via registers with a sync server: it takes no --onion-key")
		}
		rc, err := o.via.client(cfg, tor, o.clientAuth)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(e.ctx, o.link.timeout)
		ln, err = rc.Listen(ctx)
		cancel()
		if err != nil {
			return err
		}
		addr = "sync server " + o.via.server
	} else if o.clientAuth != "" {
		return usagef("--client-auth-key is for --via")
	} else {
		var err error
		if inner, addr, err = o.onion.listen(e, tor, o.listen, cfg.Keyring); err != nil {
			return err
		}
		ln = noisetor.NewListener(inner, cfg)
	}
	defer ln.Close()
	stopStatus, err := o.status.start(cfg.Logger, cfg, inner, nil)
	if err != nil {
		return err
	}
	defer stopStatus()
	fmt.Fprintf(e.stderr, "noisetor serve: listening on %s as %s (fingerprint %s)\n",
		addr, cfg.StaticKey.PublicKey(), cfg.StaticKey.PublicKey().Fingerprint())

	// Close the listener when interrupted, so that Accept returns.
	stop := context.AfterFunc(e.ctx, func() { ln.Close() })
	c, err := ln.Accept()
	stop()
	if err != nil {
		if e.ctx.Err() != nil {
			return errors.New("interrupted")
		}
		return err
	}
	conn := c.(*noisetor.Conn)
	st := conn.ConnectionState()
	fmt.Fprintf(e.stderr, "noisetor serve: connected to %s (%s, %s; its key's fingerprint %s)\n", st.Peer.Name, st.Pattern, st.CipherSuite, st.PeerKey.Fingerprint())
	return pipe(e, conn)
}

type connectOptions struct {
	link       linkOptions
	via        viaOptions
	peer       string
	socks      string
	tor        torOptions
	clientAuth string
}

var connectCmd = &command{
	name:  "connect",
	args:  "-k KEYFILE -r KEYRING [--peer NAME] [--socks ADDR] [--via SYNC] PEER|ADDR",
	short: "dial a peer over noisetor and pipe it to stdin and stdout",
	long: `
Connect dials a peer, completes the handshake, then copies standard input to
the peer and the peer's data to standard output, like "nc". The argument is a
peer's name in the keyring (dialed at its addr=) or an address; an address
must be some peer's addr=, or --peer must name the peer expected there.

With --tor-data or --tor-control the connection goes through tor, isolated
from other peers' circuits, and --client-auth-key registers this machine's
client-authorization key for the onion service. --socks uses a plain SOCKS5
port instead. With --via SYNC the connection is relayed by the sync server
SYNC (a keyring name), and PEER must be a keyring name: the wallet's side of
a relayed link, end-to-end encrypted past the sync server. As with serve, each direction ends on its own, and connect
exits when both have: status 0 if all of standard input was sent and the peer
closed its side cleanly, 1 if the handshake failed, the stream was cut or not
all input could be sent.`,
	flags: func(fs *flag.FlagSet) any {
		o := new(connectOptions)
		o.link.register(fs, "kk")
		o.via.register(fs)
		fs.StringVar(&o.peer, "peer", "", "the keyring `name` of the peer at the address")
		fs.StringVar(&o.socks, "socks", "", "dial through the Tor SOCKS5 proxy at `host:port` (such as 127.0.0.1:9050)")
		o.tor.register(fs)
		fs.StringVar(&o.clientAuth, "client-auth-key", "", "this machine's Tor client-authorization key `file` (see client-auth-key);\nneeds --tor-data or --tor-control")
		return o
	},
	run: runConnect,
}

func runConnect(e *env, _ *flag.FlagSet, opts any, args []string) error {
	o := opts.(*connectOptions)
	if err := wantArgs(args, 1, 1, "the peer's name or address"); err != nil {
		return err
	}
	cfg, closeKey, err := o.link.config(e)
	if err != nil {
		return err
	}
	defer closeKey()
	if o.via.server != "" {
		return connectVia(e, o, cfg, args[0])
	}
	addr, name := args[0], o.peer
	if p, ok := cfg.Keyring.ByName(args[0]); ok {
		if p.Address == "" {
			return fmt.Errorf("peer %s has no addr= in %s; give its address instead", p.Name, o.link.keyring)
		}
		if name != "" && name != p.Name {
			return usagef("--peer %s contradicts the peer named by the argument, %s", name, p.Name)
		}
		addr, name = p.Address, p.Name
	} else if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("%s is neither a peer in %s nor a host:port address", addr, o.link.keyring)
	}
	d := &noisetor.Dialer{Config: cfg, Peer: name}
	tor, err := o.tor.start(e.ctx, cfg.Logger)
	if err != nil {
		return err
	}
	switch {
	case tor != nil && o.socks != "":
		return usagef("use either --socks or a tor (--tor-data, --tor-control), not both")
	case tor != nil:
		defer tor.Close()
		td := &noisetor.TorDialer{Tor: tor}
		if o.clientAuth != "" {
			if td.ClientAuth, err = noisetor.LoadClientAuthKey(o.clientAuth); err != nil {
				return err
			}
		}
		d.NetDialer = td
	case o.clientAuth != "":
		return usagef("--client-auth-key needs --tor-data or --tor-control")
	case o.socks != "":
		d.NetDialer, err = socksDialer(o.socks, name, addr, cfg.Keyring)
		if err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(e.ctx, o.link.timeout)
	c, err := d.DialContext(ctx, "tcp", addr)
	cancel()
	if err != nil {
		if o.socks != "" {
			return socksHint(err)
		}
		return err
	}
	conn := c.(*noisetor.Conn)
	st := conn.ConnectionState()
	fmt.Fprintf(e.stderr, "noisetor connect: connected to %s at %s (%s, %s; its key's fingerprint %s)\n", st.Peer.Name, addr, st.Pattern, st.CipherSuite, st.PeerKey.Fingerprint())
	return pipe(e, conn)
}

// viaOptions select a sync server to relay through (serve and connect).
type viaOptions struct {
	server, addr string
}

func (o *viaOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.server, "via", "", "relay through the sync server with keyring `name` SYNC (WIRE.md §12)")
	fs.StringVar(&o.addr, "via-addr", "", "the sync server's `host:port` (default: its addr= in the keyring)")
}

// client returns the relay client of o, over tor if it is running, with
// this machine's client-authorization key for the sync server's onion
// service if clientAuthFile is set.
func (o *viaOptions) client(cfg *noisetor.Config, tor *noisetor.Tor, clientAuthFile string) (*noisetor.RelayClient, error) {
	if _, ok := cfg.Keyring.ByName(o.server); !ok {
		return nil, fmt.Errorf("--via %s: the keyring has no peer of that name (the sync server must be listed, with its addr=)", echoArg(o.server))
	}
	rc := &noisetor.RelayClient{Config: cfg, Server: o.server, Address: o.addr}
	switch {
	case tor != nil:
		td := &noisetor.TorDialer{Tor: tor}
		if clientAuthFile != "" {
			k, err := noisetor.LoadClientAuthKey(clientAuthFile)
			if err != nil {
				return nil, err
			}
			td.ClientAuth = k
		}
		rc.NetDialer = td
	case clientAuthFile != "":
		return nil, usagef("--client-auth-key needs --tor-data or --tor-control")
	}
	return rc, nil
}

// connectVia is connect through a sync server.
func connectVia(e *env, o *connectOptions, cfg *noisetor.Config, peer string) error {
	switch {
	case o.socks != "":
		return usagef("--via takes a tor (--tor-data, --tor-control), not --socks")
	case o.peer != "" && o.peer != peer:
		return usagef("--peer %s contradicts the peer named by the argument, %s", echoArg(o.peer), echoArg(peer))
	}
	if _, ok := cfg.Keyring.ByName(peer); !ok {
		return fmt.Errorf("%s is not a peer in %s: through a sync server, name the peer", echoArg(peer), o.link.keyring)
	}
	tor, err := o.tor.start(e.ctx, cfg.Logger)
	if err != nil {
		return err
	}
	if tor != nil {
		defer tor.Close()
	}
	rc, err := o.via.client(cfg, tor, o.clientAuth)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(e.ctx, o.link.timeout)
	conn, err := rc.Dial(ctx, peer)
	cancel()
	if err != nil {
		return err
	}
	st := conn.ConnectionState()
	// The fingerprint shows whom the sync server routed us to: a wrong key
	// under the right name reaches whichever machine holds that key.
	fmt.Fprintf(e.stderr, "noisetor connect: connected to %s through sync server %s (%s, %s; its key's fingerprint %s)\n", st.Peer.Name, o.via.server, st.Pattern, st.CipherSuite, st.PeerKey.Fingerprint())
	return pipe(e, conn)
}

// socksDialer dials through Tor's SOCKS5 port. The SOCKS username is the
// peer's name, so Tor (IsolateSOCKSAuth, on by default) keeps each peer on
// its own circuits.
func socksDialer(socks, name, addr string, kr *noisetor.Keyring) (noisetor.ContextDialer, error) {
	if name == "" {
		if p, ok := kr.ByAddress(addr); ok {
			name = p.Name
		}
	}
	d, err := proxy.SOCKS5("tcp", socks, &proxy.Auth{User: "noisetor-" + name, Password: "x"}, &net.Dialer{})
	if err != nil {
		return nil, fmt.Errorf("SOCKS5 proxy %s: %w", socks, err)
	}
	cd, ok := d.(proxy.ContextDialer)
	if !ok {
		return nil, fmt.Errorf("SOCKS5 proxy %s: dialer has no DialContext", socks)
	}
	return cd, nil
}

// torSOCKSErrors are the extended SOCKS5 replies of tor (ExtendedErrors),
// which golang.org/x/net/proxy reports only as "unknown code: N".
var torSOCKSErrors = map[int]string{
	0xF0: "onion service descriptor not found",
	0xF1: "onion service descriptor is invalid",
	0xF2: "onion service introduction failed",
	0xF3: "onion service rendezvous failed",
	0xF4: "the onion service requires client authorization and tor has no key for it (use --tor-control with --client-auth-key)",
	0xF5: "the onion service refused our client authorization",
	0xF6: "invalid onion address",
	0xF7: "onion service introduction timed out",
}

// socksHint explains tor's extended SOCKS error codes.
func socksHint(err error) error {
	for code, what := range torSOCKSErrors {
		if strings.Contains(err.Error(), fmt.Sprintf("unknown code: %d", code)) {
			return fmt.Errorf("%w (0x%X: %s)", err, code, what)
		}
	}
	return err
}

// pipe copies stdin to conn and conn to stdout until both directions end.
// When stdin ends it half-closes conn (CloseWrite), so the peer sees a clean
// end of data and can still answer. Each direction ends on its own (WIRE.md
// §6.4): after the peer's close record, pipe goes on sending until stdin
// ends. It succeeds only if both directions ended cleanly: all of stdin sent
// and closed with a close record, and the peer's close record received. A
// stream cut without the peer's close record is an error (the data may be
// truncated); so is input that could not all be sent, and then pipe sends no
// close record, so that the peer sees a truncation too.
func pipe(e *env, conn *noisetor.Conn) error {
	// abort ends the connection without a close record: Close sends one
	// when no Write is in flight, and the sender may be between two.
	abort := func() { conn.NetConn().Close() }
	defer conn.Close()
	stop := context.AfterFunc(e.ctx, abort)
	defer stop()

	sent := make(chan error, 1)
	var sendFailed atomic.Bool // set before the sender cuts the connection
	go func() {
		_, err := io.Copy(conn, e.stdin)
		if err == nil {
			err = conn.CloseWrite()
		}
		if err != nil {
			// Before saying so: once the main goroutine hears of it, it
			// returns and its deferred Close would send a close record,
			// a clean end after part of the input.
			sendFailed.Store(true)
			abort() // the peer must not wait for the rest; it sees a truncation
		}
		sent <- err
	}()
	_, rerr := io.Copy(e.stdout, conn)
	switch {
	case e.ctx.Err() != nil:
		abort()
		return errors.New("interrupted")
	case rerr != nil:
		if sendFailed.Load() { // the sender failed first and cut the connection
			return fmt.Errorf("sending: not all input was delivered: %w", <-sent)
		}
		abort()
		select {
		case serr := <-sent:
			if serr != nil {
				return fmt.Errorf("sending: not all input was delivered: %w", serr)
			}
		default:
		}
		if errors.Is(rerr, io.ErrUnexpectedEOF) {
			return errors.New("the connection was cut before the peer closed it: the data may be incomplete")
		}
		return fmt.Errorf("receiving: %w", rerr)
	}
	// The peer has finished sending; our direction is still ours to finish.
	select {
	case serr := <-sent:
		if serr != nil {
			return fmt.Errorf("sending: not all input was delivered: %w", serr)
		}
		return nil
	case <-e.ctx.Done():
		abort()
		return errors.New("interrupted")
	}
}
