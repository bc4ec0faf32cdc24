package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/noisetor/noisetor"
)

func init() {
	register(keygenCmd)
	register(pubkeyCmd)
	register(fingerprintCmd)
	register(keyringCmd)
}

type keygenOptions struct {
	out, name, curve, addr string
	p11                    pkcs11Options
}

var keygenCmd = &command{
	name:  "keygen",
	args:  "-o FILE [--name NAME] [--curve x25519|p256] [--addr HOST:PORT]\n       noisetor keygen --pkcs11 [--pkcs11-key LABEL] [--name NAME] [--curve x25519|p256]",
	short: "make this machine's static key, in a file or on a PKCS#11 token",
	long: `
Keygen makes a new static key and prints this machine's ceremony line,
"<name> <public-key>", on standard output. Hand that line to the operator of
every machine that must talk to this one; they add it with 'noisetor keyring
add'. The fingerprint printed on standard error is what you read to each other
on the phone to confirm the key arrived intact.

With -o the private key goes to a new file with mode 0600; keygen never
overwrites an existing file. With --pkcs11 the key is generated inside the
token and never leaves it; the token, key label, PIN and curve come from the
flags or from $NOISETOR_PKCS11_MODULE, $NOISETOR_PKCS11_TOKEN,
$NOISETOR_PKCS11_KEY, $NOISETOR_PKCS11_PIN_FILE (or $NOISETOR_PKCS11_PIN) and
$NOISETOR_PKCS11_CURVE, flags first. A token that needs no login takes no PIN.
NSS databases need $NOISETOR_PKCS11_INIT_PARAMS (see the README).

The name defaults to the key file's name without its extension, or to the
token key's label. Use p256 only for tokens without X25519 (YubiHSM 2,
Nitrokey HSM 2); both ends of a link must use the same curve.`,
	flags: func(fs *flag.FlagSet) any {
		o := new(keygenOptions)
		fs.StringVar(&o.out, "o", "", "write the private key to `file` (created with mode 0600)")
		fs.StringVar(&o.name, "name", "", "this machine's `name` in the other machines' keyrings")
		fs.StringVar(&o.curve, "curve", "x25519", "key `curve`: x25519 or p256")
		fs.StringVar(&o.addr, "addr", "", "add addr=`host:port` (where this machine listens) to the ceremony line")
		o.p11.register(fs)
		return o
	},
	run: runKeygen,
}

func parseCurveFlag(s string) (noisetor.Curve, error) {
	switch strings.ToLower(s) {
	case "x25519", "25519":
		return noisetor.X25519, nil
	case "p256", "p-256":
		return noisetor.P256, nil
	}
	return 0, usagef("unknown curve %s (want x25519 or p256)", echoArg(s))
}

func runKeygen(e *env, fs *flag.FlagSet, opts any, args []string) error {
	o := opts.(*keygenOptions)
	if err := wantArgs(args, 0, 0, ""); err != nil {
		return err
	}
	c, err := parseCurveFlag(o.curve)
	if err != nil {
		return err
	}
	var (
		pub      noisetor.PublicKey
		name     = o.name
		where    string
		finalize = func() error { return nil }
	)
	switch {
	case o.p11.enabled && o.out != "":
		return usagef("-o is for a key file; a --pkcs11 key stays on the token")
	case o.p11.enabled:
		cfg, err := o.p11.config()
		if err != nil {
			return err
		}
		// $NOISETOR_PKCS11_CURVE applies unless --curve is given: the
		// flag's default must not override it.
		if flagSet(fs, "curve") || cfg.Curve == 0 {
			cfg.Curve = c
		}
		if name == "" {
			name = cfg.KeyLabel
		}
		// Check the name before the key is made, so that a bad name does
		// not leave an orphan key on the token.
		if err := checkPeerLine(name, o.addr); err != nil {
			return err
		}
		key, err := openPKCS11(cfg, true)
		if err != nil {
			return err
		}
		pub = key.PublicKey()
		where = fmt.Sprintf("made the key %q on token %q; its private half never leaves the token", key.Label(), cfg.TokenLabel+cfg.TokenSerial)
		key.Close()
	case o.out != "":
		if name == "" {
			name = strings.TrimSuffix(filepath.Base(o.out), filepath.Ext(o.out))
		}
		if err := checkPeerLine(name, o.addr); err != nil {
			if o.name == "" {
				return usagef("cannot use %q, from the file name, as the peer name; give one with --name", name)
			}
			return err
		}
		if _, err := os.Lstat(o.out); err == nil {
			return fmt.Errorf("%s already exists; refusing to overwrite a key", o.out)
		}
		key, err := noisetor.GenerateKey(c, nil)
		if err != nil {
			return err
		}
		pub = key.PublicKey()
		finalize = func() error { return noisetor.SavePrivateKey(o.out, key) }
		where = fmt.Sprintf("wrote the private key to %s (mode 0600); keep it secret", o.out)
	default:
		return usagef("where should the private key go? Use -o FILE, or --pkcs11 for a hardware token")
	}
	if err := finalize(); err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, ceremonyLine(name, pub, o.addr))
	fmt.Fprintf(e.stderr, "noisetor keygen: %s\n", where)
	fmt.Fprintf(e.stderr, "noisetor keygen: fingerprint of %s, to read aloud: %s\n", name, pub.Fingerprint())
	return nil
}

