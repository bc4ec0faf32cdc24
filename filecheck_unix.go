//go:build unix

package noisetor

import (
	"io/fs"
	"os"
	"syscall"
)

// fileOwner returns the owner's uid of a file.
func fileOwner(st fs.FileInfo) (int, bool) {
	s, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(s.Uid), true
}

func processUID() int { return os.Geteuid() }

// openNonBlocking opens path read-only with O_NONBLOCK, so that a FIFO in
// place of a file does not block the open (the caller then refuses it). On a
// regular file O_NONBLOCK has no effect.
func openNonBlocking(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
}
