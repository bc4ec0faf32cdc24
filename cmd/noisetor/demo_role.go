package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/noisetor/noisetor"
)

// A roleConfig is what a demo role process is told, in its role.json.
type roleConfig struct {
	Role           string     `json:"role"`
	KeyFile        string     `json:"key_file,omitempty"`
	PKCS11         *roleToken `json:"pkcs11,omitempty"`
	KeyringFile    string     `json:"keyring_file"`
	OnionKeyFile   string     `json:"onion_key_file,omitempty"`
	OnionPort      int        `json:"onion_port,omitempty"`
	ClientAuthFile string     `json:"client_auth_file,omitempty"`
	TorDir         string     `json:"tor_dir"`
	Torrc          []string   `json:"torrc"`

	// PreviousKeyFile is the key being rotated away from (--previous-key):
	// the role answers to it too until the overlap ends.
	PreviousKeyFile string `json:"previous_key_file,omitempty"`
}

// roleToken locates a key on a PKCS#11 token. The PIN is in a file.
type roleToken struct {
	Module, Token, Key, PINFile string
}

var demoRoleCmd = &command{
	name:   "demo-role",
	args:   "ROLE DIR",
	short:  "run one role of the demo (started by noisetor demo)",
	long:   "Demo-role runs one role of the custody demo from DIR/role.json, reporting to noisetor demo on standard output and logging JSON on standard error. noisetor demo starts it; it is not meant to be run by hand.",
	hidden: true,
	run:    runDemoRole,
}

// A role is one running demo role.
type role struct {
	e    *env
	cfg  roleConfig
	log  *slog.Logger
	ncfg *noisetor.Config
	kf   *noisetor.KeyringFile
	tor  *noisetor.Tor
	td   *noisetor.TorDialer // a dialing role's, once made
	cmds chan string
	// closers run, last first, when the role stops: a clean stop closes
	// its connections with close records before its tor goes.
	closers []func()

	mu  sync.Mutex
	enc *json.Encoder
}

func runDemoRole(e *env, _ *flag.FlagSet, _ any, args []string) (err error) {
	if err := wantArgs(args, 2, 2, "the role and its directory"); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(args[1], "role.json"))
	if err != nil {
		return err
	}
	r := &role{e: e, enc: json.NewEncoder(e.stdout), cmds: make(chan string, 4)}
	if err := json.Unmarshal(b, &r.cfg); err != nil {
		return fmt.Errorf("role.json: %w", err)
	}
	if r.cfg.Role != args[0] {
		return fmt.Errorf("role.json is for %q, not %q", r.cfg.Role, args[0])
	}
	r.log = slog.New(slog.NewJSONHandler(e.stderr, nil)).With("role", r.cfg.Role)
	defer func() {
		if err != nil && e.ctx.Err() == nil {
			r.log.Error("demo: role failed", "err", err)
			r.emit(roleEvent{Event: "fail", Text: errorText(err)})
		}
	}()
	go func() {
		sc := bufio.NewScanner(e.stdin)
		for sc.Scan() {
			r.cmds <- strings.TrimSpace(sc.Text())
		}
	}()

	var key noisetor.StaticKey
	if t := r.cfg.PKCS11; t != nil {
		k, err := noisetor.OpenPKCS11Key(&noisetor.PKCS11Config{
			Module: t.Module, TokenLabel: t.Token, KeyLabel: t.Key, PINFile: t.PINFile,
		})
		if err != nil {
			return err
		}
		defer k.Close()
		key = k
	} else {
		k, err := noisetor.LoadPrivateKey(r.cfg.KeyFile)
		if err != nil {
			return err
		}
		key = k
	}
	kr, err := noisetor.LoadKeyring(r.cfg.KeyringFile)
	if err != nil {
		return err
	}
	r.ncfg = &noisetor.Config{StaticKey: key, Keyring: kr, Logger: r.log}
	if r.cfg.PreviousKeyFile != "" {
		if r.ncfg.PreviousStaticKey, err = noisetor.LoadPrivateKey(r.cfg.PreviousKeyFile); err != nil {
			return err
		}
	}
	r.kf = &noisetor.KeyringFile{Path: r.cfg.KeyringFile, Keyring: kr, Logger: r.log}

	start := time.Now()
	r.tor, err = noisetor.StartTor(e.ctx, &noisetor.TorConfig{DataDir: r.cfg.TorDir, Torrc: r.cfg.Torrc, Logger: r.log})
	if err != nil {
		return err
	}
	defer r.tor.Close()
	r.emit(roleEvent{Event: "tor-ready", Seconds: since(start)})

	switch r.cfg.Role {
	case "cosigner":
		err = r.cosigner()
	case "syncserver":
		err = r.syncserver()
	case "watchtower":
		err = r.watchtower()
	case "wallet":
		err = r.wallet()
	case "outsider":
		err = r.outsider()
	default:
		err = fmt.Errorf("unknown role %q", r.cfg.Role)
	}
	if err != nil {
		return err
	}
	// Stay up until the demo stops every role, so that an exit always
	// means something went wrong, and carry out its later commands.
	for {
		select {
		case c := <-r.cmds:
			r.command(c)
		case <-e.ctx.Done():
			for i := len(r.closers) - 1; i >= 0; i-- {
				r.closers[i]()
			}
			return nil
		}
	}
}