// flagSet reports whether the flag name was given on the command line.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// ceremonyLine is a peer's keyring line: what one operator hands the others.
func ceremonyLine(name string, pub noisetor.PublicKey, addr string) string {
	line := name + " " + pub.String()
	if addr != "" {
		line += " addr=" + addr
	}
	return line
}

// checkPeerLine checks that name and addr would be accepted in a keyring.
func checkPeerLine(name, addr string) error {
	if name == "" {
		return usagef("missing --name")
	}
	probe, err := noisetor.GenerateKey(noisetor.X25519, nil)
	if err != nil {
		return err
	}
	if _, err := noisetor.NewKeyring(noisetor.Peer{Name: name, PublicKey: probe.PublicKey(), Address: addr}); err != nil {
		return usagef("%s", errorText(err))
	}
	return nil
}

type pubkeyOptions struct {
	key  keyOptions
	name string
}

var pubkeyCmd = &command{
	name:  "pubkey",
	args:  "[--name NAME] KEYFILE\n       noisetor pubkey [--name NAME] --pkcs11 [--pkcs11-key LABEL]",
	short: "print the public key of a private key file or a token key",
	long: `
Pubkey prints the public key of this machine's static key. With --name it
prints the whole ceremony line, "<name> <public-key>", ready for the other
machines' keyrings.`,
	flags: func(fs *flag.FlagSet) any {
		o := new(pubkeyOptions)
		o.key.p11.register(fs)
		fs.StringVar(&o.name, "name", "", "print the ceremony line for `name`")
		return o
	},
	run: func(e *env, _ *flag.FlagSet, opts any, args []string) error {
		o := opts.(*pubkeyOptions)
		if o.key.p11.enabled {
			if err := wantArgs(args, 0, 0, ""); err != nil {
				return err
			}
		} else {
			if err := wantArgs(args, 1, 1, "the private key file"); err != nil {
				return err
			}
			o.key.file = args[0]
		}
		key, closeKey, err := o.key.load()
		if err != nil {
			return err
		}
		defer closeKey()
		if o.name != "" {
			if err := checkPeerLine(o.name, ""); err != nil {
				return err
			}
			fmt.Fprintln(e.stdout, ceremonyLine(o.name, key.PublicKey(), ""))
		} else {
			fmt.Fprintln(e.stdout, key.PublicKey())
		}
		return nil
	},
}

