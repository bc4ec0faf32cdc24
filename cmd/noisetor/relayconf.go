package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/noisetor/noisetor"
)

// The configuration file of `noisetor relay`, parsed here, in the command:
// the library has RelayServer and RelayRules, not this file format.

// A RelayConfig is the configuration file of a sync server (`noisetor relay`).
// See ParseRelayConfig for the format.
type RelayConfig struct {
	// Listen is the TCP address to listen on, "host:port". Over Tor, the
	// local address the onion service forwards to.
	Listen string
	// KeyFile is the sync server's private key file (empty when the key is
	// on a token: see NewServer); KeyringFile its keyring, listing every
	// wallet and watchtower. Relative paths in a file read by
	// LoadRelayConfig are relative to the file's directory.
	KeyFile     string
	KeyringFile string
	// Rules is the allow list: which peers may reach which.
	Rules noisetor.RelayRules
	// AcceptTimeout, PingInterval and MaxSessions set the RelayServer fields
	// of the same names; zero means the default.
	AcceptTimeout time.Duration
	PingInterval  time.Duration
	MaxSessions   int
	// MaxSessionsPerPeer, MaxIdlePerPeer and RequestTimeout set the
	// RelayServer fields of the same names.
	MaxSessionsPerPeer int
	MaxIdlePerPeer     int
	RequestTimeout     time.Duration

	// Where each directive was read, for errors that must not quote a value
	// (it could be a secret pasted into the wrong file).
	source               string
	keyLine, keyringLine int
}

// LoadRelayConfig reads a relay configuration file (see ParseRelayConfig).
// It refuses a file that group or others may write: its allow rules are a
// security policy. Relative key and keyring paths are made relative to the
// file's directory.
func LoadRelayConfig(path string) (*RelayConfig, error) {
	// Writing it means choosing whom the sync server relays for: checked as
	// a keyring is (WIRE.md §11.4).
	f, err := noisetor.OpenTrustFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c, err := parseRelayConfig(path, f)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	for _, p := range []*string{&c.KeyFile, &c.KeyringFile} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	return c, nil
}

// ParseRelayConfig reads a relay configuration: UTF-8 text, one directive
// per line, fields separated by spaces or tabs, '#' starting a comment:
//
//	listen 127.0.0.1:7400         # required: TCP address to listen on
//	key sync.key                  # private key file (unless the key is on a token)
//	keyring sync.keyring          # required: keyring file
//	allow wallet-1 watchtower-1   # at least one: <from> may reach <to>
//	allow wallet-* watchtower-*   # '*' and '?' wildcards over peer names
//	accept-timeout 20s            # optional, Go duration syntax
//	ping-interval 30s             # optional
//	max-sessions 1024             # optional
//	max-sessions-per-peer 64      # optional
//	max-idle-per-peer 16          # optional
//	request-timeout 10s           # optional
//
// Every directive but allow appears at most once. Parsing is strict: an
// unknown directive, a missing required one, or a malformed value is an
// error naming the line. Errors never quote a rejected value or an unknown
// directive: it could be a secret pasted into the wrong file. Paths may not
// contain spaces.
func ParseRelayConfig(r io.Reader) (*RelayConfig, error) {
	return parseRelayConfig("", r)
}

