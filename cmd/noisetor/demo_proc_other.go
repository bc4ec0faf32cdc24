//go:build unix && !linux

package main

import (
	"os/exec"
	"syscall"
)

// roleSysProcAttr puts a role in its own process group, with its tor, so
// that killRole stops both. Its tor also exits when the role does
// (__OwningControllerProcess).
func roleSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// killRole kills a role's process group: the role and the tor it started.
func killRole(cmd *exec.Cmd) {
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
}
