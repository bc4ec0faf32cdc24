//go:build unix && !linux

package tortest

import "syscall"

// sysProcAttr puts tor in its own process group. Without Pdeathsig, tor
// notices that the test binary died through __OwningControllerProcess.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
