package main

import (
	"os/exec"
	"syscall"
)

// roleSysProcAttr puts a role in its own process group, with its tor, so
// that killRole stops both, and has the kernel kill it if the demo dies.
func roleSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// killRole kills a role's process group: the role and the tor it started.
func killRole(cmd *exec.Cmd) {
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
}
