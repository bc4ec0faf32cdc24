// Package examples holds runnable programs; this test builds them and runs
// a wallet, a co-signer, a sync server and a watchtower together over TCP on
// 127.0.0.1, with keys and keyrings made by the noisetor command.
package examples

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

func build(t *testing.T, bin, pkg string) string {
	t.Helper()
	out := filepath.Join(bin, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// run runs a command in dir and returns its standard output.
func run(t *testing.T, dir, exe string, args ...string) string {
	t.Helper()
	cmd := exec.Command(exe, args...)
	cmd.Dir = dir
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(exe), strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// start starts a long-running example and waits until its log says ready.
func start(t *testing.T, dir, exe, ready string, args ...string) *exec.Cmd {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Dir = dir
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); cmd.Wait() })
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(20 * time.Second)
	var log []string
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("%s exited:\n%s", filepath.Base(exe), strings.Join(log, "\n"))
			}
			log = append(log, l)
			if strings.Contains(l, ready) {
				go io.Copy(io.Discard, stderr)
				go func() {
					for range lines {
					}
				}()
				return cmd
			}
		case <-timeout:
			t.Fatalf("%s did not log %q:\n%s", filepath.Base(exe), ready, strings.Join(log, "\n"))
		}
	}
}

func TestExamples(t *testing.T) {
	if testing.Short() {
		t.Skip("builds five programs")
	}
	bin, dir := t.TempDir(), t.TempDir()
	noisetor := build(t, bin, "github.com/noisetor/noisetor/cmd/noisetor")
	cosigner := build(t, bin, "./cosigner")
	syncserver := build(t, bin, "./syncserver")
	watchtower := build(t, bin, "./watchtower")
	wallet := build(t, bin, "./wallet")

	// The ceremony, as the operators would run it.
	line := make(map[string]string)
	for _, r := range []string{"cosigner", "syncserver", "watchtower", "wallet"} {
		line[r] = run(t, dir, noisetor, "keygen", "-o", r+".key")
	}
	cosAddr, syncAddr := freeAddr(t), freeAddr(t)
	add := func(ring, peer string, extra ...string) {
		args := append([]string{"keyring", "add", ring + ".keyring"}, strings.Fields(line[peer])...)
		run(t, dir, noisetor, append(args, extra...)...)
	}
	add("cosigner", "wallet")
	add("syncserver", "wallet")
	add("syncserver", "watchtower")
	add("watchtower", "syncserver", "--addr", syncAddr)
	add("watchtower", "wallet")
	add("wallet", "cosigner", "--addr", cosAddr)
	add("wallet", "syncserver", "--addr", syncAddr)
	add("wallet", "watchtower")

	cos := start(t, dir, cosigner, "cosigner: serving", "-listen", cosAddr)
	os.Mkdir(filepath.Join(dir, "run"), 0o700)
	start(t, dir, syncserver, "syncserver: serving", "-listen", syncAddr, "-status-socket", "run/syncserver.sock")
	start(t, dir, watchtower, "watchtower: registered")

	cmd := exec.Command(wallet)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("wallet: %v\n%s", err, out)
	}
	for _, want := range []string{
		fmt.Sprintf("http://%s/sign: 200 OK co-signed a 17-byte PSBT for wallet", cosAddr),
		"http://watchtower/watch: 200 OK watching for wallet (26 bytes stored)",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("wallet output lacks %q:\n%s", want, out)
		}
	}

	// The sync server's operator sees both peers, the watchtower still
	// registered.
	status := run(t, dir, noisetor, "status", "--socket", "run/syncserver.sock")
	for _, re := range []string{`(?m)^watchtower +[1-9]\d* `, `(?m)^wallet +\d+ +(just now|\S+ ago) \(in, KK\) +[1-9]`} {
		if !regexp.MustCompile(re).MatchString(status) {
			t.Errorf("syncserver status does not match %s:\n%s", re, status)
		}
	}

	// The co-signer follows its keyring file (and reloads it on SIGHUP,
	// which must not end it): the wallet removed is refused, the wallet
	// put back is served again.
	walletRuns := func(wantOK bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			cmd := exec.Command(wallet)
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			if (err == nil) == wantOK {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("wallet, want success %v: %v\n%s", wantOK, err, out)
			}
		}
	}
	run(t, dir, noisetor, "keyring", "remove", "cosigner.keyring", "wallet")
	cos.Process.Signal(syscall.SIGHUP)
	walletRuns(false)
	add("cosigner", "wallet")
	cos.Process.Signal(syscall.SIGHUP)
	walletRuns(true)

	// A wallet whose key the servers do not know gets nothing.
	os.Rename(filepath.Join(dir, "wallet.key"), filepath.Join(dir, "wallet.key.real"))
	run(t, dir, noisetor, "keygen", "-o", "wallet.key")
	cmd = exec.Command(wallet)
	cmd.Dir = dir
	out, err = cmd.CombinedOutput()
	if err == nil || strings.Contains(string(out), "200 OK") {
		t.Fatalf("a wallet with an unknown key was served:\n%s", out)
	}
}
