//go:build linux

package tortest

import "syscall"

// sysProcAttr puts tor in its own process group and has the kernel kill it
// when the test binary dies. (Pdeathsig follows the OS thread that started
// tor; the Go runtime keeps its threads for the life of the process unless a
// goroutine exits while locked to one, which the testing package never
// does.)
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
