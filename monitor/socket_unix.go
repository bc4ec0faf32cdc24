//go:build unix

package monitor

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// maxSocketPath is the longest Unix socket path every Unix accepts
// (sun_path is 104 bytes on the BSDs, 108 on Linux, with the NUL).
const maxSocketPath = 103

// ListenUnix creates the Unix socket path, mode 0600, and listens on it.
//
// The socket shows peer names and the times they connect, so the directory
// holding it must be private: a directory, owned by this process's user,
// that group and others have no access to (mode 0700, such as the tor data
// directory), and every directory above it owned by this user or root and
// not writable by others (except a sticky one such as /tmp, whose entry on
// the way is this user's or root's). Within a private directory the socket
// cannot be reached between its creation and its chmod, and nobody else can
// put a socket of their own in its place. Some systems ignore a socket's
// mode, so the directory is what keeps other users out.
//
// A socket left at path by a process that has exited is removed; one that
// a running process still answers on is not, nor is anything else at path.
// Closing the listener removes the socket.
func ListenUnix(path string) (net.Listener, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("noisetor: status socket: %w", err)
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return nil, fmt.Errorf("noisetor: status socket: %w", err)
	}
	// Bind where the checks looked, whatever a symbolic link on the way
	// points to later.
	sock := filepath.Join(dir, filepath.Base(abs))
	if len(sock) > maxSocketPath {
		return nil, fmt.Errorf("noisetor: status socket path %s is %d bytes, longer than a Unix socket's %d; use a shorter one", sock, len(sock), maxSocketPath)
	}
	if err := checkPrivateDir(dir); err != nil {
		return nil, err
	}
	if err := removeStale(sock); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("noisetor: status socket: %w", err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("noisetor: status socket: %w", err)
	}
	return l, nil
}

// checkPrivateDir checks dir, a path without symbolic links, and the
// directories above it.
func checkPrivateDir(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("noisetor: status socket: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("noisetor: status socket: %s is not a directory", dir)
	}
	if uid := owner(st); uid != os.Geteuid() {
		return fmt.Errorf("noisetor: the status socket's directory %s is owned by uid %d, not by this process's user (uid %d); "+
			"put the socket in a directory of yours with mode 0700", dir, uid, os.Geteuid())
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("noisetor: the status socket's directory %s has mode %04o: other local users could reach the socket and read "+
			"peer names and timings, or put their own in its place; chmod 700 %s, or use a private directory", dir, perm, dir)
	}
	for child, d := dir, filepath.Dir(dir); d != child; child, d = d, filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("noisetor: status socket: %w", err)
		}
		uid := owner(st)
		if uid != 0 && uid != os.Geteuid() {
			return fmt.Errorf("noisetor: directory %s, above the status socket, is owned by uid %d, who can replace the directories below it; "+
				"put the socket in a directory of yours", d, uid)
		}
		if st.Mode().Perm()&0o022 == 0 {
			continue
		}
		if st.Mode()&fs.ModeSticky != 0 {
			// In a sticky directory only an entry's owner can rename it.
			ci, err := os.Lstat(child)
			if err != nil {
				return fmt.Errorf("noisetor: status socket: %w", err)
			}
			if cuid := owner(ci); cuid == 0 || cuid == os.Geteuid() {
				continue
			}
		}
		return fmt.Errorf("noisetor: directory %s, above the status socket, lets others write it (mode %04o), so they can replace %s; "+
			"chmod go-w %s, or put the socket elsewhere", d, st.Mode().Perm(), child, d)
	}
	return nil
}

func owner(st fs.FileInfo) int {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return int(s.Uid)
	}
	return -1
}

// removeStale removes a socket at path that nobody answers on.
func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("noisetor: status socket: %w", err)
	}
	if st.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("noisetor: %s exists and is not a socket; refusing to replace it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("noisetor: status socket %s is in use by a running process", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("noisetor: status socket %s exists and cannot be checked: %w", path, err)
	}
	// Nobody listens: what a process that did not close its listener left
	// behind. Only this user can have put it in a private directory.
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("noisetor: removing the stale status socket: %w", err)
	}
	return nil
}
