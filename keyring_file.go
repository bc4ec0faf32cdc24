package noisetor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"sync"
	"time"
)

const (
	// defaultKeyringPollInterval is KeyringFile.Interval's default.
	defaultKeyringPollInterval = 500 * time.Millisecond
	// defaultKeyringSettle is KeyringFile.Settle's default.
	defaultKeyringSettle = 100 * time.Millisecond
)

// A KeyringFile keeps a Keyring equal to a keyring file while a program
// runs: Reload reads the file again on demand (a program calls it on
// SIGHUP), and Watch does whenever the file changes. Each reload reads the
// file with the checks and errors of LoadKeyring and, if that succeeded,
// Updates Keyring, so a peer removed from the file loses its connections
// under every Config that uses Keyring, and no new handshake with it
// succeeds. A reload that
// fails (a bad line, a file that others may write, a missing file) changes
// nothing: the old keyring stays in force, and the error, which names the
// bad line, is logged at Error level. A reload that changes the keyring is
// logged as every keyring change is ("noisetor: keyring changed", with the
// peers added and removed); one that changes nothing is logged at Debug
// level only. Logs never hold key material beyond public-key fingerprints.
//
// A typical server:
//
//	kr, err := noisetor.LoadKeyring(path)
//	...
//	cfg := &noisetor.Config{StaticKey: key, Keyring: kr}
//	kf := &noisetor.KeyringFile{Path: path, Keyring: kr}
//	go kf.Watch(ctx)
//	hup := make(chan os.Signal, 1)
//	signal.Notify(hup, syscall.SIGHUP)
//	go func() {
//		for range hup {
//			kf.Reload() // a failure is logged; the old keyring stays
//		}
//	}()
//
// Watch polls the file rather than asking the operating system for change
// events (inotify, kqueue; the fsnotify package). Polling sees every way a
// keyring file gets replaced: renamed over atomically (config management,
// Keyring.Save, `noisetor keyring add`), which ends an inotify watch on the
// old file; written in place by an editor; replaced through a symbolic link
// that is swapped (as Kubernetes does with mounted configuration), which
// changes no file in the watched directory; deleted and created again; or
// changed on a network file system, where change events from other machines
// do not arrive. It needs no extra dependency in a program that decides whom
// a custody system trusts, and nothing platform-specific. Its price is a
// delay of up to Interval plus twice Settle (0.7s by default) and one open
// and read of a small file per Interval (the file is parsed only when its
// bytes changed); for an immediate reload, call Reload.
//
// Watch applies a change only once the file has stayed the same for Settle,
// so a file caught half-written by a non-atomic write, or missing for a
// moment while it is replaced, is not applied and not reported: even a
// partial file that happens to parse (cut at the end of a line, or empty
// just after truncation) would remove peers. That holds for a writer that
// pauses less than Settle between its writes; a file replaced by a rename
// (as Keyring.Save and the noisetor command do) is safe whatever the timing.
// A file that stays bad is reported once, not at every poll. Reload does not
// wait: the operator who asks for it has finished writing the file.
//
// The zero value of each field but Path and Keyring is a sensible default.
// Reload and Watch may be called concurrently; reloads are serialized. A
// KeyringFile must not be copied after first use.
type KeyringFile struct {
	// Path is the keyring file, as for LoadKeyring. Required.
	Path string

	// Keyring is the keyring kept equal to the file: the one the Configs
	// use, so that Update reaches their connections. Required. Changes
	// made to it by other means (Add, Remove) last until the next reload.
	Keyring *Keyring

	// Interval is how often Watch checks the file. Zero means 500ms.
	Interval time.Duration

	// Settle is how long the file must stay the same before Watch applies
	// it. Zero means 100ms; negative means no wait.
	Settle time.Duration

	// Logger receives the reload records (nil: slog.Default()).
	Logger *slog.Logger

	mu       sync.Mutex // serializes reloads; guards the fields below
	seen     [32]byte   // the state of the file the last reload read
	haveSeen bool
	failed   bool // the last reload failed
}

// errNoKeyringFile and errNoKeyring are a KeyringFile's configuration errors.
var (
	errNoKeyringFile = errors.New("noisetor: KeyringFile.Path is empty")
	errNoKeyring     = errors.New("noisetor: KeyringFile.Keyring is nil")
)

func (f *KeyringFile) check() error {
	switch {
	case f.Path == "":
		return errNoKeyringFile
	case f.Keyring == nil:
		return errNoKeyring
	}
	return nil
}

func (f *KeyringFile) logger() *slog.Logger {
	if f.Logger == nil {
		return slog.Default()
	}
	return f.Logger
}