// command carries out a command the demo sends once the role is up:
// "reload" reloads the keyring file, as SIGHUP does for noisetor serve;
// "watch STEP" has the wallet reach the watchtower again.
func (r *role) command(c string) {
	switch verb, arg, _ := strings.Cut(c, " "); {
	case verb == "reload":
		change, err := r.kf.Reload()
		ev := roleEvent{Event: "result", Step: "reload", OK: err == nil, Text: change.NewFingerprint}
		if err != nil {
			ev.Err = errorText(err)
		}
		r.emit(ev)
	case verb == "watch" && r.td != nil:
		ctx, cancel := context.WithTimeout(r.e.ctx, 90*time.Second)
		defer cancel()
		r.watchThroughRelay(ctx, arg)
	default:
		r.log.Warn("demo: unknown command", "command", c)
	}
}

func since(t time.Time) float64 { return time.Since(t).Seconds() }

func (r *role) emit(ev roleEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.enc.Encode(ev)
}

// waitFor waits for the command line want from the demo.
func (r *role) waitFor(want string) error {
	for {
		select {
		case c := <-r.cmds:
			if c == want {
				return nil
			}
		case <-r.e.ctx.Done():
			return r.e.ctx.Err()
		}
	}
}

// publish publishes the role's onion service and returns a listener of
// authenticated noisetor connections on it.
func (r *role) publish() (net.Listener, error) {
	start := time.Now()
	onion, err := r.tor.ListenOnion(r.e.ctx, &noisetor.OnionConfig{
		KeyFile: r.cfg.OnionKeyFile,
		Port:    r.cfg.OnionPort,
		Keyring: r.ncfg.Keyring, // its peers' auth= keys: only they can find it
	})
	if err != nil {
		return nil, err
	}
	r.emit(roleEvent{Event: "ready", Seconds: since(start),
		Text: fmt.Sprintf("onion service %s published", onion.Addr())})
	return noisetor.NewListener(onion, r.ncfg), nil
}

// serveLines answers, in the background, one request line per connection
// with handle's reply, until the role stops and closes ln.
func (r *role) serveLines(ln net.Listener, handle func(st noisetor.ConnectionState, req string) string) {
	r.closers = append(r.closers, func() { ln.Close() })
	go r.acceptLines(ln, handle)
}

