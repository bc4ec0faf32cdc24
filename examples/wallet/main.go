// Command wallet is a wallet client of a custody system, as a small program
// to copy. It asks the co-signer to co-sign over a direct noisetor connection
// (the onion service named in its keyring), then sends the watchtower its
// justice data through the sync server, end to end. Both are plain net/http
// clients: noisetor only replaces the dialer.
//
//	noisetor keygen -o wallet.key
//	noisetor client-auth-key -o wallet.auth-key    # its public half goes in the servers' keyrings
//	noisetor keyring add wallet.keyring cosigner x25519:... --addr <onion>:9000
//	noisetor keyring add wallet.keyring syncserver x25519:... --addr <onion>:7400
//	noisetor keyring add wallet.keyring watchtower x25519:...
//	go run ./examples/wallet -tor-data wallet-tor -client-auth-key wallet.auth-key
//
// Without -tor-data it dials over plain TCP. It runs once and exits, so it
// reads its keyring once; a long-running client keeps it equal to the file
// with noisetor.KeyringFile, as the cosigner does.
package main

import (
	"context"
	"flag"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"

	"github.com/noisetor/noisetor"
)

func main() {
	keyFile := flag.String("key", "wallet.key", "this wallet's static key file")
	keyringFile := flag.String("keyring", "wallet.keyring", "keyring: cosigner and syncserver (with addr=) and watchtower")
	torData := flag.String("tor-data", "", "tor's data directory; empty: dial over plain TCP")
	clientAuth := flag.String("client-auth-key", "", "this machine's Tor client-authorization key file")
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

	// The dialer picks the peer whose addr= is the dialed address, and the
	// handshake fails unless that peer holds the key the keyring lists.
	dialer := &noisetor.Dialer{Config: cfg}
	relay := &noisetor.RelayClient{Config: cfg, Server: "syncserver"}
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
		dialer.NetDialer, relay.NetDialer = td, td
	}

	// 1. Direct: the co-signer's onion service.
	cosigner, ok := keyring.ByName("cosigner")
	if !ok || cosigner.Address == "" {
		log.Fatal("the keyring has no cosigner with an addr=")
	}
	direct := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	post(ctx, direct, "http://"+cosigner.Address+"/sign", "a PSBT to co-sign")

	// 2. Through the sync server: the host name is the watchtower's keyring
	// name, and the returned connection is authenticated to its key.
	relayed := &http.Client{Transport: &http.Transport{DialContext: relay.DialContext}}
	post(ctx, relayed, "http://watchtower/watch", "justice data for a channel")
}

func post(ctx context.Context, c *http.Client, url, body string) {
	req, err := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(body))
	if err != nil {
		log.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	reply, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("%s: %s %s", url, resp.Status, strings.TrimSpace(string(reply)))
}