func parseRelayConfig(path string, r io.Reader) (*RelayConfig, error) {
	name := path
	if name == "" {
		name = "<input>"
	}
	lineErr := func(n int, format string, args ...any) error {
		return fmt.Errorf("noisetor: relay config %s:%d: %s", name, n, fmt.Sprintf(format, args...))
	}
	c := &RelayConfig{}
	seen := map[string]int{}
	sc := bufio.NewScanner(io.LimitReader(r, 1<<20))
	sc.Buffer(make([]byte, 4096), 4096)
	n := 0
	for sc.Scan() {
		n++
		var fields []string
		for _, f := range strings.FieldsFunc(sc.Text(), func(r rune) bool { return r == ' ' || r == '\t' || r == '\r' }) {
			if strings.HasPrefix(f, "#") {
				break
			}
			fields = append(fields, f)
		}
		if len(fields) == 0 {
			continue
		}
		dir, args := fields[0], fields[1:]
		if dir != "allow" {
			if first, ok := seen[dir]; ok {
				return nil, lineErr(n, "%s given twice (first on line %d)", dir, first)
			}
			seen[dir] = n
		}
		want := 1
		if dir == "allow" {
			want = 2
		}
		if !slices.Contains(relayDirectives, dir) {
			// Not quoted: a line of a pasted key or PIN lands here.
			hint := ""
			if near := relayNearestDirective(dir); near != "" {
				hint = "; did you mean " + near + "?"
			}
			return nil, lineErr(n, "unknown directive (the line's first word, not shown in case it is a secret%s; want one of %s)",
				hint, strings.Join(relayDirectives, ", "))
		}
		if len(args) != want {
			return nil, lineErr(n, "%s takes %d value(s), got %d", dir, want, len(args))
		}
		switch dir {
		case "listen":
			_, port, err := net.SplitHostPort(args[0])
			if p, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || (p == 0 && port != "0") {
				// The value is not quoted: it could be a pasted secret.
				return nil, lineErr(n, "listen: want host:port, such as 127.0.0.1:7400")
			}
			c.Listen = args[0]
		case "key":
			c.KeyFile, c.keyLine = args[0], n
		case "keyring":
			c.KeyringFile, c.keyringLine = args[0], n
		case "allow":
			rule := noisetor.RelayRule{From: args[0], To: args[1]}
			for i, pat := range args {
				if err := noisetor.CheckRelayPattern(pat); err != nil {
					return nil, lineErr(n, "allow: the %s pattern is not valid: %v", [2]string{"first", "second"}[i], err)
				}
			}
			c.Rules = append(c.Rules, rule)
		case "accept-timeout", "ping-interval", "request-timeout":
			d, err := time.ParseDuration(args[0])
			if err != nil || d <= 0 {
				return nil, lineErr(n, "%s: want a positive duration such as 20s", dir)
			}
			switch dir {
			case "accept-timeout":
				c.AcceptTimeout = d
			case "ping-interval":
				c.PingInterval = d
			default:
				c.RequestTimeout = d
			}
		case "max-sessions", "max-sessions-per-peer", "max-idle-per-peer":
			v, err := strconv.Atoi(args[0])
			if err != nil || v <= 0 {
				return nil, lineErr(n, "%s: want a positive integer", dir)
			}
			switch dir {
			case "max-sessions":
				c.MaxSessions = v
			case "max-sessions-per-peer":
				c.MaxSessionsPerPeer = v
			default:
				c.MaxIdlePerPeer = v
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("noisetor: relay config %s:%d: %w", name, n+1, err)
	}
	for _, d := range []string{"listen", "keyring"} {
		if _, ok := seen[d]; !ok {
			return nil, fmt.Errorf("noisetor: relay config %s: missing required directive %q", name, d)
		}
	}
	if len(c.Rules) == 0 {
		return nil, fmt.Errorf("noisetor: relay config %s: no allow rules: every request would be denied", name)
	}
	c.source = name
	return c, nil
}

// relayDirectives are the directives of a relay configuration file.
var relayDirectives = []string{"listen", "key", "keyring", "allow", "accept-timeout", "ping-interval",
	"max-sessions", "max-sessions-per-peer", "max-idle-per-peer", "request-timeout"}

// relayNearestDirective returns the directive within two edits of word, if
// exactly one is: a typo's likely fix. Only for words of four or more
// letters and hyphens, as directives are, so that it says next to nothing
// about a secret (keys and PINs hold digits, or are longer).
func relayNearestDirective(word string) string {
	if len(word) < 4 || strings.ContainsFunc(word, func(r rune) bool { return !('a' <= r && r <= 'z' || r == '-') }) {
		return ""
	}
	found := ""
	for _, d := range relayDirectives {
		if editDistanceAtMost2(word, d) {
			if found != "" {
				return ""
			}
			found = d
		}
	}
	return found
}

// editDistanceAtMost2 reports whether a and b are at most two insertions,
// deletions or substitutions apart.
func editDistanceAtMost2(a, b string) bool {
	if len(a) > len(b)+2 || len(b) > len(a)+2 || len(a) > 64 {
		return false
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)] <= 2
}

// fileErr explains that the file named on line of the configuration could
// not be loaded. A name that exists is a real file name and is quoted by
// err; one that does not may be a secret pasted into the wrong place, so it
// is not.
func (c *RelayConfig) fileErr(what, path string, line int, err error) error {
	if _, serr := os.Lstat(path); serr == nil || line == 0 {
		return err
	}
	return fmt.Errorf("noisetor: relay config %s:%d: the %s it names does not exist (the name is not shown, in case it is a secret): %w",
		c.source, line, what, fs.ErrNotExist)
}

// NewServer loads the keyring (and, if key is nil, the key file) the
// configuration names, checks that every allow rule matches some keyring
// peer, and returns a RelayServer logging to logger (nil: slog.Default()).
// Pass key to use a key held elsewhere, such as a PKCS#11 token; then the
// configuration need not name a key file. Serve the result with
// ListenAndServe("tcp", c.Listen).
func (c *RelayConfig) NewServer(key noisetor.StaticKey, logger *slog.Logger) (*noisetor.RelayServer, error) {
	if key == nil {
		if c.KeyFile == "" {
			return nil, errors.New("noisetor: relay config names no key file, and no other key was given")
		}
		k, err := noisetor.LoadPrivateKey(c.KeyFile)
		if err != nil {
			return nil, c.fileErr("key file", c.KeyFile, c.keyLine, err)
		}
		key = k
	}
	kr, err := noisetor.LoadKeyring(c.KeyringFile)
	if err != nil {
		return nil, c.fileErr("keyring file", c.KeyringFile, c.keyringLine, err)
	}
	if logger == nil {
		logger = slog.Default()
	}
	if warning := relayListenWarning(c.Listen); warning != "" {
		logger.Warn("noisetor: relay config: "+warning, slog.String("config", c.source), slog.String("listen", c.Listen))
	}
	if err := c.Rules.Check(kr); err != nil {
		return nil, err
	}
	return &noisetor.RelayServer{
		Config:             &noisetor.Config{StaticKey: key, Keyring: kr, Logger: logger},
		Allow:              c.Rules.Allow,
		AcceptTimeout:      c.AcceptTimeout,
		PingInterval:       c.PingInterval,
		MaxSessions:        c.MaxSessions,
		MaxSessionsPerPeer: c.MaxSessionsPerPeer,
		MaxIdlePerPeer:     c.MaxIdlePerPeer,
		RequestTimeout:     c.RequestTimeout,
	}, nil
}

// relayListenWarning says why a listen address deserves a warning, if it
// does: one that other hosts can reach. Behind an onion service the
// address should be loopback, or anyone on the network bypasses Tor (and
// its client authorization) to reach the sync server.
func relayListenWarning(listen string) string {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return ""
	}
	if host == "localhost" {
		return ""
	}
	ip, err := netip.ParseAddr(host)
	switch {
	case host == "" || err == nil && ip.IsUnspecified():
		return "listen " + listen + " accepts connections on every network interface: other hosts can reach the sync server; use 127.0.0.1:<port> behind an onion service"
	case err != nil:
		return "listen " + listen + " names a host, which may resolve to an address other hosts can reach; use 127.0.0.1:<port> behind an onion service"
	case !ip.IsLoopback():
		return "listen " + listen + " is not a loopback address: other hosts can reach the sync server; use 127.0.0.1:<port> behind an onion service"
	}
	return ""
}