func (r *role) acceptLines(ln net.Listener, handle func(st noisetor.ConnectionState, req string) string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(time.Minute))
			req, err := bufio.NewReader(io.LimitReader(c, 4096)).ReadString('\n')
			if err != nil {
				r.log.Warn("demo: reading the request", "err", err)
				return
			}
			st := c.(interface {
				ConnectionState() noisetor.ConnectionState
			}).ConnectionState()
			req = strings.TrimSpace(req)
			reply := handle(st, req)
			r.log.Info("demo: request served", "peer", st.Peer.Name, "request", req, "reply", reply)
			io.WriteString(c, reply+"\n")
			c.(interface{ CloseWrite() error }).CloseWrite()
			io.Copy(io.Discard, c)
		}()
	}
}

func session(st noisetor.ConnectionState) string { return hex.EncodeToString(st.HandshakeHash[:8]) }

func (r *role) cosigner() error {
	ln, err := r.publish()
	if err != nil {
		return err
	}
	r.serveLines(ln, func(st noisetor.ConnectionState, req string) string {
		psbt, ok := strings.CutPrefix(req, "SIGN ")
		if !ok {
			return "ERR unknown request"
		}
		return fmt.Sprintf("co-signed %s for %s; session %s", psbt, st.Peer.Name, session(st))
	})
	return nil
}

func (r *role) syncserver() error {
	ln, err := r.publish()
	if err != nil {
		return err
	}
	srv := &noisetor.RelayServer{
		Config: r.ncfg,
		Allow:  noisetor.RelayRules{{From: "wallet", To: "watchtower"}}.Allow,
	}
	go srv.Serve(ln)
	context.AfterFunc(r.e.ctx, func() { srv.Close() })
	return nil
}

func (r *role) torDialer() (*noisetor.TorDialer, error) {
	td := &noisetor.TorDialer{Tor: r.tor}
	if r.cfg.ClientAuthFile != "" {
		ca, err := noisetor.LoadClientAuthKey(r.cfg.ClientAuthFile)
		if err != nil {
			return nil, err
		}
		td.ClientAuth = ca
	}
	r.td = td
	return td, nil
}

func (r *role) watchtower() error {
	td, err := r.torDialer()
	if err != nil {
		return err
	}
	if err := r.waitFor("register"); err != nil {
		return err
	}
	start := time.Now()
	rc := &noisetor.RelayClient{Config: r.ncfg, Server: "syncserver", NetDialer: td}
	ctx, cancel := context.WithTimeout(r.e.ctx, 90*time.Second)
	ln, err := rc.Listen(ctx)
	cancel()
	if err != nil {
		return err
	}
	r.emit(roleEvent{Event: "ready", Seconds: since(start), Text: "registered with the sync server"})
	r.serveLines(ln, func(st noisetor.ConnectionState, req string) string {
		channel, ok := strings.CutPrefix(req, "WATCH ")
		if !ok {
			return "ERR unknown request"
		}
		return fmt.Sprintf("watching %s for %s; session %s", channel, st.Peer.Name, session(st))
	})
	return nil
}

// exchange sends one request line on c and reads the reply line.
func exchange(c net.Conn, req string) (string, error) {
	c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.WriteString(c, req+"\n"); err != nil {
		return "", err
	}
	reply, err := bufio.NewReader(io.LimitReader(c, 4096)).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(reply), nil
}

// okResult describes a finished connection for the demo.
func okResult(step, addr string, start time.Time, c net.Conn, sent, reply string) roleEvent {
	st := c.(*noisetor.Conn).ConnectionState()
	return roleEvent{
		Event: "result", Step: step, OK: true, Addr: addr, Seconds: since(start),
		Peer: st.Peer.Name, PeerKey: st.PeerKey.Fingerprint(), Pattern: st.Pattern.String(), Cipher: st.CipherSuite.String(),
		HandshakeHash: hex.EncodeToString(st.HandshakeHash), Sent: sent, Reply: reply,
	}
}

