// Package tortest runs a private Tor network on 127.0.0.1 for tests, in the
// spirit of net/http/httptest.
//
// A Network is one directory authority and three relays (the fewest with
// which onion services work), started from the system tor and tor-gencert
// binaries with testing-network timings, so that it is usable about ten
// seconds after Start. Tors under test join it with the lines of
// Network.Torrc, or are started by the fixture itself with Network.StartTor.
// Every socket is bound to 127.0.0.1 and every port is chosen at run time,
// so test binaries of several packages can each run a network at once.
//
// A package's tests usually share one network, started on first use:
//
//	func TestMain(m *testing.M) { tortest.Main(m) }
//
//	func TestOnion(t *testing.T) {
//		n := tortest.Shared(t) // skips when tor is not installed
//		tr := n.NewTor(t, nil) // a client/service tor, stopped at cleanup
//		...
//	}
//
// The settings are for tests only: they make a four-relay network bootstrap
// in seconds and turn off protections (entry guards among them) that a real
// deployment needs.
//
// # The embedded tor
//
// In a test binary built with -tags embedtor (after scripts/build-libtor.sh),
// every tor of the network, the authority, the relays and the tors of
// StartTor, is the tor linked into the test binary, and no tor or
// tor-gencert executable is needed. Each tor is the test binary itself,
// started again with libtor.ChildArg: package libtor then runs tor during
// initialization, before any test code, and exits with it. That is the
// child mode in which noisetor.StartTor runs the embedded tor. tortest then
// makes the authority's keys and certificate itself instead of with
// tor-gencert. The tests need no change; set Options.TorPath (for example to
// "tor") to run a network on a tor executable anyway.
package tortest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Options configures Start. The zero value is the recommended network.
type Options struct {
	// TorPath and GencertPath are the tor and tor-gencert executables.
	// Defaults: "tor" and "tor-gencert", looked up in PATH. In a binary
	// built with -tags embedtor, an empty TorPath means the embedded tor,
	// and an empty GencertPath then means that Start makes the authority's
	// keys and certificate itself.
	TorPath, GencertPath string

	// Relays is the number of relays besides the directory authority.
	// Default 3; onion services need at least 3.
	Relays int

	// Dir is where the network keeps its data directories. Default: a new
	// directory under os.TempDir, removed by Close.
	Dir string

	// ReadyTimeout bounds the wait for a usable consensus. Default 90s.
	ReadyTimeout time.Duration

	// Logf, if set, receives progress messages (t.Logf fits).
	Logf func(format string, args ...any)
}

// A Network is a running private Tor network. Close stops it.
type Network struct {
	// Dir holds a subdirectory per tor, each with a notice.log.
	Dir string

	// StartupTime is how long Start took, key generation included.
	StartupTime time.Duration

	// Embedded reports whether the network's tors, and those of StartTor,
	// are the tor linked into this binary (-tags embedtor) rather than a
	// tor executable.
	Embedded bool

	tor          torExe
	dirAuthority string // the "DirAuthority ..." torrc line
	ownDir       bool
	logf         func(string, ...any)

	mu     sync.Mutex
	nodes  []*torProc // authority first, then relays
	tors   []*Tor     // client/service tors from StartTor
	closed bool
}

// Timing of the authority's votes. Tor's minimums are a 10 s interval and
// 2 s delays. votingLead puts the first consensus that many seconds after
// launch, so that its vote (4 s earlier) comes after the relays have
// uploaded their descriptors; a first consensus made too early lists no
// relays and clients then wait most of an interval for the next one.
const (
	votingInterval = 10
	voteDelay      = 2
	distDelay      = 2
	votingLead     = 9
)

// ErrNoTor is returned by Start when the tor or tor-gencert executable that
// it needs is missing.
var ErrNoTor = errors.New("tortest: tor is not installed (Debian/Ubuntu: apt-get install tor)")

