package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/noisetor/noisetor"
)

// pkcs11Options selects a key on a PKCS#11 token. Unset fields come from the
// NOISETOR_PKCS11_* environment (noisetor.PKCS11ConfigFromEnv). The PIN is
// read only from the environment or a file, never from the command line,
// where other users could see it in the process list. A token that needs no
// login (an NSS database without a password, say) takes no PIN.
type pkcs11Options struct {
	enabled bool
	module  string
	token   string
	key     string
	pinFile string
}

func (o *pkcs11Options) register(fs *flag.FlagSet) {
	fs.BoolVar(&o.enabled, "pkcs11", false, "use a key on a PKCS#11 token (HSM, USB dongle) instead of a file")
	fs.StringVar(&o.module, "pkcs11-module", "", "`path` of the PKCS#11 module (default $"+noisetor.EnvPKCS11Module+")")
	fs.StringVar(&o.token, "pkcs11-token", "", "`label` of the token (default $"+noisetor.EnvPKCS11Token+")")
	fs.StringVar(&o.key, "pkcs11-key", "", "`label` of the key on the token (default $"+noisetor.EnvPKCS11Key+")")
	fs.StringVar(&o.pinFile, "pkcs11-pin-file", "", "read the user PIN from `file`, mode 0600\n(default $"+noisetor.EnvPKCS11PINFile+" or the PIN in $"+noisetor.EnvPKCS11PIN+";\nnone for a token that needs no login)")
}

// config returns the token configuration: the environment overridden by the
// flags. A malformed variable is an error even when a flag overrides it:
// the operator should know that the environment is wrong.
func (o *pkcs11Options) config() (*noisetor.PKCS11Config, error) {
	cfg, err := noisetor.PKCS11ConfigFromEnv()
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		cfg = new(noisetor.PKCS11Config)
	}
	if o.module != "" {
		cfg.Module = o.module
	}
	if o.token != "" {
		cfg.TokenLabel, cfg.TokenSerial = o.token, ""
	}
	if o.key != "" {
		cfg.KeyLabel, cfg.KeyID = o.key, nil
	}
	if o.pinFile != "" {
		cfg.PIN, cfg.PINFile = "", o.pinFile
	}
	var missing []string
	if cfg.Module == "" {
		missing = append(missing, "--pkcs11-module (or $"+noisetor.EnvPKCS11Module+")")
	}
	if cfg.TokenLabel == "" && cfg.TokenSerial == "" {
		missing = append(missing, "--pkcs11-token (or $"+noisetor.EnvPKCS11Token+")")
	}
	if cfg.KeyLabel == "" && len(cfg.KeyID) == 0 {
		missing = append(missing, "--pkcs11-key (or $"+noisetor.EnvPKCS11Key+")")
	}
	if len(missing) > 0 {
		return nil, usagef("--pkcs11 needs %s", strings.Join(missing, " and "))
	}
	return cfg, nil
}

// open opens (or, with generate, makes) the token key of cfg. Without a
// PIN it tries the token as one that needs no login; if the token does need
// one, the error says how to give it.
func openPKCS11(cfg *noisetor.PKCS11Config, generate bool) (*noisetor.PKCS11Key, error) {
	open := noisetor.OpenPKCS11Key
	if generate {
		open = noisetor.GeneratePKCS11Key
	}
	k, err := open(cfg)
	if err != nil && cfg.PIN == "" && cfg.PINFile == "" && errors.Is(err, noisetor.ErrPKCS11PIN) {
		return nil, fmt.Errorf("%w; or give it with --pkcs11-pin-file FILE", err)
	}
	return k, err
}

// keyOptions selects this machine's static key: a file or a token.
type keyOptions struct {
	file string
	p11  pkcs11Options
}

func (o *keyOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.file, "k", "", "private key `file` (made by noisetor keygen)")
	o.p11.register(fs)
}

// load opens the static key. Call close when done with it: for a token key
// it closes the sessions.
func (o *keyOptions) load() (key noisetor.StaticKey, close func(), err error) {
	switch {
	case o.file != "" && o.p11.enabled:
		return nil, nil, usagef("use either -k FILE or --pkcs11, not both")
	case o.p11.enabled:
		cfg, err := o.p11.config()
		if err != nil {
			return nil, nil, err
		}
		k, err := openPKCS11(cfg, false)
		if err != nil {
			return nil, nil, err
		}
		return k, func() { k.Close() }, nil
	case o.file != "":
		k, err := noisetor.LoadPrivateKey(o.file)
		if err != nil {
			return nil, nil, err
		}
		return k, func() {}, nil
	}
	return nil, nil, usagef("which key? Use -k FILE or --pkcs11")
}

// previousKeyOptions select the key this machine is rotating away from
// (Config.PreviousStaticKey): a file, or another key on the token of --pkcs11.
type previousKeyOptions struct {
	file, p11Key string
}

func (o *previousKeyOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.file, "previous-key", "", "during a rotation of this machine's key: the old private key `file`;\nhandshakes addressed to it are still answered (-k is the new key)")
	fs.StringVar(&o.p11Key, "previous-pkcs11-key", "", "like --previous-key, for the key with `label` on the token of --pkcs11")
}

// load opens the previous key, if one is given; nil if not.
func (o *previousKeyOptions) load(current *keyOptions) (noisetor.StaticKey, func(), error) {
	switch {
	case o.file != "" && o.p11Key != "":
		return nil, nil, usagef("use either --previous-key or --previous-pkcs11-key, not both")
	case o.file != "":
		k, err := noisetor.LoadPrivateKey(o.file)
		if err != nil {
			return nil, nil, err
		}
		return k, func() {}, nil
	case o.p11Key != "":
		if !current.p11.enabled {
			return nil, nil, usagef("--previous-pkcs11-key needs --pkcs11")
		}
		cfg, err := current.p11.config()
		if err != nil {
			return nil, nil, err
		}
		cfg.KeyLabel, cfg.KeyID = o.p11Key, nil
		k, err := openPKCS11(cfg, false)
		if err != nil {
			return nil, nil, err
		}
		return k, func() { k.Close() }, nil
	}
	return nil, func() {}, nil
}

// readLimited reads at most max bytes of path.
func readLimited(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, max)
	}
	return b, nil
}
