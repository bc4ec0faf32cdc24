package noisetor_test

import (
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"

	"github.com/noisetor/noisetor"
)

// Example runs net/http over noisetor on 127.0.0.1: the co-signer serves, the
// wallet calls it, and the handler knows who called.
func Example() {
	// The ceremony: each machine makes a key and hands out its public half.
	cosignerKey, _ := noisetor.GenerateKey(noisetor.X25519, nil)
	walletKey, _ := noisetor.GenerateKey(noisetor.X25519, nil)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

	// The co-signer's keyring lists the wallet, and the other way round.
	cosignerRing, _ := noisetor.NewKeyring(noisetor.Peer{Name: "wallet", PublicKey: walletKey.PublicKey()})
	cosigner := &noisetor.Config{StaticKey: cosignerKey, Keyring: cosignerRing, Logger: quiet}
	l, err := noisetor.Listen("tcp", "127.0.0.1:0", cosigner)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		ConnContext: noisetor.ConnContext,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			peer, _ := noisetor.PeerFromContext(r.Context())
			fmt.Fprintf(w, "hello %s", peer.Name)
		}),
	}
	go srv.Serve(l)
	defer srv.Close()

	walletRing, _ := noisetor.NewKeyring(noisetor.Peer{
		Name: "cosigner", PublicKey: cosignerKey.PublicKey(), Address: l.Addr().String(),
	})
	wallet := &noisetor.Config{StaticKey: walletKey, Keyring: walletRing, Logger: quiet}
	tr := &http.Transport{DialContext: (&noisetor.Dialer{Config: wallet}).DialContext}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("http://" + l.Addr().String() + "/")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(string(body))
	// Output: hello wallet
}
