// Package noisetor gives the machines of a multi-party Bitcoin custody system
// (co-signing servers, watchtowers, wallet clients, a sync server)
// authenticated, encrypted, forward-secret connections to each other, over
// TCP or Tor onion services.
//
// Every connection is a Noise handshake, Noise_KK_25519_ChaChaPoly_SHA256 by
// default, between static keys exchanged in a key ceremony and listed in each
// machine's Keyring. A static key may live in a hardware module (PKCS11Key)
// that never releases it. Nobody outside the keyring gets a session, and
// nobody without a keyring key, whatever public keys it knows, can make a
// server compute a DH or keep members out (WIRE.md §3, §7).
//
// The API follows crypto/tls. Callers swap net.Dial and net.Listen for Dialer
// and Listen, and keep using net/http or any stream protocol:
//
//	cfg := &noisetor.Config{StaticKey: key, Keyring: ring}
//	l, err := noisetor.Listen("tcp", "127.0.0.1:9000", cfg) // a co-signer
//	...
//	d := &noisetor.Dialer{Config: cfg} // a wallet: the keyring entry with this address is the peer
//	c, err := d.DialContext(ctx, "tcp", "127.0.0.1:9000")
//
// A Conn is a net.Conn; ConnectionState tells who is on the other side and
// gives the handshake hash for channel binding; ConnContext and
// ConnectionStateFromContext carry it into net/http handlers. Errors match the
// Err* values with errors.Is: ErrRefused, for one, when a server closed the
// connection instead of answering our handshake.
//
// Where to start:
//   - keys and keyrings: GenerateKey, LoadPrivateKey, LoadKeyring;
//     KeyringFile keeps a running process's keyring equal to its file (a
//     removed peer loses its connections at once), Peer.NextKey and
//     Config.PreviousStaticKey rotate a key without a flag day;
//   - Tor: StartTor or AttachTor, then Tor.ListenOnion for an onion service
//     with client authorization and TorDialer to reach one;
//   - the sync server: RelayServer carries wallet↔watchtower sessions that it
//     can neither read nor alter; RelayClient dials and listens through it;
//   - hardware keys: OpenPKCS11Key (built with cgo);
//   - monitoring: Config.PeerStates and Config.Refusals, served by package
//     monitor as JSON and Prometheus metrics;
//   - the wire format, for other implementations: WIRE.md, with test vectors.
//
// The noisetor command (cmd/noisetor) runs key ceremonies, tests links and
// runs a sync server; its demo runs the four roles over a private Tor network.
package noisetor
