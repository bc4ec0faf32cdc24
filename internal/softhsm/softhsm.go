// Package softhsm creates throw-away SoftHSM2 tokens for tests, the CLI's
// self-checks and the demo. It drives the softhsm2-util command and writes a
// private softhsm2.conf, so it never touches the system token directory.
//
// SoftHSM reads SOFTHSM2_CONF once, when a process first calls C_Initialize on
// the module, and only sees the tokens that exist at that moment. So create the
// store, call Setenv and InitToken for every token you need, and only then open
// the module (or pass Env to a child process).
package softhsm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// ErrNotInstalled is returned when softhsm2-util or the SoftHSM2 module cannot
// be found.
var ErrNotInstalled = errors.New("softhsm: SoftHSM2 is not installed (Debian/Ubuntu: apt-get install softhsm2)")

// ModuleEnv names an environment variable that overrides the module path.
const ModuleEnv = "SOFTHSM2_MODULE"

// moduleCandidates lists where distributions install libsofthsm2.so.
func moduleCandidates() []string {
	c := []string{"/usr/lib/softhsm/libsofthsm2.so"}
	// Debian/Ubuntu multiarch, e.g. /usr/lib/x86_64-linux-gnu/softhsm.
	if m, _ := filepath.Glob("/usr/lib/*-linux-gnu*/softhsm/libsofthsm2.so"); len(m) > 0 {
		c = append(c, m...)
	}
	return append(c,
		"/usr/lib64/pkcs11/libsofthsm2.so", // Fedora, RHEL
		"/usr/lib/pkcs11/libsofthsm2.so",
		"/usr/local/lib/softhsm/libsofthsm2.so", // source builds, FreeBSD
		"/opt/homebrew/lib/softhsm/libsofthsm2.so",
		"/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
	)
}

// Module returns the path of the SoftHSM2 PKCS#11 module: $SOFTHSM2_MODULE if
// set, else the first of the usual install locations that exists.
func Module() (string, error) {
	if p := os.Getenv(ModuleEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%w: %s=%s: %v", ErrNotInstalled, ModuleEnv, p, err)
		}
		return p, nil
	}
	for _, p := range moduleCandidates() {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: libsofthsm2.so not found on %s (set %s)", ErrNotInstalled, runtime.GOOS, ModuleEnv)
}

// Util returns the path of softhsm2-util.
func Util() (string, error) {
	p, err := exec.LookPath("softhsm2-util")
	if err != nil {
		return "", fmt.Errorf("%w: softhsm2-util not in PATH", ErrNotInstalled)
	}
	return p, nil
}

// Available reports whether both softhsm2-util and the module are installed.
// The error matches ErrNotInstalled when they are not.
func Available() error {
	if _, err := Util(); err != nil {
		return err
	}
	_, err := Module()
	return err
}

// A Store is a SoftHSM2 configuration with its own token directory.
type Store struct {
	// Dir holds the configuration file and the token directory.
	Dir string
	// Conf is the path of the softhsm2.conf to put in SOFTHSM2_CONF.
	Conf string
	// Module is the path of the PKCS#11 module.
	Module string
}

// NewStore creates dir (if needed), a token directory inside it and a
// softhsm2.conf that points at it. It does not change the environment.
func NewStore(dir string) (*Store, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	mod, err := Module()
	if err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	st := &Store{Dir: dir, Module: mod}
	if st.Conf, err = st.WriteConf("softhsm2.conf"); err != nil {
		return nil, err
	}
	return st, nil
}

// WriteConf writes a softhsm2.conf for the store's tokens named name in the
// store's directory, with extra lines appended (such as
// "slots.mechanisms = CKM_EC_KEY_PAIR_GEN", which leaves the tokens only
// that mechanism: SoftHSM 2.6.1 ignores a list of denied ones),
// and returns its path. Point SOFTHSM2_CONF at it before the module is next
// initialised.
func (s *Store) WriteConf(name string, extra ...string) (string, error) {
	// The Debian build has only the file backend. Without a syslog (as in
	// containers) log.level does not matter, but ERROR keeps hosts quiet.
	conf := filepath.Join(s.Dir, name)
	text := "# written by noisetor internal/softhsm\n" +
		"directories.tokendir = " + s.TokenDir() + "\n" +
		"objectstore.backend = file\n" +
		"log.level = ERROR\n" +
		"slots.removable = false\n"
	for _, l := range extra {
		text += l + "\n"
	}
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return "", fmt.Errorf("softhsm: %w", err)
	}
	return conf, nil
}

// Env returns the environment entry that points SoftHSM at this store, for a
// child process: append it to os.Environ().
func (s *Store) Env() []string { return []string{"SOFTHSM2_CONF=" + s.Conf} }

// Setenv points this process's SoftHSM at the store. It takes effect at the
// next C_Initialize of the module in this process.
func (s *Store) Setenv() error {
	if err := os.Setenv("SOFTHSM2_CONF", s.Conf); err != nil {
		return fmt.Errorf("softhsm: %w", err)
	}
	return nil
}

// TokenDir returns the directory SoftHSM keeps tokens in. Removing one of its
// subdirectories makes that token vanish from a running process.
func (s *Store) TokenDir() string { return filepath.Join(s.Dir, "tokens") }

// util runs softhsm2-util against this store and returns its combined output.
func (s *Store) util(args ...string) ([]byte, error) {
	p, err := Util()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(p, args...)
	cmd.Env = append(os.Environ(), s.Env()...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		// args may contain PINs; name only the action.
		return out, fmt.Errorf("softhsm: softhsm2-util %s: %w: %s", args[0], err, bytes.TrimSpace(out))
	}
	return out, nil
}

// A Token is an initialised SoftHSM token.
type Token struct {
	Label  string
	Serial string
	PIN    string // user PIN
	SOPIN  string // security officer PIN
}

// InitToken initialises a new token in the first free slot. SoftHSM then moves
// it to a slot with a random-looking ID, so select tokens by label or serial.
func (s *Store) InitToken(label, pin, soPIN string) (*Token, error) {
	if _, err := s.util("--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", soPIN); err != nil {
		return nil, err
	}
	serial, err := s.Serial(label)
	if err != nil {
		return nil, err
	}
	return &Token{Label: label, Serial: serial, PIN: pin, SOPIN: soPIN}, nil
}

// Reinit erases every object on the token and sets its PINs again, as
// `softhsm2-util --init-token --token LABEL` does.
func (s *Store) Reinit(t *Token) error {
	_, err := s.util("--init-token", "--token", t.Label, "--label", t.Label, "--pin", t.PIN, "--so-pin", t.SOPIN)
	return err
}

// DeleteToken removes the token and its directory.
func (s *Store) DeleteToken(t *Token) error {
	_, err := s.util("--delete-token", "--serial", t.Serial)
	return err
}

// Serial returns the serial number of the token labelled label, from
// `softhsm2-util --show-slots`.
func (s *Store) Serial(label string) (string, error) {
	out, err := s.util("--show-slots")
	if err != nil {
		return "", err
	}
	// The output lists, per slot, "Serial number:" before "Label:".
	var serial string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch strings.TrimSpace(k) {
		case "Serial number":
			serial = v
		case "Label":
			if v == label && serial != "" {
				return serial, nil
			}
		}
	}
	return "", fmt.Errorf("softhsm: no token labelled %q in %s", label, s.Conf)
}
