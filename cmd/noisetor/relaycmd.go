package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"

	"github.com/noisetor/noisetor"
)

func init() { register(relayCmd) }

type relayOptions struct {
	p11   pkcs11Options
	tor   torOptions
	onion onionOptions
	check bool

	status statusOptions // status.go
}

var relayCmd = &command{
	name:  "relay",
	args:  "[--check] [--tor-data DIR --onion-key FILE] CONFIG",
	short: "run a sync server that relays wallets to watchtowers",
	long: `
Relay runs a sync server from the configuration file CONFIG:

    listen 127.0.0.1:7400         # TCP address to listen on
    key sync.key                  # the sync server's private key file
    keyring sync.keyring          # every wallet and watchtower it serves
    allow wallet-* watchtower-*   # who may reach whom ('*', '?' wildcards)

Watchtowers register with it and wallets reach them through it; the two ends
run their own noisetor handshake inside the relayed stream, so the sync server
carries only ciphertext. Every relay decision and connection attempt is logged
on standard error. With --pkcs11 the sync server's key is on a token and the
configuration has no key line. With --onion-key and a tor it also publishes
the listen address as an onion service. With --check it only checks the configuration.
It runs until interrupted.

` + reloadHelp,
	flags: func(fs *flag.FlagSet) any {
		o := new(relayOptions)
		fs.BoolVar(&o.check, "check", false, "check the configuration, keys and keyring, then exit")
		o.p11.register(fs)
		o.tor.register(fs)
		o.onion.register(fs, 7400)
		o.status.register(fs)
		return o
	},
	run: runRelay,
}

func runRelay(e *env, _ *flag.FlagSet, opts any, args []string) error {
	o := opts.(*relayOptions)
	if err := wantArgs(args, 1, 1, "the configuration file"); err != nil {
		return err
	}
	rc, err := LoadRelayConfig(args[0])
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(e.stderr, nil))
	var key noisetor.StaticKey // nil: the config's key file
	if o.p11.enabled {
		if rc.KeyFile != "" {
			return usagef("%s names a key file; with --pkcs11 remove its key line", args[0])
		}
		k, closeKey, err := (&keyOptions{p11: o.p11}).load()
		if err != nil {
			return err
		}
		defer closeKey()
		key = k
	}
	srv, err := rc.NewServer(key, log)
	if err != nil {
		return err
	}
	defer srv.Close()
	if o.check {
		fmt.Fprintf(e.stdout, "%s: ok; %s in the keyring (fingerprint %s), %d allow rules\n",
			args[0], nPeers(srv.Config.Keyring.Len()), srv.Config.Keyring.Fingerprint(), len(rc.Rules))
		return nil
	}
	defer followKeyring(e.ctx, rc.KeyringFile, srv.Config.Keyring, log)()
	tor, err := o.tor.start(e.ctx, log)
	if err != nil {
		return err
	}
	if tor != nil {
		defer tor.Close()
	}
	inner, addr, err := o.onion.listen(e, tor, rc.Listen, srv.Config.Keyring)
	if err != nil {
		return err
	}
	stopStatus, err := o.status.start(log, srv.Config, inner, srv)
	if err != nil {
		inner.Close()
		return err
	}
	defer stopStatus()
	fmt.Fprintf(e.stderr, "noisetor relay: serving on %s as %s (fingerprint %s)\n",
		addr, srv.Config.StaticKey.PublicKey(), srv.Config.StaticKey.PublicKey().Fingerprint())
	stop := context.AfterFunc(e.ctx, func() { srv.Close() })
	defer stop()
	err = srv.Serve(noisetor.NewListener(inner, srv.Config))
	if e.ctx.Err() != nil {
		fmt.Fprintf(e.stderr, "noisetor relay: stopped\n")
		return nil
	}
	if errors.Is(err, noisetor.ErrRelayServerClosed) {
		return nil
	}
	return err
}
