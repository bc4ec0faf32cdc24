package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"strconv"

	"github.com/noisetor/noisetor"
)

func init() {
	register(onionKeyCmd)
	register(clientAuthKeyCmd)
}

type onionKeyOptions struct {
	out  string
	port int
}

var onionKeyCmd = &command{
	name:  "onion-key",
	args:  "-o FILE [--port PORT]\n       noisetor onion-key FILE",
	short: "make an onion service key and print its .onion address",
	long: `
Onion-key makes the ed25519 key of a Tor v3 onion service, writes it to a new
file with mode 0600 and prints the service's address. The address is fixed by
the key, so it can go in the other machines' keyrings before the service first
runs: with --port, the address is printed as host:port, ready for
'noisetor keygen --addr'. Given an existing key file, onion-key prints its
address.

A key made by tor itself (the hs_ed25519_secret_key file of a
HiddenServiceDir) is accepted too, so an existing service keeps its address.`,
	flags: func(fs *flag.FlagSet) any {
		o := new(onionKeyOptions)
		fs.StringVar(&o.out, "o", "", "write the new key to `file` (mode 0600)")
		fs.IntVar(&o.port, "port", 0, "print the address with this virtual `port`, as host:port")
		return o
	},
	run: func(e *env, _ *flag.FlagSet, opts any, args []string) error {
		o := opts.(*onionKeyOptions)
		if o.port < 0 || o.port > 65535 {
			return usagef("--port %d is not a port", o.port)
		}
		var (
			key *noisetor.OnionKey
			err error
		)
		switch {
		case o.out != "" && len(args) > 0:
			return usagef("give either -o FILE (make a key) or FILE (show its address)")
		case o.out != "":
			if _, err := os.Lstat(o.out); err == nil {
				return fmt.Errorf("%s already exists; refusing to overwrite a key (run 'noisetor onion-key %s' to see its address)", o.out, o.out)
			}
			if key, err = noisetor.GenerateOnionKey(nil); err != nil {
				return err
			}
			if err := noisetor.SaveOnionKey(o.out, key); err != nil {
				return err
			}
			fmt.Fprintf(e.stderr, "noisetor onion-key: wrote the onion service key to %s (mode 0600); keep it secret\n", o.out)
		default:
			if err := wantArgs(args, 1, 1, "-o FILE, or the key file to show"); err != nil {
				return err
			}
			if key, err = noisetor.LoadOnionKey(args[0]); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return fmt.Errorf("%s does not exist (to make a key: noisetor onion-key -o %s)", args[0], args[0])
				}
				return err
			}
		}
		if o.port > 0 {
			fmt.Fprintln(e.stdout, key.Address()+":"+strconv.Itoa(o.port))
		} else {
			fmt.Fprintln(e.stdout, key.Address())
		}
		return nil
	},
}

var clientAuthKeyCmd = &command{
	name:  "client-auth-key",
	args:  "-o FILE\n       noisetor client-auth-key FILE",
	short: "make a Tor client-authorization key and print its public half",
	long: `
Client-auth-key makes this machine's Tor v3 client-authorization key, writes
it to a new file with mode 0600 and prints the public half (52 base32
characters). The operators of the onion services this machine dials add it to
their keyring entry for this machine as auth=<key> (keyring add --auth), so
that only keyring members can even find their services. Given an existing key
file, client-auth-key prints its public half.`,
	flags: func(fs *flag.FlagSet) any {
		return fs.String("o", "", "write the new key to `file` (mode 0600)")
	},
	run: func(e *env, _ *flag.FlagSet, opts any, args []string) error {
		out := *opts.(*string)
		var (
			key *noisetor.ClientAuthKey
			err error
		)
		switch {
		case out != "" && len(args) > 0:
			return usagef("give either -o FILE (make a key) or FILE (show its public key)")
		case out != "":
			if _, err := os.Lstat(out); err == nil {
				return fmt.Errorf("%s already exists; refusing to overwrite a key", out)
			}
			if key, err = noisetor.GenerateClientAuthKey(nil); err != nil {
				return err
			}
			if err := noisetor.SaveClientAuthKey(out, key); err != nil {
				return err
			}
			fmt.Fprintf(e.stderr, "noisetor client-auth-key: wrote the client-auth key to %s (mode 0600); keep it secret\n", out)
		default:
			if err := wantArgs(args, 1, 1, "-o FILE, or the key file to show"); err != nil {
				return err
			}
			if key, err = noisetor.LoadClientAuthKey(args[0]); err != nil {
				return err
			}
		}
		fmt.Fprintln(e.stdout, key.PublicKey())
		return nil
	},
}
