//go:build unix

package tortest

import (
	"errors"
	"os"
	"syscall"
)

// signalGroup signals the process group that p leads (tor is started with
// Setpgid), so that nothing tor may have forked survives it.
func signalGroup(p *os.Process, kill bool) {
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	if err := syscall.Kill(-p.Pid, sig); err != nil {
		p.Signal(sig)
	}
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
