//go:build unix

package tortest

import (
	"fmt"
	"syscall"
)

// Fault injection for tests of recovery: a frozen relay keeps its TCP
// connections open but forwards nothing, so the tors using it see no error
// and their circuits through it, and the onion services whose introduction
// points it hosts, silently stop working, which is how onion services fail
// in the field while tor looks healthy.

// FreezeRelays stops (SIGSTOP) every relay of the network, not the directory
// authority, until ThawRelays: a test that freezes must thaw (defer), or
// the shared network stays frozen for the tests after it.
func (n *Network) FreezeRelays() error { return n.signalRelays(syscall.SIGSTOP) }

// ThawRelays resumes (SIGCONT) the relays that FreezeRelays stopped.
func (n *Network) ThawRelays() error { return n.signalRelays(syscall.SIGCONT) }

func (n *Network) signalRelays(sig syscall.Signal) error {
	n.mu.Lock()
	nodes := n.nodes
	n.mu.Unlock()
	if len(nodes) < 2 {
		return fmt.Errorf("tortest: the network has no relays")
	}
	for _, p := range nodes[1:] {
		p.mu.Lock()
		cmd := p.cmd
		p.mu.Unlock()
		if cmd == nil || cmd.Process == nil {
			return fmt.Errorf("tortest: relay %s is not running", p.name)
		}
		if err := syscall.Kill(-cmd.Process.Pid, sig); err != nil {
			return fmt.Errorf("tortest: signalling relay %s: %w", p.name, err)
		}
	}
	return nil
}
