package noisetor

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fileRig is a server whose keyring is kept equal to a file by a running
// KeyringFile.Watch, with an echo listener on 127.0.0.1, and two peers,
// alice and bob, that may dial it.
type fileRig struct {
	ps   map[string]*testPeer
	ln   net.Listener
	path string
	kf   *KeyringFile
}

func newFileRig(t *testing.T, interval, settle time.Duration) *fileRig {
	t.Helper()
	ps := newTestPeers(t, "server", "alice", "bob")
	srv := ps["server"]
	srv.cfg.Logger = slog.New(slog.NewTextHandler(srv.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r := &fileRig{ps: ps, path: filepath.Join(t.TempDir(), "server.keyring")}
	if err := srv.cfg.Keyring.Save(r.path); err != nil {
		t.Fatal(err)
	}
	r.ln = listenServing(t, srv.cfg, func(c net.Conn) { io.Copy(c, c) })
	r.kf = &KeyringFile{Path: r.path, Keyring: srv.cfg.Keyring, Interval: interval, Settle: settle, Logger: srv.cfg.Logger}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.kf.Watch(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Watch returned %v, want context.Canceled", err)
		}
	})
	// Watch reads the file at once and applies it after Settle; from then
	// on it polls every Interval.
	r.waitLog(t, "keyring file reloaded, unchanged", 5*time.Second)
	return r
}

func (r *fileRig) dial(name string) (net.Conn, error) {
	return (&Dialer{Config: r.ps[name].cfg, Peer: "server"}).Dial("tcp", r.ln.Addr().String())
}

func (r *fileRig) mustDial(t *testing.T, name string) net.Conn {
	t.Helper()
	c, err := r.dial(name)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := echoOnce(c); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return c
}

// lines returns the text of a keyring file listing the server, then the
// named peers, in that order.
func (r *fileRig) lines(t *testing.T, names ...string) []byte {
	t.Helper()
	text := "# test keyring\nserver " + r.ps["server"].key.PublicKey().String() + "\n"
	for _, n := range names {
		text += n + " " + r.ps[n].key.PublicKey().String() + "\n"
	}
	return []byte(text)
}

func (r *fileRig) logs() string { return r.ps["server"].logs.String() }

// waitLog waits until the server's log holds want.
func (r *fileRig) waitLog(t *testing.T, want string, within time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(within); !strings.Contains(r.logs(), want); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after %v the log has no %q:\n%s", within, want, r.logs())
		}
	}
}

func echoOnce(c net.Conn) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	_, err := io.ReadFull(c, make([]byte, 4))
	return err
}

// expectCut checks that c is cut (an error that is neither a timeout nor a
// clean end) within d, and returns how long that took from start.
func expectCut(t *testing.T, c net.Conn, start time.Time, d time.Duration) time.Duration {
	t.Helper()
	c.SetReadDeadline(start.Add(d))
	_, err := c.Read(make([]byte, 1))
	if err == nil || isTimeout(err) || errors.Is(err, io.EOF) {
		t.Fatalf("connection of the removed peer: Read = %v, want it cut (not a clean end) within %v", err, d)
	}
	return time.Since(start)
}

