//go:build !unix

package main

import (
	"os/exec"
	"syscall"
)

func roleSysProcAttr() *syscall.SysProcAttr { return nil }

// killRole kills a role. Its tor exits by itself when the role is gone
// (__OwningControllerProcess).
func killRole(cmd *exec.Cmd) { cmd.Process.Kill() }
