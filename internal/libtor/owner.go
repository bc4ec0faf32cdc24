//go:build embedtor && cgo

package libtor

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
)

// ownerSocket is the owning control connection of one tor: a socket pair
// whose tor end is passed as __OwningControllerFD. tor treats that end as an
// authenticated control connection and exits as soon as the Go end closes,
// so no tor outlives its controller.
type ownerSocket struct {
	conn  *onceCloseConn // Go end
	given bool           // conn was handed to bine by EmbeddedControlConn

	torFD  int // tor end; -1 once released
	torDev uint64
	torIno uint64
}

func newOwnerSocket() (*ownerSocket, error) {
	// Both ends close-on-exec: an inherited tor end would be an
	// authenticated, owning control connection in every child process.
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("noisetor: embedded tor control socket: %w", err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fds[1], &st); err != nil {
		syscall.Close(fds[0])
		syscall.Close(fds[1])
		return nil, fmt.Errorf("noisetor: embedded tor control socket: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "tor-owner")
	c, err := net.FileConn(f) // dups the descriptor
	f.Close()
	if err != nil {
		syscall.Close(fds[1])
		return nil, fmt.Errorf("noisetor: embedded tor control socket: %w", err)
	}
	return &ownerSocket{conn: &onceCloseConn{Conn: c}, torFD: fds[1], torDev: st.Dev, torIno: st.Ino}, nil
}

// releaseTorEnd closes tor's end unless tor already has. tor closes it on
// exit once it has taken it over, but not when it fails before applying its
// options, and then a controller reading the Go end would wait forever. By
// then the descriptor number may belong to a new socket or file, so it is
// closed only if it still refers to the same socket.
func (o *ownerSocket) releaseTorEnd() {
	if o.torFD < 0 {
		return
	}
	var st syscall.Stat_t
	if syscall.Fstat(o.torFD, &st) == nil && st.Dev == o.torDev && st.Ino == o.torIno {
		syscall.Close(o.torFD)
	}
	o.torFD = -1
}

// closeUnlessGiven closes the Go end if it is still ours; once bine has it,
// bine closes it.
func (o *ownerSocket) closeUnlessGiven() {
	if !o.given {
		o.conn.Close()
	}
}

// onceCloseConn lets the owner of a process and bine both close the control
// connection without the second Close reporting an error.
type onceCloseConn struct {
	net.Conn
	once sync.Once
	err  error
}

func (c *onceCloseConn) Close() error {
	c.once.Do(func() { c.err = c.Conn.Close() })
	return c.err
}

// embeddedControlConn implements process.Process.EmbeddedControlConn for both
// creators; the caller holds the process's lock.
func embeddedControlConn(owner **ownerSocket, started bool) (net.Conn, error) {
	if started {
		return nil, errors.New("noisetor: embedded tor: EmbeddedControlConn called after Start")
	}
	if *owner == nil {
		o, err := newOwnerSocket()
		if err != nil {
			return nil, err
		}
		*owner = o
	}
	if (*owner).given {
		return nil, errors.New("noisetor: embedded tor: EmbeddedControlConn called twice")
	}
	(*owner).given = true
	return (*owner).conn, nil
}
