// Command cosigner is the co-signing server of a custody system, as a small
// program to copy: it serves HTTP over noisetor, so only the wallets in its
// keyring get a session, and each handler knows which wallet is calling.
//
// Set it up with the noisetor command (the wallet's operator sends its
// ceremony line and Tor client-authorization key):
//
//	noisetor keygen -o cosigner.key
//	noisetor onion-key -o cosigner.onion-key --port 9000
//	noisetor keyring add cosigner.keyring wallet x25519:... --auth <wallet's client-auth key>
//
// and run it on Tor, where it publishes an onion service that only keyring
// peers with an auth= key can find:
//
//	go run ./examples/cosigner -onion-key cosigner.onion-key -tor-data cosigner-tor
//
// Without -onion-key it listens on plain TCP (-listen), for trying it out on
// one machine. A key in a hardware token works the same way: replace
// LoadPrivateKey with noisetor.OpenPKCS11Key.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/monitor"
)

func main() {
	keyFile := flag.String("key", "cosigner.key", "this server's static key file")
	keyringFile := flag.String("keyring", "cosigner.keyring", "keyring: the wallets that may connect (reloaded on SIGHUP and when the file changes)")
	listen := flag.String("listen", "127.0.0.1:9000", "TCP address to listen on, without -onion-key")
	onionKey := flag.String("onion-key", "", "onion service key file; empty: serve on plain TCP")
	onionPort := flag.Int("onion-port", 9000, "the onion service's port")
	torData := flag.String("tor-data", "cosigner-tor", "tor's data directory, with -onion-key")
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
		// Returns once the descriptor is published. The keyring's auth=
		// keys are the service's client authorizations. Tor forwards to a
		// Unix socket in its data directory (mode 0700): no other local
		// user can connect to the service without going through Tor's
		// client authorization.
		inner, err = tor.ListenOnion(ctx, &noisetor.OnionConfig{
			KeyFile: *onionKey, Port: *onionPort, Keyring: keyring,
			// An application that monitors its service hooks OnStatus.
			OnStatus: func(st noisetor.OnionStatus) {
				log.Printf("cosigner: onion service %s (%s)", st.State, errString(st.Err))
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
	// Operators ask a running server what it sees: `noisetor status
	// --socket PATH` (peers, handshakes, failures, refusals, the onion
	// service) and Prometheus metrics at GET /metrics. The socket is 0600
	// in a directory that must be private (mode 0700).
	if *statusSocket != "" {
		onion, _ := inner.(*noisetor.OnionListener)
		st, err := monitor.New(cfg, onion).ServeUnix(*statusSocket)
		if err != nil {
			log.Fatal(err)
		}
		defer st.Close()
	}

	// Accept yields only connections whose handshake succeeded with a
	// keyring peer; failed attempts are logged and never reach the server.
	ln := noisetor.NewListener(inner, cfg)

	mux := http.NewServeMux()
	mux.HandleFunc("POST /sign", func(w http.ResponseWriter, r *http.Request) {
		wallet, _ := noisetor.PeerFromContext(r.Context())
		psbt, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		// A real co-signer checks the transaction against this wallet's
		// policy here, then signs it with its own signing key.
		log.Printf("signing request from %s: %d bytes", wallet.Name, len(psbt))
		fmt.Fprintf(w, "co-signed a %d-byte PSBT for %s\n", len(psbt), wallet.Name)
	})
	srv := &http.Server{Handler: mux, ConnContext: noisetor.ConnContext}
	context.AfterFunc(ctx, func() { srv.Close() })
	log.Printf("cosigner: serving on %s as %s (fingerprint %s)", ln.Addr(), key.PublicKey(), key.PublicKey().Fingerprint())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}
