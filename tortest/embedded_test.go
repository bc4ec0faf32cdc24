//go:build embedtor

package tortest

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/noisetor/noisetor/internal/libtor"
)

// torProcess describes a running tor: its executable and arguments.
func torProcess(t testing.TB, pid int) (exe string, args []string) {
	t.Helper()
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatalf("tor pid %d: %v", pid, err)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatalf("tor pid %d: %v", pid, err)
	}
	return exe, strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")
}

// TestEmbeddedNetwork: built with -tags embedtor, every tor of the shared
// network and of StartTor is this test binary run as its embedded tor, and
// the authority's certificate is tortest's own, not tor-gencert's: no tor
// or tor-gencert executable takes part.
func TestEmbeddedNetwork(t *testing.T) {
	n := Shared(t)
	if !n.Embedded {
		t.Fatalf("the shared network runs %s, not the embedded tor", n.tor.path)
	}
	tr := n.NewTor(t, &TorOptions{Name: "embedded-check", ControlPassword: "pw"})
	self, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	procs := append(append([]*torProc(nil), n.nodes...), tr.p)
	for _, p := range procs {
		exe, args := torProcess(t, p.pid())
		if exe != self || len(args) < 2 || args[1] != libtor.ChildArg {
			t.Errorf("tor %s (pid %d) runs %s %q, want this test binary %s with %s", p.name, p.pid(), exe, args, self, libtor.ChildArg)
		}
	}
	keys := filepath.Join(n.nodes[0].dir, "keys")
	if _, err := os.Stat(filepath.Join(keys, "authority_identity_key")); !os.IsNotExist(err) {
		t.Errorf("the authority has an identity key file (tor-gencert's?): %v", err)
	}
	c, err := tr.Control()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	kv, err := c.GetInfo("version")
	if err != nil || len(kv) != 1 || !strings.HasPrefix(libtor.Version(), "tor "+strings.Fields(kv[0].Val)[0]) {
		t.Errorf("GETINFO version = %v (%v), embedded %s", kv, err, libtor.Version())
	}
	t.Logf("%d tors, all %s (%s), pids %v", len(procs), libtor.Version(), self, pids(procs))
}

func pids(procs []*torProc) []int {
	var p []int
	for _, pr := range procs {
		p = append(p, pr.pid())
	}
	return p
}

// procMemory returns the resident set size of a process and the part of it
// that is private to the process (USS, what killing it would free), in
// bytes. The rest is shared: with other tors running the same executable,
// and, for a system tor, with every other process using its libraries.
func procMemory(pid int) (rss, private int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "Rss:":
			rss = kb << 10
		case "Private_Clean:", "Private_Dirty:":
			private += kb << 10
		}
	}
	return rss, private, nil
}