var fingerprintCmd = &command{
	name:  "fingerprint",
	args:  "PUBLIC-KEY | KEYFILE | KEYRING-FILE | --pkcs11 [--pkcs11-key LABEL]",
	short: "print the fingerprint of a key or of a whole keyring, to read aloud",
	long: `
Fingerprint prints six groups of five digits for operators to read to each
other on the phone. Given a public key ("x25519:...") or a private key file, it
prints the key's fingerprint; given a keyring file, the fingerprint of the
whole keyring, which two machines share exactly when they list the same peers
with the same keys, addresses and client-auth keys.

A private key file is read only to compute its public key. With --pkcs11 it
prints the fingerprint of the key on the token (see pubkey).`,
	flags: func(fs *flag.FlagSet) any {
		o := new(pkcs11Options)
		o.register(fs)
		return o
	},
	run: func(e *env, _ *flag.FlagSet, opts any, args []string) error {
		if p11 := opts.(*pkcs11Options); p11.enabled {
			if err := wantArgs(args, 0, 0, ""); err != nil {
				return err
			}
			key, closeKey, err := (&keyOptions{p11: *p11}).load()
			if err != nil {
				return err
			}
			defer closeKey()
			fmt.Fprintln(e.stdout, key.PublicKey().Fingerprint())
			fmt.Fprintf(e.stderr, "noisetor fingerprint: fingerprint of the public key of the token key\n")
			return nil
		}
		if err := wantArgs(args, 1, 1, "a public key, key file or keyring file"); err != nil {
			return err
		}
		fp, what, err := fingerprintOf(args[0])
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, fp)
		fmt.Fprintf(e.stderr, "noisetor fingerprint: %s\n", what)
		return nil
	},
}

func fingerprintOf(arg string) (fp, what string, err error) {
	// A secret pasted where a public key or file name belongs: say so, and
	// never echo it (the file-not-found error below would).
	if upper := strings.ToUpper(arg); strings.Contains(upper, "NOISETOR-PRIVATE-KEY-") ||
		strings.Contains(upper, "NOISETOR-ONION-KEY-") || strings.Contains(upper, "NOISETOR-TOR-CLIENT-AUTH-") {
		return "", "", errors.New("the argument is a noisetor secret key, not a public key or a file name; it is not shown. " +
			"Never paste a private key: it is now in your shell history, so treat it as exposed")
	}
	if strings.HasPrefix(arg, "x25519:") || strings.HasPrefix(arg, "p256:") {
		pub, err := noisetor.ParsePublicKey(arg)
		if err != nil {
			return "", "", err
		}
		return pub.Fingerprint(), "fingerprint of the public key", nil
	}
	text, err := readLimited(arg, 1<<20)
	var pe *fs.PathError
	if errors.As(err, &pe) {
		// The argument is not quoted: it is not a file that can be read
		// nor a public key, and may be a secret.
		return "", "", fmt.Errorf("cannot read the argument as a file (%v), and it is not a public key (those look like x25519:...)", pe.Err)
	}
	if err != nil {
		return "", "", err
	}
	trimmed := bytes.TrimSpace(text)
	if bytes.HasPrefix(bytes.ToUpper(trimmed), []byte("NOISETOR-PRIVATE-KEY-")) {
		k, err := noisetor.LoadPrivateKey(arg)
		if err != nil {
			return "", "", err
		}
		return k.PublicKey().Fingerprint(), "fingerprint of the public key of " + arg, nil
	}
	if pub, err := noisetor.ParsePublicKey(string(trimmed)); err == nil {
		return pub.Fingerprint(), "fingerprint of the public key in " + arg, nil
	}
	kr, err := noisetor.LoadKeyring(arg)
	if err != nil {
		return "", "", err
	}
	return kr.Fingerprint(), fmt.Sprintf("fingerprint of keyring %s (%s)", arg, nPeers(kr.Len())), nil
}

