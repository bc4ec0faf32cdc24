//go:build !unix

package monitor

import (
	"errors"
	"net"
)

// ListenUnix creates the status socket; it needs a Unix system, where the
// socket's directory can be checked to be private.
func ListenUnix(path string) (net.Listener, error) {
	return nil, errors.New("noisetor: the status socket needs a Unix system")
}
