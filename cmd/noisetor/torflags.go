package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"strconv"

	"github.com/noisetor/noisetor"
)

// torOptions selects the tor a command uses: one it launches (--tor-data)
// or one already running (--tor-control).
type torOptions struct {
	dataDir   string
	control   string
	torrcFile string
}

func (o *torOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.dataDir, "tor-data", "", "launch the system tor with data directory `dir` (kept across runs; mode 0700,\nholding tor's Unix sockets: keep its path short)")
	fs.StringVar(&o.control, "tor-control", "", "use the running tor whose control port is `host:port` (cookie authentication)")
	fs.StringVar(&o.torrcFile, "torrc", "", "extra torrc lines for the tor of --tor-data, from `file`")
}

// start returns the tor to use, or nil if none was asked for.
func (o *torOptions) start(ctx context.Context, log *slog.Logger) (*noisetor.Tor, error) {
	switch {
	case o.dataDir != "" && o.control != "":
		return nil, usagef("use either --tor-data or --tor-control, not both")
	case o.control != "":
		if o.torrcFile != "" {
			return nil, usagef("--torrc is for the tor that --tor-data launches")
		}
		return noisetor.AttachTor(ctx, o.control, &noisetor.TorAttachConfig{Logger: log})
	case o.dataDir != "":
		var lines []string
		if o.torrcFile != "" {
			b, err := readLimited(o.torrcFile, 1<<20)
			if err != nil {
				return nil, err
			}
			sc := bufio.NewScanner(bytes.NewReader(b))
			for sc.Scan() {
				if l := bytes.TrimSpace(sc.Bytes()); len(l) > 0 && l[0] != '#' {
					lines = append(lines, string(l))
				}
			}
		}
		return noisetor.StartTor(ctx, &noisetor.TorConfig{DataDir: o.dataDir, Torrc: lines, Logger: log})
	}
	if o.torrcFile != "" {
		return nil, usagef("--torrc needs --tor-data")
	}
	return nil, nil
}

// onionOptions publish a listening command on an onion service.
type onionOptions struct {
	keyFile      string
	port         int
	noClientAuth bool
}

// register adds the onion flags; defPort is the default --onion-port (9000
// for serve, 7400 for relay, as the README's examples use).
func (o *onionOptions) register(fs *flag.FlagSet, defPort int) {
	fs.StringVar(&o.keyFile, "onion-key", "", "publish an onion service with the key in `file` (see onion-key); needs --tor-data or --tor-control")
	fs.IntVar(&o.port, "onion-port", defPort, "the onion service's virtual `port`")
	fs.BoolVar(&o.noClientAuth, "no-client-auth", false, "publish without Tor client authorization (then anyone who learns\nthe address can connect; the handshake still admits only keyring peers)")
}

// listen returns the listener for a serving command: an onion service if
// --onion-key is set, else TCP on addr. The caller wraps it with
// noisetor.NewListener.
func (o *onionOptions) listen(e *env, tor *noisetor.Tor, addr string, kr *noisetor.Keyring) (net.Listener, string, error) {
	if o.keyFile == "" {
		if o.noClientAuth {
			return nil, "", usagef("--no-client-auth is for --onion-key")
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, "", err
		}
		return ln, ln.Addr().String(), nil
	}
	if tor == nil {
		return nil, "", usagef("--onion-key needs a tor: --tor-data DIR or --tor-control HOST:PORT")
	}
	if o.port <= 0 || o.port > 65535 {
		return nil, "", usagef("--onion-port %d is not a port", o.port)
	}
	// A tor launched with --tor-data forwards to a Unix socket in its data
	// directory (mode 0700), which no other local user can reach; an
	// attached tor may run as another user, so it gets a TCP listener on
	// addr, which local users can reach.
	var local net.Listener
	if !tor.Launched() {
		var err error
		if local, err = net.Listen("tcp", addr); err != nil {
			return nil, "", err
		}
	}
	if o.noClientAuth {
		kr = nil // the keyring's auth= keys would turn client authorization on
	}
	fmt.Fprintf(e.stderr, "noisetor: publishing the onion service (this takes a few seconds)...\n")
	ln, err := tor.ListenOnion(e.ctx, &noisetor.OnionConfig{
		KeyFile:      o.keyFile,
		Port:         o.port,
		Keyring:      kr,
		NoClientAuth: o.noClientAuth,
		Listener:     local,
	})
	if err != nil {
		if local != nil {
			local.Close()
		}
		return nil, "", err
	}
	return ln, net.JoinHostPort(ln.OnionAddress(), strconv.Itoa(o.port)), nil
}