var keyringCmd = &command{
	name:  "keyring",
	args:  "add|remove|rotate|list|check|diff KEYRING-FILE ...",
	short: "add, remove, rotate, list, check and compare the peers of keyring files",
	long: `
A keyring lists the peers a machine may talk to, one per line:

    <name> <public-key> [addr=<host:port>] [auth=<tor-client-auth-public-key>]
           [next=<public-key> until=<time>]

  noisetor keyring add FILE NAME PUBLIC-KEY [--addr HOST:PORT] [--auth KEY]
      Add a peer, creating FILE if needed. The arguments may also be a
      ceremony line as printed by keygen (addr=... and auth=... included).
  noisetor keyring add FILE -
      Add every ceremony line read from standard input.
  noisetor keyring remove FILE NAME
      Remove the peer NAME.
  noisetor keyring rotate FILE NAME NEW-PUBLIC-KEY --until TIME
      Start a rotation of NAME's key: until TIME (RFC 3339, such as
      2026-12-08T00:00:00Z, or a duration from now, such as 168h) both keys
      are accepted, and NAME is dialed with its old key; from TIME on only
      the new one. NAME answers to both meanwhile (serve --previous-key).
  noisetor keyring rotate --finish FILE NAME
      End NAME's rotation: the new key becomes its only key, and sessions
      still using the old key end.
  noisetor keyring list FILE
      Print the peers with their fingerprints, and the keyring's fingerprint.
  noisetor keyring check FILE
      Parse FILE strictly; report the first bad line and exit 1 if any.
  noisetor keyring diff OLD NEW
      Print the peers added, removed and changed from OLD to NEW (either
      may be -, standard input) with their key fingerprints (old and new
      for a changed key) and other changed fields, then both keyrings'
      fingerprints, to read to each other on the phone before installing
      NEW. Exit status as diff(1): 0 if the keyrings list the same peers,
      1 if they differ, 2 if a file cannot be read or parsed.

Add, remove and rotate rewrite the file in canonical form (comments are not kept) and
print the keyring's new fingerprint on standard error.`,
	flags: func(fs *flag.FlagSet) any {
		o := new(keyringAddOptions)
		fs.StringVar(&o.addr, "addr", "", "add: `host:port` where the peer listens (an onion address, for Tor)")
		fs.StringVar(&o.auth, "auth", "", "add: the peer's Tor client-auth public `key` (52 base32 characters)")
		fs.StringVar(&o.until, "until", "", "rotate: the end of the overlap, an RFC 3339 `time` or a duration from now")
		fs.BoolVar(&o.finish, "finish", false, "rotate: end the rotation, keeping only the new key")
		return o
	},
	run: runKeyring,
}

type keyringAddOptions struct {
	addr, auth, until string
	finish            bool
}

func runKeyring(e *env, _ *flag.FlagSet, opts any, args []string) error {
	o := opts.(*keyringAddOptions)
	if len(args) == 0 {
		return usagef("missing subcommand: add, remove, rotate, list, check or diff")
	}
	sub, args := args[0], args[1:]
	if sub != "add" && (o.addr != "" || o.auth != "") {
		return usagef("--addr and --auth are for 'keyring add'")
	}
	if sub != "rotate" && (o.until != "" || o.finish) {
		return usagef("--until and --finish are for 'keyring rotate'")
	}
	switch sub {
	case "add":
		return keyringAdd(e, o, args)
	case "rotate":
		return keyringRotate(e, o, args)
	case "remove", "rm":
		if err := wantArgs(args, 2, 2, "the keyring file and the peer's name"); err != nil {
			return err
		}
		return keyringRemove(e, args[0], args[1])
	case "list", "ls":
		if err := wantArgs(args, 1, 1, "the keyring file"); err != nil {
			return err
		}
		return keyringList(e, args[0])
	case "check":
		if err := wantArgs(args, 1, 1, "the keyring file"); err != nil {
			return err
		}
		kr, err := noisetor.LoadKeyring(args[0])
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "%s: ok, %s, fingerprint %s\n", args[0], nPeers(kr.Len()), kr.Fingerprint())
		return nil
	case "diff":
		if err := wantArgs(args, 2, 2, "the old keyring file and the new keyring file"); err != nil {
			return err
		}
		return keyringDiff(e, args[0], args[1])
	}
	return usagef("unknown keyring subcommand %s (want add, remove, rotate, list, check or diff)", echoArg(sub))
}

// loadOrNewKeyring loads path, or returns an empty keyring if it does not
// exist yet.
func loadOrNewKeyring(path string) (*noisetor.Keyring, error) {
	kr, err := noisetor.LoadKeyring(path)
	if errors.Is(err, fs.ErrNotExist) {
		return new(noisetor.Keyring), nil
	}
	return kr, err
}