// A peer removed from the keyring FILE while connected, with the file
// replaced by a rename or rewritten in place: its connection ends within a
// second, its next dial is refused, and another peer's connection is
// untouched. The change is logged once.
func TestKeyringFileRemoveEndsConnections(t *testing.T) {
	checkNoGoroutineLeak(t)
	for _, how := range []string{"rename", "in place"} {
		t.Run(how, func(t *testing.T) {
			r := newFileRig(t, 100*time.Millisecond, 50*time.Millisecond)
			alice := r.mustDial(t, "alice")
			bob := r.mustDial(t, "bob")
			before, err := os.Stat(r.path)
			if err != nil {
				t.Fatal(err)
			}

			start := time.Now()
			text := r.lines(t, "bob")
			switch how {
			case "rename":
				tmp := r.path + ".new"
				if err := os.WriteFile(tmp, text, 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.Rename(tmp, r.path); err != nil {
					t.Fatal(err)
				}
			case "in place":
				if err := os.WriteFile(r.path, text, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			after, err := os.Stat(r.path)
			if err != nil {
				t.Fatal(err)
			}
			if same := os.SameFile(before, after); same != (how == "in place") {
				t.Fatalf("%s: the file is the same inode: %v", how, same)
			}

			took := expectCut(t, alice, start, time.Second)
			t.Logf("the removed peer's connection ended %v after the file changed", took.Round(time.Millisecond))
			if err := echoOnce(bob); err != nil {
				t.Fatalf("the other peer's connection: %v", err)
			}
			if _, err := r.dial("alice"); !errors.Is(err, ErrRefused) {
				t.Fatalf("removed peer's next dial: %v, want ErrRefused", err)
			}
			r.mustDial(t, "bob")
			logs := r.logs()
			mustContain(t, logs, "removed.peer=alice", "no longer in the keyring")
			if n := strings.Count(logs, `msg="noisetor: keyring changed"`); n != 1 {
				t.Errorf("the change is logged %d times, want once:\n%s", n, logs)
			}
		})
	}
}

// A malformed file (line 3 holds a pasted private key) keeps the old
// keyring: established connections and new handshakes still work, and the
// error logged names line 3 without quoting the key. The next good file is
// applied.
func TestKeyringFileMalformedKeepsOld(t *testing.T) {
	checkNoGoroutineLeak(t)
	r := newFileRig(t, 50*time.Millisecond, 20*time.Millisecond)
	alice := r.mustDial(t, "alice")
	ring := r.ps["server"].cfg.Keyring
	fp := ring.Fingerprint()

	secret := mustKey(t)
	secretText := strings.TrimSpace(string(secret.MarshalPrivateText()))
	good := r.lines(t, "bob") // without alice, had it been applied
	bad := strings.Replace(string(good), "\nbob ", "\ncarol "+secretText+"\nbob ", 1)
	if got := strings.Split(bad, "\n")[2]; !strings.HasPrefix(got, "carol ") {
		t.Fatalf("line 3 is %q", got)
	}
	if err := os.WriteFile(r.path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	r.waitLog(t, "level=ERROR", 2*time.Second)
	logs := r.logs()
	mustContain(t, logs, "reloading the keyring file failed; the old keyring stays in force", "line=3", r.path+":3:", "PRIVATE key")
	if strings.Contains(logs, secretText[len(privateKeyPrefix):]) {
		t.Fatalf("the log quotes the private key pasted into the file:\n%s", logs)
	}
	if ring.Fingerprint() != fp {
		t.Fatal("a malformed file changed the keyring")
	}
	if err := echoOnce(alice); err != nil {
		t.Fatalf("established connection after a malformed file: %v", err)
	}
	r.mustDial(t, "alice")

	// A bad file is reported once by Watch, and by every Reload.
	time.Sleep(200 * time.Millisecond)
	if n := strings.Count(r.logs(), "level=ERROR"); n != 1 {
		t.Errorf("a file that stays bad is reported %d times, want once", n)
	}
	change, err := r.kf.Reload()
	var ke *KeyringError
	if !errors.As(err, &ke) || ke.Line != 3 || !change.IsZero() {
		t.Fatalf("Reload of the malformed file = %v, %v; want a *KeyringError for line 3 and no change", change, err)
	}
	if n := strings.Count(r.logs(), "level=ERROR"); n != 2 {
		t.Errorf("Reload of a bad file logged %d errors in all, want 2", n)
	}

	// The corrected file is applied.
	start := time.Now()
	if err := os.WriteFile(r.path, good, 0o644); err != nil {
		t.Fatal(err)
	}
	expectCut(t, alice, start, time.Second)
	if _, ok := ring.ByName("alice"); ok {
		t.Fatal("alice is still in the keyring")
	}
}

// Non-atomic writes: a file truncated, then written in two pieces (the
// first of which parses, and would remove peers), or removed and created
// again, is applied only once complete; nothing in between is applied or
// reported.
func TestKeyringFileNonAtomicWrites(t *testing.T) {
	checkNoGoroutineLeak(t)
	const pause = 40 * time.Millisecond // between the steps of a write: far below Settle
	for _, how := range []string{"truncate and write in pieces", "remove and create"} {
		t.Run(how, func(t *testing.T) {
			r := newFileRig(t, 10*time.Millisecond, 300*time.Millisecond)
			alice := r.mustDial(t, "alice")
			bob := r.mustDial(t, "bob")
			final := r.lines(t, "alice") // bob goes
			start := time.Now()
			switch how {
			case "truncate and write in pieces":
				f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_TRUNC, 0)
				if err != nil {
					t.Fatal(err)
				}
				time.Sleep(pause) // empty: a valid keyring without alice and bob
				cut := bytes.Index(final, []byte("\nalice ")) + 1
				f.Write(final[:cut]) // the comment and the server only: valid, without alice and bob
				time.Sleep(pause)
				f.Write(final[cut:])
				f.Close()
			case "remove and create":
				os.Remove(r.path)
				time.Sleep(pause)
				if err := os.WriteFile(r.path, final, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			expectCut(t, bob, start, 2*time.Second) // Settle is 300ms here
			if err := echoOnce(alice); err != nil {
				t.Fatalf("alice, in the keyring before and after: %v", err)
			}
			logs := r.logs()
			if strings.Contains(logs, "removed.peer=alice") || strings.Contains(logs, "level=ERROR") {
				t.Fatalf("a partial file was applied or reported:\n%s", logs)
			}
			if n := strings.Count(logs, `msg="noisetor: keyring changed"`); n != 1 {
				t.Errorf("%d keyring changes logged, want 1:\n%s", n, logs)
			}
		})
	}
}

// Reloads (from the watcher and from Reload, as on SIGHUP) race with many
// concurrent handshakes: clean under -race, and a peer that every version of
// the file lists is never refused.
func TestKeyringFileReloadUnderHandshakes(t *testing.T) {
	checkNoGoroutineLeak(t)
	r := newFileRig(t, 2*time.Millisecond, -1)
	r.ps["server"].cfg.Logger = discardLogger()
	r.kf.Logger = r.ps["server"].cfg.Logger
	with, without := r.lines(t, "alice", "bob"), r.lines(t, "bob")

	var stop atomic.Bool // not a context deadline, which a dial in flight would report as its own failure
	var wg sync.WaitGroup
	var handshakes, refused atomic.Int64
	for i := 0; i < 8; i++ {
		name := []string{"alice", "bob"}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := (&Dialer{Config: r.ps[name].cfg, Peer: "server"}).DialContext(ctx, "tcp", r.ln.Addr().String())
				cancel()
				switch {
				case err == nil:
					handshakes.Add(1)
					echoOnce(c) // alice's may be cut by a reload
					c.Close()
				case name == "bob":
					t.Errorf("bob, in every version of the file: %v", err)
					return
				default:
					refused.Add(1)
				}
			}
		}()
	}
	reloads := 0
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); reloads++ {
		text := with
		if reloads%2 == 1 {
			text = without
		}
		tmp := r.path + ".new"
		if err := os.WriteFile(tmp, text, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, r.path); err != nil {
			t.Fatal(err)
		}
		if _, err := r.kf.Reload(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d reloads, %d handshakes, %d refused", reloads, handshakes.Load(), refused.Load())
	os.WriteFile(r.path, with, 0o644)
	if _, err := r.kf.Reload(); err != nil {
		t.Fatal(err)
	}
	r.mustDial(t, "alice")
}

// Reload on a keyring that no Config watches yet: it logs the change itself
// (once), an unchanged file only at Debug level, a failure at Error level,
// and the recovery after a failure at Info level. A KeyringFile without a
// Path or Keyring is an error.
func TestKeyringFileReload(t *testing.T) {
	ps := newTestPeers(t, "server", "alice", "bob")
	var logs syncBuffer
	path := filepath.Join(t.TempDir(), "k")
	ring := ps["server"].cfg.Keyring
	if err := ring.Save(path); err != nil {
		t.Fatal(err)
	}
	kf := &KeyringFile{Path: path, Keyring: ring, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}

	if c, err := kf.Reload(); err != nil || !c.IsZero() {
		t.Fatalf("Reload of the same file = %v, %v", c, err)
	}
	mustContain(t, logs.String(), "level=DEBUG", "keyring file reloaded, unchanged", `fingerprint="`+ring.Fingerprint()+`"`)

	next, _ := NewKeyring(Peer{Name: "bob", PublicKey: ps["bob"].key.PublicKey()})
	if err := next.Save(path); err != nil {
		t.Fatal(err)
	}
	c, err := kf.Reload()
	if err != nil || len(c.Removed) != 2 || len(c.Added) != 0 || c.NewFingerprint != next.Fingerprint() || ring.Fingerprint() != next.Fingerprint() {
		t.Fatalf("Reload = %v, %v; want alice and server removed", c, err)
	}
	mustContain(t, logs.String(), `level=INFO msg="noisetor: keyring changed" path=`+path, "removed.peer=alice", "removed.peer=server")

	os.Remove(path)
	if _, err := kf.Reload(); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Reload of a missing file: %v", err)
	}
	mustContain(t, logs.String(), "level=ERROR")
	if ring.Fingerprint() != next.Fingerprint() {
		t.Fatal("a missing file changed the keyring")
	}
	next.Save(path)
	if _, err := kf.Reload(); err != nil {
		t.Fatal(err)
	}
	mustContain(t, logs.String(), `level=INFO msg="noisetor: keyring file reloaded, unchanged"`)
	if n := strings.Count(logs.String(), "keyring changed"); n != 1 {
		t.Errorf("%d changes logged, want 1:\n%s", n, logs.String())
	}

	// The errors are LoadKeyring's, which reads the file the same way.
	for _, c := range []struct {
		name string
		prep func()
	}{
		{"missing", func() { os.Remove(path) }},
		{"writable by others", func() { next.Save(path); os.Chmod(path, 0o666) }},
		{"bad line", func() { os.WriteFile(path, []byte("# x\n\nbob x25519:AAAA\n"), 0o644) }},
		{"too large", func() { os.WriteFile(path, bytes.Repeat([]byte("#\n"), maxKeyringSize), 0o644) }},
		{"a directory", func() { os.Remove(path); os.Mkdir(path, 0o755) }},
	} {
		c.prep()
		_, want := LoadKeyring(path)
		_, got := kf.Reload()
		if want == nil || got == nil || got.Error() != want.Error() || errors.Is(got, ErrUnsafeFile) != errors.Is(want, ErrUnsafeFile) ||
			errors.Is(got, os.ErrNotExist) != errors.Is(want, os.ErrNotExist) {
			t.Errorf("%s: Reload error %v, LoadKeyring error %v", c.name, got, want)
		}
		var kw, kg *KeyringError
		if errors.As(want, &kw) != errors.As(got, &kg) || kw != nil && kw.Line != kg.Line {
			t.Errorf("%s: Reload error %#v, LoadKeyring error %#v", c.name, got, want)
		}
		if ring.Fingerprint() != next.Fingerprint() {
			t.Fatalf("%s: a failed reload changed the keyring", c.name)
		}
	}
	os.Remove(path)

	if _, err := (&KeyringFile{Keyring: ring}).Reload(); err == nil || !strings.HasPrefix(err.Error(), "noisetor: ") {
		t.Errorf("Reload without a Path: %v", err)
	}
	if err := (&KeyringFile{Path: path}).Watch(context.Background()); err == nil {
		t.Error("Watch without a Keyring returned nil")
	}
}
