// Command watchtower is the watchtower of a custody system, as a small
// program to copy. It does not listen anywhere: it registers with the sync
// server and serves HTTP on the relayed connections the sync server hands it,
// each an end-to-end noisetor session with a wallet from its own keyring.
//
//	noisetor keygen -o watchtower.key
//	noisetor client-auth-key -o watchtower.auth-key   # its public half goes in the sync server's keyring
//	noisetor keyring add watchtower.keyring syncserver x25519:... --addr <onion>:7400
//	noisetor keyring add watchtower.keyring wallet x25519:...
//	go run ./examples/watchtower -tor-data watchtower-tor -client-auth-key watchtower.auth-key
//
// Without -tor-data it dials the sync server over plain TCP.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/monitor"
)

func main() {
	keyFile := flag.String("key", "watchtower.key", "this watchtower's static key file")
	keyringFile := flag.String("keyring", "watchtower.keyring", "keyring: the sync server (with its addr=) and the wallets served (reloaded on SIGHUP and when the file changes)")
	server := flag.String("server", "syncserver", "the sync server's name in the keyring")
	torData := flag.String("tor-data", "", "tor's data directory; empty: dial the sync server over plain TCP")
	clientAuth := flag.String("client-auth-key", "", "this machine's Tor client-authorization key file")
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

	rc := &noisetor.RelayClient{Config: cfg, Server: *server}
	if *torData != "" {
		tor, err := noisetor.StartTor(ctx, &noisetor.TorConfig{DataDir: *torData})
		if err != nil {
			log.Fatal(err)
		}
		defer tor.Close()
		td := &noisetor.TorDialer{Tor: tor}
		if *clientAuth != "" {
			if td.ClientAuth, err = noisetor.LoadClientAuthKey(*clientAuth); err != nil {
				log.Fatal(err)
			}
		}
		rc.NetDialer = td
	}

	// The first registration must succeed within a minute; after that the
	// listener re-registers by itself whenever the link drops.
	regCtx, cancel := context.WithTimeout(ctx, time.Minute)
	ln, err := rc.Listen(regCtx)
	cancel()
	if err != nil {
		log.Fatal(err)
	}

	// Operators ask a running watchtower what it sees: `noisetor status
	// --socket PATH` (its peers, handshakes and failures) and Prometheus
	// metrics at GET /metrics. The socket is 0600 in a directory that must
	// be private (mode 0700).
	if *statusSocket != "" {
		st, err := monitor.New(cfg, nil).ServeUnix(*statusSocket)
		if err != nil {
			log.Fatal(err)
		}
		defer st.Close()
	}

	mux := http.NewServeMux()
	mux.HandleFunc("POST /watch", func(w http.ResponseWriter, r *http.Request) {
		wallet, _ := noisetor.PeerFromContext(r.Context())
		blob, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		// A real watchtower stores the justice data and watches the chain.
		log.Printf("watch request from %s: %d bytes", wallet.Name, len(blob))
		fmt.Fprintf(w, "watching for %s (%d bytes stored)\n", wallet.Name, len(blob))
	})
	srv := &http.Server{Handler: mux, ConnContext: noisetor.ConnContext}
	context.AfterFunc(ctx, func() { srv.Close() })
	log.Printf("watchtower: registered with %s as %s (fingerprint %s)", *server, key.PublicKey(), key.PublicKey().Fingerprint())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
