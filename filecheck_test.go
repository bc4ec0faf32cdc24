//go:build unix

package noisetor

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// otherUID owns the files that another local user would plant; chown needs
// root, so the cases that use it are skipped for other users.
const otherUID = 65534 // nobody

// A file loader under test: what it reads, and what kind of file it is.
type fileLoader struct {
	name    string
	kind    fileKind
	content func(t *testing.T) []byte
	load    func(path string) error
}

func fileLoaders(t *testing.T) []fileLoader {
	key := testKey(t, X25519, 3)
	onion, err := GenerateOnionKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return append([]fileLoader{
		{"private key", secretFile, func(*testing.T) []byte { return key.MarshalPrivateText() },
			func(p string) error { _, err := LoadPrivateKey(p); return err }},
		{"onion key", secretFile, func(*testing.T) []byte { return onion.MarshalPrivateText() },
			func(p string) error { _, err := LoadOnionKey(p); return err }},
		{"keyring", trustFile, func(*testing.T) []byte { return []byte(canonicalValid) },
			func(p string) error { _, err := LoadKeyring(p); return err }},
	}, extraFileLoaders...)
}

// extraFileLoaders are loaders that exist only in some builds (PIN files:
// cgo).
var extraFileLoaders []fileLoader

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown files to another user")
	}
}

// TestFileChecks plants, for every loader, the files another local user
// could: each must be refused with an error that matches ErrUnsafeFile (and
// ErrKeyFilePermissions for secrets), names the check and gives the fix. The
// safe layouts next to them load.
func TestFileChecks(t *testing.T) {
	for _, l := range fileLoaders(t) {
		t.Run(l.name, func(t *testing.T) {
			mode := os.FileMode(0o600)
			if l.kind == trustFile {
				mode = 0o644
			}
			write := func(t *testing.T, path string) string {
				t.Helper()
				if err := os.WriteFile(path, l.content(t), mode); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(path, mode); err != nil {
					t.Fatal(err)
				}
				return path
			}
			refused := func(t *testing.T, path, check, fix string) {
				t.Helper()
				err := l.load(path)
				if !errors.Is(err, ErrUnsafeFile) || !errors.Is(err, fs.ErrPermission) ||
					(l.kind == secretFile && !errors.Is(err, ErrKeyFilePermissions)) {
					t.Fatalf("%s: %v, want ErrUnsafeFile", path, err)
				}
				if !strings.Contains(err.Error(), check) || !strings.Contains(err.Error(), fix) {
					t.Fatalf("error %q does not say %q and %q", err, check, fix)
				}
				if l.kind == secretFile && strings.Contains(err.Error(), strings.TrimSpace(string(l.content(t)))[:12]) {
					t.Fatalf("error shows the contents: %v", err)
				}
			}
			loads := func(t *testing.T, path string) {
				t.Helper()
				if err := l.load(path); err != nil && errors.Is(err, ErrUnsafeFile) {
					t.Fatalf("%s refused: %v", path, err)
				} else if err != nil && l.name != "PIN file" {
					t.Fatalf("%s: %v", path, err)
				}
			}
			dir := t.TempDir()

			t.Run("safe", func(t *testing.T) {
				p := write(t, filepath.Join(dir, "ok"))
				loads(t, p)
				// A link of ours to a file of ours.
				link := filepath.Join(dir, "ok-link")
				if err := os.Symlink(p, link); err != nil {
					t.Fatal(err)
				}
				loads(t, link)
				// A sticky, world-writable directory (as /tmp) with our file.
				sticky := filepath.Join(dir, "sticky")
				os.Mkdir(sticky, 0o700)
				os.Chmod(sticky, os.ModeSticky|0o777)
				loads(t, write(t, filepath.Join(sticky, "ok")))
			})
			t.Run("mode", func(t *testing.T) {
				p := write(t, filepath.Join(dir, "mode"))
				if l.kind == secretFile {
					os.Chmod(p, 0o640)
					refused(t, p, "readable by group or others", "chmod 600")
				} else {
					os.Chmod(p, 0o664)
					refused(t, p, "lets group or others write it", "chmod 644")
				}
			})
			t.Run("fifo", func(t *testing.T) {
				p := filepath.Join(dir, "fifo")
				if err := syscall.Mkfifo(p, uint32(mode)); err != nil {
					t.Fatal(err)
				}
				done := make(chan struct{})
				go func() {
					defer close(done)
					refused(t, p, "not a regular file (it is a named pipe)", "plain file")
				}()
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					t.Fatal("loading a FIFO blocked")
				}
			})
			t.Run("world-writable directory", func(t *testing.T) {
				d := filepath.Join(dir, "open")
				os.Mkdir(d, 0o700)
				p := write(t, filepath.Join(d, "f"))
				os.Chmod(d, 0o777)
				refused(t, p, "directory "+d+" has mode 0777", "chmod go-w "+d)
				os.Chmod(d, 0o770)
				refused(t, p, "directory "+d+" has mode 0770", "chmod go-w")
				// A link into it, from a safe place, is no better.
				link := filepath.Join(dir, "into-open")
				os.Symlink(p, link)
				refused(t, link, "directory "+d+" has mode 0770", "chmod go-w")
			})
			t.Run("another user's file", func(t *testing.T) {
				needRoot(t)
				p := write(t, filepath.Join(dir, "theirs"))
				os.Chown(p, otherUID, otherUID)
				refused(t, p, "owned by uid 65534", "chown 0 "+p)
				// Through a link of ours.
				link := filepath.Join(dir, "to-theirs")
				os.Symlink(p, link)
				refused(t, link, "owned by uid 65534", "chown")
			})
			t.Run("another user's link", func(t *testing.T) {
				needRoot(t)
				p := write(t, filepath.Join(dir, "mine"))
				link := filepath.Join(dir, "their-link")
				os.Symlink(p, link)
				if err := os.Lchown(link, otherUID, otherUID); err != nil {
					t.Fatal(err)
				}
				refused(t, link, "is a symbolic link owned by uid 65534", "replace it")
			})
			t.Run("another user's directory", func(t *testing.T) {
				needRoot(t)
				d := filepath.Join(dir, "theirdir")
				os.Mkdir(d, 0o755)
				p := write(t, filepath.Join(d, "f"))
				os.Chown(d, otherUID, otherUID)
				refused(t, p, "directory "+d+" is owned by uid 65534", "move the file")
			})
			t.Run("another user's file in a sticky directory", func(t *testing.T) {
				needRoot(t)
				sticky := filepath.Join(dir, "sticky2")
				os.Mkdir(sticky, 0o700)
				os.Chmod(sticky, os.ModeSticky|0o777)
				// Their directory in /tmp-like space holding our file: they
				// can swap it.
				d := filepath.Join(sticky, "their")
				os.Mkdir(d, 0o700)
				p := write(t, filepath.Join(d, "f"))
				os.Chown(d, otherUID, otherUID)
				refused(t, p, "owned by uid 65534", "move the file")
				// Their file directly in the sticky directory.
				q := write(t, filepath.Join(sticky, "f"))
				os.Chown(q, otherUID, otherUID)
				refused(t, q, "owned by uid 65534", "move the file")
			})
		})
	}
}
