package noisetor

import (
	"context"
	"fmt"
	"net"
	"time"
)

// A ContextDialer dials the underlying connections. *net.Dialer is one; so is
// the Tor SOCKS5 dialer of a *Tor.
type ContextDialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// A Dialer dials noisetor connections. Its DialContext has the signature of
// net.Dialer.DialContext, so it drops into http.Transport.DialContext.
type Dialer struct {
	// Config is the noisetor configuration. Required.
	Config *Config

	// NetDialer dials the underlying connection. Nil means a zero net.Dialer.
	NetDialer ContextDialer

	// Peer, if set, names the keyring peer to authenticate whatever the
	// address. Otherwise the peer is the keyring entry whose Address is the
	// dialed address.
	Peer string

	pattern Pattern // if set, instead of the Config's first (RelayClient)
}

// DialContext dials addr and completes the handshake with the peer before
// returning a *Conn. ctx bounds both.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	cfg := d.Config
	if err := cfg.check(); err != nil {
		return nil, err
	}
	name := d.Peer
	if name == "" {
		p, ok := cfg.Keyring.ByAddress(addr)
		if !ok {
			return nil, fmt.Errorf("%w: no keyring peer has address %q (set Dialer.Peer to name one)", ErrUnknownPeer, addr)
		}
		name = p.Name
	} else if _, ok := cfg.Keyring.ByName(name); !ok {
		return nil, fmt.Errorf("%w: no peer named %q", ErrUnknownPeer, name)
	}
	nd := d.NetDialer
	if nd == nil {
		nd = &net.Dialer{}
	}
	start := time.Now()
	raw, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		err = &contextError{"dialing " + name + " at " + addr, err}
		cfg.logAttempt(attempt{outbound: true, addr: addr, peer: name, pattern: cfg.patterns()[0],
			cipher: cfg.cipherSuites()[0], duration: time.Since(start), err: err})
		return nil, err
	}
	c := Client(raw, cfg, name)
	c.addr = addr
	if d.pattern != 0 {
		c.state.Pattern = d.pattern
	}
	if err := c.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Dial is DialContext with a background context.
func (d *Dialer) Dial(network, addr string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, addr)
}

// Dial connects to addr and completes the handshake with the keyring peer
// whose Address is addr.
func Dial(network, addr string, cfg *Config) (*Conn, error) {
	c, err := (&Dialer{Config: cfg}).Dial(network, addr)
	if err != nil {
		return nil, err
	}
	return c.(*Conn), nil
}
