// Command syncserver is the sync server of a custody system, as a small
// program to copy: wallets reach watchtowers through it, and it relays only
// ciphertext. Each relayed stream carries its own noisetor handshake between
// the wallet and the watchtower, which check each other's keys against their
// own keyrings, so the sync server can neither read nor alter what they say.
//
//	noisetor keygen -o syncserver.key
//	noisetor onion-key -o syncserver.onion-key --port 7400
//	noisetor keyring add syncserver.keyring wallet x25519:... --auth <wallet's client-auth key>
//	noisetor keyring add syncserver.keyring watchtower x25519:... --auth <...>
//	go run ./examples/syncserver -onion-key syncserver.onion-key -tor-data syncserver-tor
//
// The allow list (-allow) says which peers may reach which; everything else
// is refused. `noisetor relay` runs the same server from a configuration file.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/monitor"
)

func main() {
	keyFile := flag.String("key", "syncserver.key", "this server's static key file")
	keyringFile := flag.String("keyring", "syncserver.keyring", "keyring: every wallet and watchtower served (reloaded on SIGHUP and when the file changes)")
	allow := flag.String("allow", "wallet*=watchtower*", "comma-separated FROM=TO rules of who may reach whom ('*' wildcards)")
	listen := flag.String("listen", "127.0.0.1:7400", "TCP address to listen on, without -onion-key")
	onionKey := flag.String("onion-key", "", "onion service key file; empty: serve on plain TCP")
	onionPort := flag.Int("onion-port", 7400, "the onion service's port")
	torData := flag.String("tor-data", "syncserver-tor", "tor's data directory, with -onion-key")
	statusSocket := flag.String("status-socket", "", "answer 'noisetor status' on the Unix socket `path` (in a directory of mode 0700)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	key, err := noisetor.LoadPrivateKey(*keyFile)
	if err != nil {
		log.Fatal(err)
	}
	keyring, err := noisetor.LoadKeyring(*keyringFile)
	if err != nil {
		log.Fatal(err)
	}
	var rules noisetor.RelayRules
	for _, r := range strings.Split(*allow, ",") {
		from, to, ok := strings.Cut(r, "=")
		if !ok {
			log.Fatalf("-allow %q: want FROM=TO", r)
		}
		rules = append(rules, noisetor.RelayRule{From: from, To: to})
	}
	if err := rules.Check(keyring); err != nil {
		log.Fatal(err) // a rule that matches nobody is most likely a typo
	}
	cfg := &noisetor.Config{StaticKey: key, Keyring: keyring}

	// Keep the keyring equal to its file: reload it when the file changes
	// and on SIGHUP. A peer removed from the file loses its connections at
	// once; a file that fails to load is logged and changes nothing.
	kf := &noisetor.KeyringFile{Path: *keyringFile, Keyring: keyring}
	go kf.Watch(ctx)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		for range hup {
			kf.Reload()
		}
	}()

	var inner net.Listener
	if *onionKey != "" {
		// tor listens only on Unix sockets in its data directory: no TCP
		// port for other local users to borrow.
		tor, err := noisetor.StartTor(ctx, &noisetor.TorConfig{DataDir: *torData})
		if err != nil {
			log.Fatal(err)
		}
		defer tor.Close()
		// Tor forwards to a Unix socket in its data directory (mode 0700):
		// no other local user can connect to the service without going
		// through Tor's client authorization.
		inner, err = tor.ListenOnion(ctx, &noisetor.OnionConfig{
			KeyFile: *onionKey, Port: *onionPort, Keyring: keyring,
			// An application that monitors its service hooks OnStatus.
			OnStatus: func(st noisetor.OnionStatus) {
				log.Printf("syncserver: onion service %s (%s)", st.State, errString(st.Err))
			},
		})
		if err != nil {
			log.Fatal(err)
		}
	} else {
		var err error
		if inner, err = net.Listen("tcp", *listen); err != nil {
			log.Fatal(err)
		}
	}

	// Every registration, request and session is logged by name.
	srv := &noisetor.RelayServer{Config: cfg, Allow: rules.Allow}

	// Operators ask a running server what it sees: `noisetor status
	// --socket PATH` (peers, handshakes, failures, refusals, the onion
	// service, who is registered) and Prometheus metrics at GET /metrics.
	// The socket is 0600 in a directory that must be private (mode 0700).
	if *statusSocket != "" {
		onion, _ := inner.(*noisetor.OnionListener)
		st, err := monitor.New(cfg, onion).WithRelay(srv).ServeUnix(*statusSocket)
		if err != nil {
			log.Fatal(err)
		}
		defer st.Close()
	}
	context.AfterFunc(ctx, func() { srv.Close() })
	log.Printf("syncserver: serving on %s as %s (fingerprint %s)", inner.Addr(), key.PublicKey(), key.PublicKey().Fingerprint())
	if err := srv.Serve(noisetor.NewListener(inner, cfg)); ctx.Err() == nil {
		log.Fatal(err)
	}
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}