func keyringAdd(e *env, o *keyringAddOptions, args []string) error {
	if len(args) == 2 && args[1] == "-" {
		if o.addr != "" || o.auth != "" {
			return usagef("--addr and --auth cannot be used with lines from standard input")
		}
		added, err := noisetor.ParseKeyring(e.stdin)
		if err != nil {
			return fmt.Errorf("standard input: %w", err)
		}
		return keyringAddPeers(e, args[0], added.Peers())
	}
	if err := wantArgs(args, 3, 5, "the keyring file, the peer's name and its public key"); err != nil {
		return err
	}
	// Accept a pasted ceremony line: trailing addr=... and auth=... fields.
	line := strings.Join(args[1:3], " ")
	for _, f := range args[3:] {
		if !strings.HasPrefix(f, "addr=") && !strings.HasPrefix(f, "auth=") {
			return usagef("unexpected argument %s (want addr=HOST:PORT or auth=KEY)", echoArg(f))
		}
		line += " " + f
	}
	if o.addr != "" {
		line += " addr=" + o.addr
	}
	if o.auth != "" {
		line += " auth=" + o.auth
	}
	kr, err := noisetor.ParseKeyring(strings.NewReader(line + "\n"))
	if err != nil {
		var ke *noisetor.KeyringError
		if errors.As(err, &ke) {
			// The name is shown only if it is valid: it may be a secret
			// pasted into the wrong argument.
			switch named := fmt.Sprintf("peer %q", args[1]); {
			case checkPeerLine(args[1], "") != nil:
				return fmt.Errorf("the peer line: %w", ke.Err)
			case strings.HasPrefix(ke.Err.Error(), named):
				return ke.Err
			default:
				return fmt.Errorf("%s: %w", named, ke.Err)
			}
		}
		return err
	}
	return keyringAddPeers(e, args[0], kr.Peers())
}

func keyringAddPeers(e *env, path string, peers []noisetor.Peer) error {
	if len(peers) == 0 {
		return fmt.Errorf("no peers to add")
	}
	kr, err := loadOrNewKeyring(path)
	if err != nil {
		return err
	}
	for _, p := range peers {
		if err := kr.Add(p); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	if err := kr.Save(path); err != nil {
		return err
	}
	for _, p := range peers {
		fmt.Fprintf(e.stderr, "noisetor keyring: added %s (key fingerprint %s) to %s\n", p.Name, p.PublicKey.Fingerprint(), path)
	}
	fmt.Fprintf(e.stderr, "noisetor keyring: %s now has %s, fingerprint %s\n", path, nPeers(kr.Len()), kr.Fingerprint())
	return nil
}

func keyringRemove(e *env, path, name string) error {
	kr, err := noisetor.LoadKeyring(path)
	if err != nil {
		return err
	}
	if _, ok := kr.ByName(name); !ok {
		return fmt.Errorf("%s has no peer named %s", path, echoArg(name))
	}
	var keep []noisetor.Peer
	for _, p := range kr.Peers() {
		if p.Name != name {
			keep = append(keep, p)
		}
	}
	nkr, err := noisetor.NewKeyring(keep...)
	if err != nil {
		return err
	}
	if err := nkr.Save(path); err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "noisetor keyring: removed %s from %s\n", name, path)
	fmt.Fprintf(e.stderr, "noisetor keyring: %s now has %s, fingerprint %s\n", path, nPeers(nkr.Len()), nkr.Fingerprint())
	return nil
}

func keyringList(e *env, path string) error {
	kr, err := noisetor.LoadKeyring(path)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tKEY FINGERPRINT\tADDRESS\tCLIENT AUTH\tPUBLIC KEY")
	for _, p := range kr.Peers() {
		addr, auth := p.Address, "-"
		if addr == "" {
			addr = "-"
		}
		if p.ClientAuth != "" {
			auth = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.Name, p.PublicKey.Fingerprint(), addr, auth, p.PublicKey)
		if !p.NextKey.IsZero() {
			fmt.Fprintf(tw, "  next key, until %s\t%s\t\t\t%s\n", p.OverlapUntil.Format(time.RFC3339), p.NextKey.Fingerprint(), p.NextKey)
		}
	}
	tw.Flush()
	fmt.Fprintf(e.stdout, "\n%s; keyring fingerprint: %s\n", nPeers(kr.Len()), kr.Fingerprint())
	return nil
}

// nPeers returns "1 peer" or "n peers".
func nPeers(n int) string {
	if n == 1 {
		return "1 peer"
	}
	return fmt.Sprintf("%d peers", n)
}
