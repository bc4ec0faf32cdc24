package noisetor

import (
	"context"
	"net"
)

// What a connection tells about its peer: ConnectionState, and how it reaches
// an http.Handler.

// A ConnectionState describes an established connection.
type ConnectionState struct {
	// HandshakeComplete is true once the handshake has succeeded.
	HandshakeComplete bool
	// Initiator is true on the side that dialed.
	Initiator bool
	// Peer is the keyring entry of the other side, whose Name the handshake
	// authenticated.
	Peer Peer
	// PeerKey is the static key the other side proved: Peer.PublicKey, or
	// during a rotation of its key (Peer.NextKey) possibly the next key.
	PeerKey PublicKey
	// Pattern and CipherSuite are those of the handshake; Curve is the DH
	// function of both static keys.
	Pattern     Pattern
	CipherSuite CipherSuite
	Curve       Curve
	// HandshakeHash is the Noise handshake hash h, equal on both sides and
	// unique to this session: use it for channel binding.
	HandshakeHash []byte
}

// PeerOf returns the authenticated keyring peer of c, if c is a *Conn (or
// wraps one through a NetConn method) whose handshake has completed. Use it
// in an http.Server's ConnContext or in a handler with the connection.
func PeerOf(c net.Conn) (Peer, bool) {
	st, ok := ConnectionStateOf(c)
	return st.Peer, ok
}

// ConnectionStateOf is PeerOf for the whole ConnectionState: the peer, the
// key it proved, the parameters and the handshake hash (for channel binding).
func ConnectionStateOf(c net.Conn) (ConnectionState, bool) {
	for c != nil {
		if nc, ok := c.(*Conn); ok {
			if !nc.handshakeDone.Load() || nc.handshakeErr != nil {
				return ConnectionState{}, false
			}
			return nc.ConnectionState(), true
		}
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return ConnectionState{}, false
		}
		c = u.NetConn()
	}
	return ConnectionState{}, false
}

type stateContextKey struct{}

// ConnContext has the signature of http.Server.ConnContext. It records the
// ConnectionState of a noisetor connection in the context, where handlers
// find it with ConnectionStateFromContext or PeerFromContext.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	if st, ok := ConnectionStateOf(c); ok {
		return context.WithValue(ctx, stateContextKey{}, st)
	}
	return ctx
}

// PeerFromContext returns the authenticated peer that ConnContext recorded.
func PeerFromContext(ctx context.Context) (Peer, bool) {
	st, ok := ConnectionStateFromContext(ctx)
	return st.Peer, ok
}

// ConnectionStateFromContext returns the ConnectionState that ConnContext
// recorded. A handler binds its application protocol to the session with
// HandshakeHash.
func ConnectionStateFromContext(ctx context.Context) (ConnectionState, bool) {
	st, ok := ctx.Value(stateContextKey{}).(ConnectionState)
	return st, ok
}
