package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/internal/softhsm"
	"github.com/noisetor/noisetor/tortest"
)

func init() {
	register(demoCmd)
	register(demoRoleCmd)
}

type demoOptions struct {
	dir     string
	keep    bool
	verbose bool
	timeout time.Duration
}

var demoCmd = &command{
	name:  "demo",
	args:  "[--keep] [--dir DIR] [-v]",
	short: "run the custody demo on a private Tor network on this machine",
	long: `
Demo shows noisetor at work in a small custody system, all on 127.0.0.1:

 1. the key ceremony: static keys for a co-signing server (inside a SoftHSM
    token), a watchtower, a wallet client and a sync server, onion service
    and Tor client-authorization keys, and each machine's keyring, with the
    fingerprints operators read to each other;
 2. a private Tor network (a directory authority and three relays);
 3. each role as its own process, with its own tor;
 4. the wallet talking to the co-signer over Noise KK, through the
    co-signer's onion service;
 5. the wallet reaching the watchtower through the sync server, end to end:
    both ends see the same handshake hash, so the sync server only carried
    ciphertext;
 6. an outsider refused, first by Tor (no client authorization), then, with
    a stolen client-authorization key, by the co-signer's handshake;
 7. the watchtower's key rotated with no flag day: the wallet's and the sync
    server's keyrings list both keys for an overlap, the watchtower restarts
    answering to both, and once the rotation is finished only the new key
    works;

and then the log of every connection attempt, from every role's log. It
needs tor, tor-gencert and softhsm2 (scripts/install-deps.sh installs them),
takes about 20 seconds, and removes every process and file it made unless
--keep is given. Exit status 0 when every step worked.`,
	flags: func(fs *flag.FlagSet) any {
		o := new(demoOptions)
		fs.StringVar(&o.dir, "dir", "", "work in `dir` (new or empty) instead of a temporary directory")
		fs.BoolVar(&o.keep, "keep", false, "keep the work directory (keys, keyrings, logs) afterwards")
		fs.BoolVar(&o.verbose, "v", false, "also print every role's full log")
		fs.DurationVar(&o.timeout, "timeout", 4*time.Minute, "give up after `duration`")
		return o
	},
	run: runDemo,
}

// The roles of the demo. The outsider is not part of the system: it has a
// key of its own that no keyring lists.
var demoRoles = []string{"cosigner", "syncserver", "watchtower", "wallet", "outsider"}

// demoSteps is how many steps the demo shows.
const demoSteps = 7

const (
	cosignerPort   = 9000
	syncserverPort = 7400
)

// demo is the state of one run of the demo.
type demo struct {
	e       *env
	o       *demoOptions
	dir     string
	start   time.Time
	net     *tortest.Network
	procs   map[string]*roleProc
	events  chan roleEvent
	onions  map[string]string // role -> "<onion>:<port>"
	keys    map[string]noisetor.PublicKey
	cleanup []func()
	outMu   sync.Mutex
	quit    chan struct{} // closed when the roles are being stopped
	stopped bool
}