// Start generates keys and configuration, launches the directory authority
// and relays, and returns once the authority serves a consensus that lists
// every relay with its microdescriptor. ctx bounds only the start-up; the
// network runs until Close.
func Start(ctx context.Context, opts *Options) (*Network, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Relays == 0 {
		o.Relays = 3
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 90 * time.Second
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	start := time.Now()
	tor, err := findTor(o.TorPath)
	if err != nil {
		return nil, err
	}
	// gencert "" means writeAuthorityKeys: only for the embedded tor, so
	// that a network on a tor executable is made exactly as before.
	gencert := ""
	if o.GencertPath != "" || !tor.embedded() {
		if o.GencertPath == "" {
			o.GencertPath = "tor-gencert"
		}
		if gencert, err = exec.LookPath(o.GencertPath); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNoTor, err)
		}
	}
	sweepStaleDirs()
	for attempt := 1; ; attempt++ {
		var n *Network
		n, err = startOnce(ctx, &o, tor, gencert)
		if err == nil {
			n.StartupTime = time.Since(start)
			o.Logf("tortest: private Tor network (1 authority + %d relays) ready in %.1fs (%s)", o.Relays, n.StartupTime.Seconds(), n.torName())
			return n, nil
		}
		// Ports are probed free before tor binds them; another process can
		// take one in between. Such a clash is rare, so try again.
		if !errors.Is(err, errPortInUse) || attempt == 3 {
			return nil, err
		}
		o.Logf("tortest: %v; retrying with other ports", err)
	}
}

var errPortInUse = errors.New("tortest: a port was taken by another process")

