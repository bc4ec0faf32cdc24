package noisetor

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// ErrUnsafeFile is matched (with errors.Is) by every error about a file that
// someone other than this process's user (or root) could read, write or
// replace: a secret file (private key, PIN, Tor key) or a public file that
// decides whom to trust (a keyring, a relay configuration). The errors also
// match fs.ErrPermission, and for secret files ErrKeyFilePermissions.
var ErrUnsafeFile = errors.New("noisetor: unsafe file")

// A fileKind says what a file may allow others.
type fileKind int

const (
	// secretFile: no access at all for group or others (mode 0600 or 0400).
	secretFile fileKind = iota
	// trustFile: public, but writing it means choosing whom to trust; group
	// and others may read it but not write it (mode 0644 or stricter).
	trustFile
)

func (k fileKind) modeMask() fs.FileMode {
	if k == secretFile {
		return 0o077
	}
	return 0o022
}

// An unsafeFileError names the check that failed and the fix.
type unsafeFileError struct {
	kind fileKind
	msg  string
}

func (e *unsafeFileError) Error() string { return "noisetor: " + e.msg }

func (e *unsafeFileError) Unwrap() []error {
	if e.kind == secretFile {
		return []error{ErrUnsafeFile, fs.ErrPermission, ErrKeyFilePermissions}
	}
	return []error{ErrUnsafeFile, fs.ErrPermission}
}

func unsafeFile(kind fileKind, format string, args ...any) error {
	return &unsafeFileError{kind, fmt.Sprintf(format, args...)}
}

// openChecked opens path for reading after checking it as ssh checks its key
// files: it must be a regular file, owned by this process's effective user or
// by root, that group and others may not write (for a secretFile: not access
// at all); and every directory on the way to it, on the path as given and
// after resolving symbolic links, must be owned by this user or root and not
// writable by group or others, so that nobody else can replace the file or
// a directory above it. A directory that others may write is accepted only
// with the sticky bit set (as /tmp) and when the entry in it that leads to
// the file is owned by this user or root: the sticky bit stops others from
// renaming or removing that entry. A symbolic link on the way must be owned
// by this user or root too. The opened file itself is checked again after
// opening, so that a swap between the checks and the open is caught.
//
// The file is opened without blocking, so a FIFO put in place of the file
// cannot hang the caller. Errors match ErrUnsafeFile and say which check
// failed and how to fix it.
func openChecked(path string, kind fileKind) (*os.File, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	if err := checkPath(path, abs, kind); err != nil {
		return nil, err
	}
	// Open the cleaned path that was checked: the kernel resolves "x/.."
	// after a symbolic link x differently from filepath.Clean.
	f, err := openNonBlocking(abs)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	st, err := f.Stat()
	if err == nil {
		err = checkFileInfo(path, st, kind)
	}
	if err != nil {
		f.Close()
		if _, ok := err.(*unsafeFileError); !ok {
			err = fmt.Errorf("noisetor: %w", err)
		}
		return nil, err
	}
	return f, nil
}

// OpenTrustFile opens for reading a public file that decides whom to trust,
// such as a relay configuration, after the checks LoadKeyring makes of a
// keyring: see ErrUnsafeFile. Group and others may read it, not write it.
func OpenTrustFile(path string) (*os.File, error) {
	return openChecked(path, trustFile)
}

// checkFileInfo checks the file itself: type, owner and mode.
func checkFileInfo(path string, st fs.FileInfo, kind fileKind) error {
	if !st.Mode().IsRegular() {
		return unsafeFile(kind, "%s is not a regular file (it is %s); use a plain file", path, describeType(st.Mode()))
	}
	if uid, ok := fileOwner(st); ok && !trustedOwner(uid) {
		return unsafeFile(kind, "%s is owned by uid %d, not by this process's user (uid %d) or root, so its owner can change it; "+
			"if it is yours, chown %d %s", path, uid, processUID(), processUID(), path)
	}
	if perm := st.Mode().Perm(); perm&kind.modeMask() != 0 {
		if kind == secretFile {
			return unsafeFile(kind, "%s is readable by group or others (mode %04o), want 0600 (chmod 600 %s)", path, perm, path)
		}
		return unsafeFile(kind, "%s has mode %04o, which lets group or others write it, and so choose whom this machine trusts (chmod 644 %s)", path, perm, path)
	}
	return nil
}

func describeType(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	}
	return "not a plain file"
}

// checkPath checks the symbolic link (if abs, the absolute form of path, is
// one) and the directories above abs, both as given and resolved.
func checkPath(path, abs string, kind fileKind) error {
	chains := [][]string{ancestry(abs)}
	if real, err := filepath.EvalSymlinks(abs); err == nil && real != abs {
		chains = append(chains, ancestry(real))
	}
	for _, chain := range chains {
		// chain[0] is the file, chain[i+1] the directory holding chain[i].
		for i := 0; i < len(chain); i++ {
			li, err := os.Lstat(chain[i])
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) && i == 0 {
					continue // reported by the open, as before
				}
				return fmt.Errorf("noisetor: %w", err)
			}
			if li.Mode()&fs.ModeSymlink != 0 {
				if uid, ok := fileOwner(li); ok && !trustedOwner(uid) {
					return unsafeFile(kind, "%s (on the way to %s) is a symbolic link owned by uid %d, not by this process's user (uid %d) or root, "+
						"so its owner can point it elsewhere; replace it with a link or file you own", chain[i], path, uid, processUID())
				}
			}
			if i == 0 {
				continue
			}
			st, err := os.Stat(chain[i])
			if err != nil {
				return fmt.Errorf("noisetor: %w", err)
			}
			if err := checkDir(path, chain[i], st, chain[i-1], kind); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkDir checks directory dir, which holds child, on the way to path.
func checkDir(path, dir string, st fs.FileInfo, child string, kind fileKind) error {
	uid, known := fileOwner(st)
	if known && !trustedOwner(uid) {
		return unsafeFile(kind, "directory %s is owned by uid %d, not by this process's user (uid %d) or root, so its owner can replace %s; "+
			"move the file to a directory you own", dir, uid, processUID(), path)
	}
	perm := st.Mode().Perm()
	if perm&0o022 == 0 {
		return nil
	}
	if st.Mode()&fs.ModeSticky != 0 {
		// Only the owner of an entry (or of the directory, checked above)
		// can rename or remove it in a sticky directory.
		ci, err := os.Lstat(child)
		if err != nil {
			return fmt.Errorf("noisetor: %w", err)
		}
		cuid, ok := fileOwner(ci)
		if !ok || trustedOwner(cuid) {
			return nil
		}
		return unsafeFile(kind, "directory %s (mode %04o, sticky) lets others write it, and %s in it is owned by uid %d, who can replace it; "+
			"move the file to a directory you own", dir, perm|0o1000, child, cuid)
	}
	return unsafeFile(kind, "directory %s has mode %04o, which lets group or others replace %s; chmod go-w %s, or move the file",
		dir, perm, path, dir)
}

// ancestry returns p, its directory, that one's directory, and so on up to
// the root: clean absolute paths.
func ancestry(p string) []string {
	p = filepath.Clean(p)
	chain := []string{p}
	for d := filepath.Dir(p); d != p; d = filepath.Dir(p) {
		chain = append(chain, d)
		p = d
	}
	return chain
}

// trustedOwner reports whether a file owned by uid may decide what this
// process trusts: one owned by this process's user, or by root.
func trustedOwner(uid int) bool { return uid == 0 || uid == processUID() }