// Reload reads the file now and makes Keyring equal to it, returning what
// changed. On an error (a *KeyringError naming the line for a bad line) it
// changes nothing and logs the error at Error level, so a caller that
// ignores the result loses nothing.
func (f *KeyringFile) Reload() (KeyringChange, error) {
	if err := f.check(); err != nil {
		return KeyringChange{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reloadLocked(readKeyringFile(f.Path))
}

// reloadLocked applies the file as read. f.mu must be held.
func (f *KeyringFile) reloadLocked(st keyringFileState) (KeyringChange, error) {
	f.seen, f.haveSeen = st.sum, true
	log := f.logger()
	next, err := st.keyring(f.Path)
	if err != nil {
		f.failed = true
		attrs := []any{"path", f.Path, "fingerprint", f.Keyring.Fingerprint(), "error", err.Error()}
		var ke *KeyringError
		if errors.As(err, &ke) && ke.Line > 0 {
			attrs = append(attrs, "line", ke.Line)
		}
		log.Error("noisetor: reloading the keyring file failed; the old keyring stays in force", attrs...)
		return KeyringChange{}, err
	}
	recovered := f.failed
	f.failed = false
	// A Config that has had a connection watches its keyring and logs
	// every change itself (liveConns); log here only when none does, so
	// that a change is logged once.
	watched := f.Keyring.watched()
	change := f.Keyring.Update(next)
	switch {
	case change.IsZero():
		level := slog.LevelDebug
		if recovered {
			level = slog.LevelInfo // the error logged before is over
		}
		log.Log(context.Background(), level, "noisetor: keyring file reloaded, unchanged",
			"path", f.Path, "fingerprint", change.NewFingerprint)
	case !watched:
		log.Info("noisetor: keyring changed", append([]any{"path", f.Path}, change.logAttrs()...)...)
	}
	return change, nil
}

// Watch checks the file every Interval and reloads it (see Reload) when its
// contents changed and then stayed the same for Settle, until ctx ends. It
// reads the file once at the start, so a change made between loading the
// keyring and calling Watch is not missed. It returns ctx.Err() when ctx
// ends, or at once an error if Path or Keyring is unset.
func (f *KeyringFile) Watch(ctx context.Context) error {
	if err := f.check(); err != nil {
		return err
	}
	interval, settle := f.Interval, f.Settle
	if interval <= 0 {
		interval = defaultKeyringPollInterval
	}
	if settle == 0 {
		settle = defaultKeyringSettle
	}
	t := time.NewTimer(0)
	defer t.Stop()
	var pending [32]byte // a state seen once, waiting to be seen again after settle
	havePending := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		st := readKeyringFile(f.Path)
		f.mu.Lock()
		switch {
		case f.haveSeen && st.sum == f.seen:
			havePending = false
			t.Reset(interval)
		case settle < 0 || havePending && st.sum == pending:
			f.reloadLocked(st) // the bytes just read: what settled, not what the file holds by now
			havePending = false
			t.Reset(interval)
		default:
			pending, havePending = st.sum, true
			t.Reset(settle)
		}
		f.mu.Unlock()
	}
}

// A keyringFileState is what a keyring file held when read: its bytes, or
// the error opening or reading it, and a digest of either. Two equal
// digests mean the file did not change in between (comparing contents, not
// timestamps, which some file systems keep to the second and cp -p sets
// back).
type keyringFileState struct {
	sum  [32]byte
	data []byte
	err  error
}

// readKeyringFile reads path as LoadKeyring does.
func readKeyringFile(path string) keyringFileState {
	var st keyringFileState
	f, err := openKeyringFile(path)
	if err == nil {
		st.data, err = io.ReadAll(io.LimitReader(f, maxKeyringSize+1))
		f.Close()
		if err != nil {
			err = &KeyringError{Path: path, Err: err}
		}
	}
	h := sha256.New()
	if err != nil {
		st.err = err
		h.Write([]byte("error\x00"))
		h.Write([]byte(err.Error()))
	} else {
		h.Write([]byte("contents\x00"))
		h.Write(st.data)
	}
	h.Sum(st.sum[:0])
	return st
}

// keyring parses the bytes read, as LoadKeyring does.
func (st keyringFileState) keyring(path string) (*Keyring, error) {
	if st.err != nil {
		return nil, st.err
	}
	return parseKeyring(path, bytes.NewReader(st.data))
}

// watched reports whether some Config watches k for changes (liveConns in
// keyring_live.go), and so logs them.
func (k *Keyring) watched() bool {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.watchers) > 0
}