func runDemo(e *env, _ *flag.FlagSet, opts any, args []string) (err error) {
	o := opts.(*demoOptions)
	if err := wantArgs(args, 0, 0, ""); err != nil {
		return err
	}
	d := &demo{
		e: e, o: o, start: time.Now(),
		procs:  make(map[string]*roleProc),
		events: make(chan roleEvent, 64),
		quit:   make(chan struct{}),
		onions: make(map[string]string),
		keys:   make(map[string]noisetor.PublicKey),
	}
	if err := d.preflight(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(e.ctx, o.timeout)
	defer cancel()
	defer func() {
		d.shutdown()
		switch {
		case err == nil:
		case e.ctx.Err() != nil:
			err = errors.New("interrupted")
		case ctx.Err() == context.DeadlineExceeded:
			err = fmt.Errorf("the demo did not finish within %v: %w", o.timeout, err)
		}
		if err != nil && !o.keep && o.dir == "" && d.dir != "" {
			err = fmt.Errorf("%w\n(run noisetor demo --keep to keep every role's log)", err)
		}
	}()

	d.printf("noisetor demo: a small custody system on a private Tor network, on 127.0.0.1.\n")
	d.printf("Work directory: %s\n", d.dir)

	d.step(1, "Key ceremony")
	if err := d.ceremony(); err != nil {
		return fmt.Errorf("key ceremony: %w", err)
	}

	d.step(2, "Starting a private Tor network on 127.0.0.1 (1 directory authority, 3 relays)")
	if err := d.startNetwork(ctx); err != nil {
		return err
	}

	d.step(3, "Starting each role as its own process, each with its own tor")
	if err := d.startRoles(ctx); err != nil {
		return err
	}

	d.step(4, "The wallet asks the co-signer to co-sign: Noise KK over the co-signer's onion service")
	if err := d.walletScenario(ctx); err != nil {
		return err
	}

	d.step(6, "An outsider tries to get in")
	if err := d.outsiderScenario(ctx); err != nil {
		return err
	}

	d.step(7, "The watchtower rotates its key, with no flag day")
	if err := d.rotationScenario(ctx); err != nil {
		return err
	}

	d.stopRoles()
	if err := d.printConnectionLog(); err != nil {
		return err
	}
	d.printf("\nAll steps worked, in %.1fs.\n", time.Since(d.start).Seconds())
	return nil
}

// printf prints to standard output; the progress ticker prints concurrently.
func (d *demo) printf(format string, args ...any) {
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprintf(d.e.stdout, format, args...)
}

func (d *demo) step(n int, title string) {
	d.printf("\n[%d/%d] %s   (%.1fs)\n", n, demoSteps, title, time.Since(d.start).Seconds())
}

// preflight checks the tools the demo needs and makes the work directory.
func (d *demo) preflight() error {
	var missing []string
	if err := tortest.Available(); err != nil {
		missing = append(missing, "tor and tor-gencert ("+errorText(err)+")")
	}
	if err := softhsm.Available(); err != nil {
		missing = append(missing, "SoftHSM2 ("+errorText(err)+")")
	}
	if len(missing) > 0 {
		return fmt.Errorf("the demo needs %s.\nRun scripts/install-deps.sh (Debian/Ubuntu), or install them yourself", strings.Join(missing, " and "))
	}
	if !noisetor.PKCS11Available() {
		return errors.New("the demo keeps the co-signer's key in SoftHSM, which needs PKCS#11 support, and this noisetor was built without cgo: rebuild it with CGO_ENABLED=1 and a C compiler (Debian/Ubuntu: apt-get install gcc)")
	}
	if _, err := os.Executable(); err != nil {
		return fmt.Errorf("cannot find this program to start the roles: %w", err)
	}
	if d.o.dir == "" {
		dir, err := os.MkdirTemp("", "noisetor-demo-")
		if err != nil {
			return err
		}
		d.dir = dir
		return nil
	}
	dir, err := filepath.Abs(d.o.dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if ents, _ := os.ReadDir(dir); len(ents) > 0 {
		return usagef("--dir %s is not empty", dir)
	}
	d.dir = dir
	return nil
}

func (d *demo) path(role, file string) string { return filepath.Join(d.dir, role, file) }

// cli runs one noisetor command of the ceremony in this process, as an
// operator would run it, and returns its standard output.
func (d *demo) cli(args ...string) (string, error) {
	var out, errb strings.Builder
	if code := runContext(d.e.ctx, args, strings.NewReader(""), &out, &errb); code != exitOK {
		return "", fmt.Errorf("noisetor %s: %s", strings.Join(args, " "), strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// ceremony makes every key and keyring with the same commands an operator
// would run, and shows what the operators compare by phone.

// startNetwork starts the private Tor network, showing progress.
func (d *demo) startNetwork(ctx context.Context) error {
	stop := d.progress("  waiting for the network's consensus")
	n, err := tortest.Start(ctx, &tortest.Options{
		Dir: filepath.Join(d.dir, "net"),
		Logf: func(format string, args ...any) {
			d.printf("  %s\n", strings.TrimPrefix(fmt.Sprintf(format, args...), "tortest: "))
		},
	})
	stop()
	if err != nil {
		return fmt.Errorf("starting the private Tor network: %w", err)
	}
	d.net = n
	d.cleanup = append(d.cleanup, func() { n.Close() })
	torrc := filepath.Join(d.dir, "net", "client.torrc")
	if err := os.WriteFile(torrc, []byte(n.Torrc()), 0o600); err != nil {
		return err
	}
	for _, r := range demoRoles {
		if err := d.editRoleConfig(r, func(rc *roleConfig) { rc.Torrc = n.TorrcLines() }); err != nil {
			return err
		}
	}
	return nil
}

// progress prints what is being waited for every few seconds until stop is
// called.
func (d *demo) progress(what string) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		start := time.Now()
		t := time.NewTicker(3 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				d.printf("%s... %.0fs\n", what, time.Since(start).Seconds())
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}

// A roleProc is a running role process.
type roleProc struct {
	role   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	log    string // its log file (the role's standard error)
	exited chan struct{}
	err    error // after exited
}

// A roleEvent is a line a role writes on its standard output.
type roleEvent struct {
	Role  string `json:"role"`
	Event string `json:"event"` // tor-ready, ready, status, result, fail, exit
	Text  string `json:"text,omitempty"`

	// For results.
	Step          string  `json:"step,omitempty"`
	OK            bool    `json:"ok,omitempty"`
	Peer          string  `json:"peer,omitempty"`
	PeerKey       string  `json:"peer_key,omitempty"` // the fingerprint of the key the peer proved
	Addr          string  `json:"addr,omitempty"`
	Pattern       string  `json:"pattern,omitempty"`
	Cipher        string  `json:"cipher,omitempty"`
	HandshakeHash string  `json:"hh,omitempty"`
	Seconds       float64 `json:"seconds,omitempty"`
	Sent          string  `json:"sent,omitempty"`
	Reply         string  `json:"reply,omitempty"`
	Err           string  `json:"err,omitempty"`
}

func (d *demo) startRole(r string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	// Appended to: a restarted role keeps its first run's records.
	logf, err := os.OpenFile(d.path(r, "log.jsonl"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(exe, "demo-role", r, filepath.Join(d.dir, r))
	cmd.Stderr = logf
	cmd.SysProcAttr = roleSysProcAttr()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the %s process: %w", r, err)
	}
	p := &roleProc{role: r, cmd: cmd, stdin: stdin, log: logf.Name(), exited: make(chan struct{})}
	d.procs[r] = p
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var ev roleEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				ev = roleEvent{Event: "status", Text: sc.Text()}
			}
			ev.Role = r
			d.deliver(ev)
		}
		p.err = cmd.Wait()
		close(p.exited)
		d.deliver(roleEvent{Role: r, Event: "exit", Err: fmt.Sprint(p.err)})
	}()
	return nil
}

// deliver passes an event to the demo, or drops it once the roles are being
// stopped and nobody reads events any more.
func (d *demo) deliver(ev roleEvent) {
	select {
	case d.events <- ev:
	case <-d.quit:
	}
}

// send writes a command line to a role.
func (d *demo) send(r, line string) error {
	if _, err := io.WriteString(d.procs[r].stdin, line+"\n"); err != nil {
		return fmt.Errorf("%s: %w", r, err)
	}
	return nil
}

// startRoles starts every role process and waits until the services are
// published and the watchtower is registered with the sync server.
func (d *demo) startRoles(ctx context.Context) error {
	d.printf("  Servers publish onion services; clients dial through their own tor.\n")
	for _, r := range demoRoles {
		if err := d.startRole(r); err != nil {
			return err
		}
		d.printf("    %-10s  pid %d\n", r, d.procs[r].cmd.Process.Pid)
	}
	stop := d.progress("  waiting for the tors to bootstrap and the onion services to be published")
	defer stop()
	ready := make(map[string]bool)
	var towerStarted bool
	for len(ready) < len(demoRoles) {
		ev, err := d.next(ctx)
		if err != nil {
			return err
		}
		switch ev.Event {
		case "tor-ready":
			d.printf("    %-10s  tor bootstrapped (%.1fs)\n", ev.Role, ev.Seconds)
			if ev.Role == "wallet" || ev.Role == "outsider" {
				ready[ev.Role] = true
			}
		case "ready":
			ready[ev.Role] = true
			d.printf("    %-10s  %s (%.1fs)\n", ev.Role, ev.Text, ev.Seconds)
		default:
			return fmt.Errorf("unexpected event %q from %s", ev.Event, ev.Role)
		}
		// The watchtower registers once the sync server's service is up.
		if !towerStarted && ready["syncserver"] {
			towerStarted = true
			if err := d.send("watchtower", "register"); err != nil {
				return err
			}
		}
	}
	return nil
}

// next returns the next event that is neither a status line nor a failure.
func (d *demo) next(ctx context.Context) (roleEvent, error) {
	for {
		select {
		case <-ctx.Done():
			return roleEvent{}, fmt.Errorf("%w while waiting for %s", ctx.Err(), d.waitingFor())
		case ev := <-d.events:
			switch ev.Event {
			case "status":
				d.printf("    %-10s  %s\n", ev.Role, ev.Text)
				continue
			case "fail":
				return ev, fmt.Errorf("%s failed: %s%s", ev.Role, ev.Text, d.logTail(ev.Role))
			case "exit":
				return ev, fmt.Errorf("the %s process exited unexpectedly (%s)%s", ev.Role, ev.Err, d.logTail(ev.Role))
			}
			return ev, nil
		}
	}
}

func (d *demo) waitingFor() string {
	var alive []string
	for _, r := range demoRoles {
		if p := d.procs[r]; p != nil {
			select {
			case <-p.exited:
			default:
				alive = append(alive, r)
			}
		}
	}
	return "the roles (" + strings.Join(alive, ", ") + ")"
}

// result waits for a role's result for step.
func (d *demo) result(ctx context.Context, role, step string) (roleEvent, error) {
	ev, err := d.next(ctx)
	if err != nil {
		return ev, err
	}
	if ev.Event != "result" || ev.Role != role || ev.Step != step {
		return ev, fmt.Errorf("expected the %s result from %s, got %s %s %s", step, role, ev.Role, ev.Event, ev.Step)
	}
	return ev, nil
}

func (d *demo) walletScenario(ctx context.Context) error {
	if err := d.send("wallet", "go"); err != nil {
		return err
	}
	ev, err := d.result(ctx, "wallet", "cosign")
	if err != nil {
		return err
	}
	if !ev.OK {
		return fmt.Errorf("the wallet could not reach the co-signer: %s", ev.Err)
	}
	d.printf("  wallet -> cosigner at %s\n", ev.Addr)
	d.printf("    handshake done in %.1fs: Noise_%s_25519_%s_SHA256, peer %q, key fingerprint %s\n",
		ev.Seconds, ev.Pattern, ev.Cipher, ev.Peer, d.keys["cosigner"].Fingerprint())
	d.printf("    wallet sent:      %s\n    cosigner replied: %s\n", ev.Sent, ev.Reply)

	d.step(5, "The wallet reaches the watchtower through the sync server, end to end")
	ev, err = d.watched(ctx, "watchtower")
	if err != nil {
		return err
	}
	d.printf("    wallet sent:        %s\n    watchtower replied: %s\n", ev.Sent, ev.Reply)
	theirs := ""
	if i := strings.LastIndex(ev.Reply, "session "); i >= 0 {
		theirs = strings.TrimSpace(ev.Reply[i+len("session "):])
	}
	if theirs == "" || !strings.HasPrefix(ev.HandshakeHash, theirs) {
		return fmt.Errorf("the wallet's handshake hash %s differs from the watchtower's %q: someone is in the middle", ev.HandshakeHash, theirs)
	}
	d.printf("    handshake hash at the wallet:     %s\n", ev.HandshakeHash[:len(theirs)])
	d.printf("    handshake hash at the watchtower: %s\n", theirs)
	d.printf("    Same session at both ends: the sync server relayed ciphertext it can neither read nor alter.\n")
	return nil
}

// watched waits for the wallet's result of reaching the watchtower through
// the sync server (step), and shows it.
func (d *demo) watched(ctx context.Context, step string) (roleEvent, error) {
	ev, err := d.result(ctx, "wallet", step)
	if err != nil {
		return ev, err
	}
	if !ev.OK {
		return ev, fmt.Errorf("the wallet could not reach the watchtower through the sync server: %s", ev.Err)
	}
	d.printf("  wallet -> syncserver at %s -> watchtower (relayed stream)\n", ev.Addr)
	d.printf("    inner handshake done in %.1fs: Noise_%s_25519_%s_SHA256, peer %q, key fingerprint %s\n",
		ev.Seconds, ev.Pattern, ev.Cipher, ev.Peer, ev.PeerKey)
	return ev, nil
}

// rotationScenario rotates the watchtower's key with no flag day, as the
// README's "Rotating a key" does it: a new key, every keyring that lists the
// watchtower given it for an overlap, the watchtower restarted answering to
// both keys, and the rotation finished.
func (d *demo) rotationScenario(ctx context.Context) error {
	oldKey := d.keys["watchtower"]
	_, newKey, err := d.keygen("-o", d.path("watchtower", "watchtower-next.key"))
	if err != nil {
		return err
	}
	d.printf("  The watchtower's operator makes a new key and reads out its fingerprint:\n")
	d.printf("    watchtower  old %s\n                new %s\n", oldKey.Fingerprint(), newKey.Fingerprint())

	// rekey runs keyring rotate with args on each keyring that lists the
	// watchtower, around RING, and has its role reload it.
	rekey := func(args ...string) error {
		for _, r := range []string{"wallet", "syncserver"} {
			cmd := []string{"keyring", "rotate"}
			for _, a := range args {
				if a == "RING" {
					a = d.path(r, r+".keyring")
				}
				cmd = append(cmd, a)
			}
			if _, err := d.cli(cmd...); err != nil {
				return err
			}
			if err := d.send(r, "reload"); err != nil {
				return err
			}
			ev, err := d.result(ctx, r, "reload")
			if err != nil {
				return err
			}
			if !ev.OK {
				return fmt.Errorf("%s could not reload its keyring: %s", r, ev.Err)
			}
			d.printf("    %-10s  keyring reloaded; its fingerprint is now %s\n", r, ev.Text)
		}
		return nil
	}
	d.printf("  The wallet's and the sync server's operators list both keys for an overlap\n  (noisetor keyring rotate ... --until 10m) and reload:\n")
	if err := rekey("RING", "watchtower", newKey.String(), "--until", "10m"); err != nil {
		return err
	}

	d.printf("  The watchtower restarts with the new key, answering to the old one too (--previous-key):\n")
	start := time.Now()
	if err := d.restartRole(ctx, "watchtower", func(rc *roleConfig) {
		rc.PreviousKeyFile, rc.KeyFile = rc.KeyFile, d.path("watchtower", "watchtower-next.key")
	}); err != nil {
		return err
	}
	d.printf("    watchtower  registered again with the sync server %.1fs after the restart began\n", time.Since(start).Seconds())

	if err := d.send("wallet", "watch overlap"); err != nil {
		return err
	}
	ev, err := d.watched(ctx, "overlap")
	if err != nil {
		return err
	}
	if ev.PeerKey != oldKey.Fingerprint() {
		return fmt.Errorf("during the overlap the watchtower proved the key with fingerprint %s, not its old key's %s", ev.PeerKey, oldKey.Fingerprint())
	}
	d.printf("    During the overlap the wallet still addresses the old key, and the watchtower answers with it.\n")

	d.printf("  The overlap is cut short (noisetor keyring rotate --finish) and the keyrings reloaded:\n")
	if err := rekey("--finish", "RING", "watchtower"); err != nil {
		return err
	}
	if err := d.send("wallet", "watch rotated"); err != nil {
		return err
	}
	if ev, err = d.watched(ctx, "rotated"); err != nil {
		return err
	}
	if ev.PeerKey != newKey.Fingerprint() {
		return fmt.Errorf("after the rotation the watchtower proved the key with fingerprint %s, not its new key's %s", ev.PeerKey, newKey.Fingerprint())
	}
	d.printf("    Now only the new key works: the old one is in no keyring. Nobody else changed a key or restarted.\n")
	// Let the sync server see the last relayed session end before the
	// roles are stopped, so that the connection log shows it closed, not
	// cut by the shutdown.
	d.awaitLog("syncserver", 3, func(rec logRecord) bool { return rec.Msg == "noisetor: relay" && rec.Op == "session" })
	return nil
}

// stopRole stops one role's process (SIGTERM) and waits for its exit.
func (d *demo) stopRole(ctx context.Context, r string) error {
	p := d.procs[r]
	p.cmd.Process.Signal(syscall.SIGTERM)
	defer p.stdin.Close()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w while waiting for %s to stop", ctx.Err(), r)
		case ev := <-d.events:
			switch {
			case ev.Role == r && ev.Event == "exit":
				return nil
			case ev.Event == "status":
				d.printf("    %-10s  %s\n", ev.Role, ev.Text)
			default:
				return fmt.Errorf("unexpected event %q from %s while %s stopped%s", ev.Event, ev.Role, r, d.logTail(ev.Role))
			}
		}
	}
}

// restartRole stops a role's process, changes its configuration with edit,
// and starts it again on the same tor data directory; a watchtower
// registers with the sync server again.
func (d *demo) restartRole(ctx context.Context, r string, edit func(*roleConfig)) error {
	if err := d.stopRole(ctx, r); err != nil {
		return err
	}
	if err := d.editRoleConfig(r, edit); err != nil {
		return err
	}
	if err := d.startRole(r); err != nil {
		return err
	}
	for {
		ev, err := d.next(ctx)
		if err != nil {
			return err
		}
		switch {
		case ev.Role == r && ev.Event == "tor-ready" && r == "watchtower":
			if err := d.send(r, "register"); err != nil {
				return err
			}
		case ev.Role == r && ev.Event == "ready":
			return nil
		default:
			return fmt.Errorf("unexpected event %q from %s", ev.Event, ev.Role)
		}
	}
}

func (d *demo) outsiderScenario(ctx context.Context) error {
	if err := d.send("outsider", "go"); err != nil {
		return err
	}
	ev, err := d.result(ctx, "outsider", "no-auth")
	if err != nil {
		return err
	}
	d.printf("  outsider -> syncserver at %s, without a Tor client-authorization key\n", ev.Addr)
	if ev.OK {
		return errors.New("the outsider reached the sync server without client authorization")
	}
	d.printf("    refused by Tor after %.1fs: %s\n", ev.Seconds, ev.Err)
	d.printf("    (only machines whose auth= key is in the service's keyring can even find it)\n")

	ev, err = d.result(ctx, "outsider", "stolen-auth")
	if err != nil {
		return err
	}
	d.printf("  outsider -> cosigner at %s, with the wallet's stolen client-authorization key\n", ev.Addr)
	if ev.OK {
		return errors.New("the outsider completed a handshake with the co-signer")
	}
	d.printf("    Tor let it through, but the handshake failed after %.1fs: %s\n", ev.Seconds, ev.Err)
	// The co-signer's side of the story is in its log.
	rec, found := d.awaitLog("cosigner", 1, func(rec logRecord) bool {
		return rec.Msg == "noisetor: handshake" && rec.Outcome == "failed" ||
			rec.Msg == refusedCallersMsg && rec.Reasons["preamble did not verify"] > 0
	})
	switch {
	case !found:
		return errors.New("the co-signer did not log the outsider's refused handshake")
	case rec.Msg == refusedCallersMsg:
		d.printf("    the co-signer counted it among callers that proved no keyring key: its preamble did not verify\n")
	default:
		d.printf("    the co-signer logged: %s\n", tidy(rec.Reason))
	}
	return nil
}

// awaitLog waits up to 5 seconds for role's log to hold n records that
// match, and returns the nth.
func (d *demo) awaitLog(role string, n int, match func(logRecord) bool) (logRecord, bool) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		recs, _ := readRoleLog(d.path(role, "log.jsonl"))
		seen := 0
		for _, rec := range recs {
			if match(rec) {
				if seen++; seen == n {
					return rec, true
				}
			}
		}
	}
	return logRecord{}, false
}