func (r *role) wallet() error {
	td, err := r.torDialer()
	if err != nil {
		return err
	}
	if err := r.waitFor("go"); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.e.ctx, 90*time.Second)
	defer cancel()

	cos, _ := r.ncfg.Keyring.ByName("cosigner")
	start := time.Now()
	d := &noisetor.Dialer{Config: r.ncfg, NetDialer: td}
	c, err := d.DialContext(ctx, "tcp", cos.Address)
	if err != nil {
		r.emit(roleEvent{Event: "result", Step: "cosign", Addr: cos.Address, Seconds: since(start), Err: errorText(err)})
		return nil
	}
	hsDone := time.Now()
	req := "SIGN psbt:send-0.25-btc-to-cold-storage"
	reply, err := exchange(c, req)
	c.Close()
	if err != nil {
		r.emit(roleEvent{Event: "result", Step: "cosign", Addr: cos.Address, Err: "request: " + errorText(err)})
		return nil
	}
	ev := okResult("cosign", cos.Address, start, c, req, reply)
	ev.Seconds = hsDone.Sub(start).Seconds()
	r.emit(ev)

	r.watchThroughRelay(ctx, "watchtower")
	return nil
}

// watchThroughRelay has the wallet reach the watchtower through the sync
// server and hand it a revocation to watch, reporting the result as step.
func (r *role) watchThroughRelay(ctx context.Context, step string) {
	sync, _ := r.ncfg.Keyring.ByName("syncserver")
	start := time.Now()
	rc := &noisetor.RelayClient{Config: r.ncfg, Server: "syncserver", NetDialer: r.td}
	c, err := rc.Dial(ctx, "watchtower")
	if err != nil {
		r.emit(roleEvent{Event: "result", Step: step, Addr: sync.Address, Seconds: since(start), Err: errorText(err)})
		return
	}
	hsDone := time.Now()
	req := "WATCH channel:5e1f...a9:0 (revocation for commitment #42)"
	reply, err := exchange(c, req)
	c.Close()
	if err != nil {
		r.emit(roleEvent{Event: "result", Step: step, Addr: sync.Address, Err: "request: " + errorText(err)})
		return
	}
	ev := okResult(step, sync.Address, start, c, req, reply)
	ev.Seconds = hsDone.Sub(start).Seconds()
	r.emit(ev)
}

func (r *role) outsider() error {
	if err := r.waitFor("go"); err != nil {
		return err
	}
	sync, _ := r.ncfg.Keyring.ByName("syncserver")
	cos, _ := r.ncfg.Keyring.ByName("cosigner")

	// Without any client-authorization key, Tor cannot even decrypt the
	// sync server's descriptor.
	ctx, cancel := context.WithTimeout(r.e.ctx, 60*time.Second)
	defer cancel()
	start := time.Now()
	d := &noisetor.Dialer{Config: r.ncfg, NetDialer: &noisetor.TorDialer{Tor: r.tor}}
	c, err := d.DialContext(ctx, "tcp", sync.Address)
	if err == nil {
		c.Close()
		r.emit(roleEvent{Event: "result", Step: "no-auth", OK: true, Addr: sync.Address})
		return nil
	}
	r.emit(roleEvent{Event: "result", Step: "no-auth", Addr: sync.Address, Seconds: since(start), Err: describeRefusal(err)})

	// With the wallet's stolen client-authorization key, Tor connects; the
	// co-signer's handshake refuses a static key its keyring does not list.
	td, err := r.torDialer()
	if err != nil {
		return err
	}
	start = time.Now()
	d = &noisetor.Dialer{Config: r.ncfg, NetDialer: td}
	c, err = d.DialContext(ctx, "tcp", cos.Address)
	if err == nil {
		c.Close()
		r.emit(roleEvent{Event: "result", Step: "stolen-auth", OK: true, Addr: cos.Address})
		return nil
	}
	r.emit(roleEvent{Event: "result", Step: "stolen-auth", Addr: cos.Address, Seconds: since(start), Err: describeRefusal(err)})
	return nil
}

// describeRefusal says why a connection was refused.
func describeRefusal(err error) string {
	var tde *noisetor.TorDialError
	if errors.As(err, &tde) && tde.Reply != 0 {
		return fmt.Sprintf("%s (SOCKS reply 0x%02x)", tde.Reason, tde.Reply)
	}
	return tidy(err.Error())
}