func startOnce(ctx context.Context, o *Options, tor torExe, gencert string) (_ *Network, err error) {
	n := &Network{Dir: o.Dir, tor: tor, Embedded: tor.embedded(), logf: o.Logf}
	if n.Dir == "" {
		if n.Dir, err = makeOwnedDir("tortest-net-"); err != nil {
			return nil, err
		}
		n.ownDir = true
	} else if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("tortest: %w", err)
	}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()

	// The DirAuthority line names the authority's ports before it starts, so
	// they cannot be "auto": probe free ones. Relays need only an ORPort.
	ports, err := freePorts(2 + o.Relays)
	if err != nil {
		return nil, err
	}
	for i := 0; i <= o.Relays; i++ {
		name := "auth"
		if i > 0 {
			name = fmt.Sprintf("relay%d", i)
		}
		dir := filepath.Join(n.Dir, name)
		os.RemoveAll(dir) // left by an earlier attempt in Options.Dir
		if err := os.MkdirAll(filepath.Join(dir, "keys"), 0o700); err != nil {
			return nil, fmt.Errorf("tortest: %w", err)
		}
		p := &torProc{name: name, dir: dir, tor: tor, orPort: ports[i+1]}
		if i == 0 {
			p.dirPort = ports[0]
		}
		n.nodes = append(n.nodes, p)
	}
	auth := n.nodes[0]

	// The authority's long-term keys: an identity key and certificate (from
	// tor-gencert, or made here), and its relay identity, whose fingerprint
	// the DirAuthority line needs. Both at once: each takes a moment.
	keys := filepath.Join(auth.dir, "keys")
	dirAddr := fmt.Sprintf("127.0.0.1:%d", auth.dirPort)
	var v3ident string
	var certErr error
	certDone := make(chan struct{})
	go func() {
		defer close(certDone)
		if gencert == "" {
			v3ident, certErr = writeAuthorityKeys(keys, dirAddr, time.Now(), 365*24*time.Hour)
			return
		}
		gen := exec.CommandContext(ctx, gencert, "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
			"-a", dirAddr,
			"-i", filepath.Join(keys, "authority_identity_key"),
			"-s", filepath.Join(keys, "authority_signing_key"),
			"-c", filepath.Join(keys, "authority_certificate"))
		gen.Stdin = strings.NewReader("\n")
		if out, err := gen.CombinedOutput(); err != nil {
			certErr = fmt.Errorf("tortest: tor-gencert: %w: %s", err, bytes.TrimSpace(out))
			return
		}
		v3ident, certErr = fieldAfter(filepath.Join(keys, "authority_certificate"), "fingerprint")
	}()
	fp := tor.command(ctx, "--list-fingerprint", "--DataDirectory", auth.dir,
		"--ORPort", "1", "--ignore-missing-torrc", "-f", filepath.Join(auth.dir, "no-torrc"))
	out, fpErr := fp.CombinedOutput()
	<-certDone
	if certErr != nil {
		return nil, certErr
	}
	if fpErr != nil {
		return nil, fmt.Errorf("tortest: tor --list-fingerprint: %w: %s", fpErr, bytes.TrimSpace(out))
	}
	relayFP, err := fieldAfter(filepath.Join(auth.dir, "fingerprint"), "") // "Unnamed <fingerprint>"
	if err != nil {
		return nil, err
	}
	n.dirAuthority = fmt.Sprintf("DirAuthority auth orport=%d no-v2 v3ident=%s 127.0.0.1:%d %s",
		auth.orPort, v3ident, auth.dirPort, relayFP)

	// Vote boundaries fall at midnight UTC + k*interval + offset.
	offset := (time.Now().Unix() + votingLead) % votingInterval
	for i, p := range n.nodes {
		var b strings.Builder
		b.WriteString(n.commonTorrc(p.dir))
		fmt.Fprintf(&b, "Nickname %s\nSocksPort 0\nORPort 127.0.0.1:%d\nAddress 127.0.0.1\nAddressDisableIPv6 1\n", p.name, p.orPort)
		// Relays must not test their own reachability: that needs circuits
		// through a network that does not exist yet.
		b.WriteString("AssumeReachable 1\nExitRelay 0\nExitPolicy reject *:*\n")
		fmt.Fprintf(&b, "ContactInfo %s@tortest.invalid\n", p.name)
		if i > 0 {
			// Only the authority serves directory documents (and is the only
			// HSDir), so a client never asks a relay cache that has not yet
			// fetched the newest consensus and stalls on its 404.
			b.WriteString("DirCache 0\n")
		} else {
			fmt.Fprintf(&b, "DirPort 127.0.0.1:%d\nAuthoritativeDirectory 1\nV3AuthoritativeDirectory 1\n", p.dirPort)
			fmt.Fprintf(&b, "TestingV3AuthInitialVotingInterval %d\nTestingV3AuthInitialVoteDelay %d\nTestingV3AuthInitialDistDelay %d\n",
				votingInterval, voteDelay, distDelay)
			fmt.Fprintf(&b, "V3AuthVotingInterval %d\nV3AuthVoteDelay %d\nV3AuthDistDelay %d\nV3AuthNIntervalsValid 2\n",
				votingInterval, voteDelay, distDelay)
			fmt.Fprintf(&b, "TestingV3AuthVotingStartOffset %d\n", offset)
			// Fresh relays have no history: vote them Guard, Stable and (the
			// authority alone) HSDir anyway.
			b.WriteString("TestingDirAuthVoteGuard *\nTestingDirAuthVoteHSDir auth\nTestingDirAuthVoteHSDirIsStrict 1\n")
			b.WriteString("AuthDirVoteStableGuaranteeMinUptime 0\nAuthDirVoteStableGuaranteeMTBF 0\n")
		}
		p.torrc = b.String()
	}
	for _, p := range n.nodes {
		if err := p.start(); err != nil {
			return nil, err
		}
	}
	o.Logf("tortest: launched %d tors (%s) in %s", len(n.nodes), n.torName(), n.Dir)
	if err := n.waitReady(ctx, o.ReadyTimeout); err != nil {
		return nil, err
	}
	return n, nil
}

// torName says which tor the network runs, for log lines.
func (n *Network) torName() string {
	if n.Embedded {
		return "embedded tor"
	}
	return n.tor.path
}