// stopRoles asks every role to stop (SIGTERM) and waits for them, killing
// any that do not stop in time.
func (d *demo) stopRoles() {
	if d.stopped {
		return
	}
	d.stopped = true
	close(d.quit)
	for _, p := range d.procs {
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	timeout := time.After(10 * time.Second)
	for _, p := range d.procs {
		select {
		case <-p.exited:
		case <-timeout:
		}
	}
	for _, p := range d.procs {
		select {
		case <-p.exited:
		default:
			killRole(p.cmd)
			<-p.exited
		}
		p.stdin.Close()
	}
}

// shutdown stops everything the demo started and removes its files.
func (d *demo) shutdown() {
	d.stopRoles()
	for i := len(d.cleanup) - 1; i >= 0; i-- {
		d.cleanup[i]()
	}
	if d.dir == "" {
		return
	}
	if d.o.keep || d.o.dir != "" {
		d.printf("Stopped every process; kept the keys, keyrings and logs in %s\n", d.dir)
		return
	}
	os.RemoveAll(d.dir)
	d.printf("Stopped every process and removed %s\n", d.dir)
}

// logTail returns the last lines of a role's log, for an error message.
func (d *demo) logTail(role string) string {
	b, err := os.ReadFile(d.path(role, "log.jsonl"))
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return "\nlast lines of the " + role + " log:\n  " + strings.Join(lines, "\n  ")
}