// commonTorrc is the part of the torrc that every tor of the network has.
// GeoIP is off: parsing Debian's GeoIP files costs each tor over a CPU-second.
func (n *Network) commonTorrc(dataDir string) string {
	return "TestingTorNetwork 1\n" + n.dirAuthority + "\n" +
		"GeoIPFile \"\"\nGeoIPv6File \"\"\n" +
		"DataDirectory " + dataDir + "\n" +
		"Log notice file " + filepath.Join(dataDir, "notice.log") + "\n" +
		"SafeLogging 0\nLogTimeGranularity 1\nShutdownWaitLength 0\n" +
		"__OwningControllerProcess " + strconv.Itoa(os.Getpid()) + "\n"
}

// Torrc returns the torrc lines that a client or onion-service tor needs to
// join the network. It includes "UseEntryGuards 0": in a network this small
// the guard is nearly always also the last hop an onion circuit picks, and
// relays refuse such circuits. Never use these lines outside tests.
func (n *Network) Torrc() string {
	return "TestingTorNetwork 1\n" + n.dirAuthority + "\n" +
		"GeoIPFile \"\"\nGeoIPv6File \"\"\nUseEntryGuards 0\n"
}

// TorrcLines is Torrc split into lines, for APIs that take a list.
func (n *Network) TorrcLines() []string {
	return strings.Split(strings.TrimSuffix(n.Torrc(), "\n"), "\n")
}

// waitReady waits until the authority, the network's only directory cache,
// serves a consensus listing every relay, and has all their
// microdescriptors.
func (n *Network) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	auth := n.nodes[0]
	want := len(n.nodes)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, p := range n.nodes {
			if err := p.exitError(); err != nil {
				return err
			}
		}
		if countPrefix(filepath.Join(auth.dir, "cached-microdesc-consensus"), "r ") >= want &&
			countPrefix(filepath.Join(auth.dir, "cached-microdescs"), "ntor-onion-key ")+
				countPrefix(filepath.Join(auth.dir, "cached-microdescs.new"), "ntor-onion-key ") >= want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("tortest: network not ready after %v: %w\nauthority log:\n%s", timeout, ctx.Err(), auth.logTail())
		case <-tick.C:
		}
	}
}

// Close stops every tor of the network, and the tors started with
// StartTor, and removes the directories that Start created. It is safe to
// call more than once.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	tors := n.tors
	n.mu.Unlock()
	var errs []error
	for _, t := range tors {
		errs = append(errs, t.Close())
	}
	var wg sync.WaitGroup
	for _, p := range n.nodes {
		wg.Add(1)
		go func() { defer wg.Done(); p.stop() }()
	}
	wg.Wait()
	if n.ownDir {
		if err := os.RemoveAll(n.Dir); err != nil {
			errs = append(errs, fmt.Errorf("tortest: %w", err))
		}
	}
	return errors.Join(errs...)
}

// freePorts returns n distinct TCP ports on 127.0.0.1 that were free a
// moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("tortest: finding a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// countPrefix counts the lines of a file that start with prefix.
func countPrefix(path, prefix string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	c := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), prefix) {
			c++
		}
	}
	return c
}

// fieldAfter returns the word after key at the start of a line of the file,
// or the second word of the first line when key is empty.
func fieldAfter(path, key string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("tortest: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && (key == "" || f[0] == key) {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("tortest: no %q line in %s", key, path)
}

// ownerFile marks a directory made by this package with the pid of the
// test binary, so that a later run can remove it if that binary died
// without cleaning up (a panic, or go test -timeout).
const ownerFile = "tortest.owner"

func makeOwnedDir(pattern string) (string, error) {
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		return "", fmt.Errorf("tortest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("tortest: %w", err)
	}
	return dir, nil
}

// sweepStaleDirs removes directories left by test binaries that are gone.
func sweepStaleDirs() {
	matches, _ := filepath.Glob(filepath.Join(os.TempDir(), "tortest-*"))
	for _, dir := range matches {
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == os.Getpid() || processAlive(pid) {
			continue
		}
		os.RemoveAll(dir)
	}
}
