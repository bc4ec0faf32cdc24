package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noisetor/noisetor"
)

// pipeBulk is how much the CLI sends in the pipe tests: far more than it can
// send in the second that serve and connect used to allow after the peer's
// close record.
const pipeBulk = 600 << 20

// patternBlock is a random block whose length is prime, so that a loss of any
// length short of a multiple of it misaligns the rest of the stream.
var patternBlock = func() []byte {
	b := make([]byte, 65521)
	rand.Read(b)
	return b
}()

// patternReader yields n bytes of patternBlock repeated, then io.EOF, or
// failErr instead of io.EOF when it is set. With gate set, it waits for the
// gate to close before it ends.
type patternReader struct {
	n, off  int64
	failErr error
	gate    chan struct{}
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.off >= r.n {
		if r.gate != nil {
			<-r.gate
		}
		if r.failErr != nil {
			return 0, r.failErr
		}
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.n-r.off)]
	i := int(r.off % int64(len(patternBlock)))
	n := copy(p, patternBlock[i:])
	r.off += int64(n)
	return n, nil
}

// checkPattern reads r to its end and returns how many bytes it read, in
// order, of the pattern patternReader writes, and the error that ended it
// (nil for a clean end).
func checkPattern(r io.Reader) (int64, error) {
	buf := make([]byte, 256<<10)
	var off int64
	for {
		n, err := r.Read(buf)
		for p := buf[:n]; len(p) > 0; {
			i := int(off % int64(len(patternBlock)))
			k := min(len(p), len(patternBlock)-i)
			if !bytes.Equal(p[:k], patternBlock[i:i+k]) {
				return off, fmt.Errorf("data differs from what was sent at offset %d", off)
			}
			p, off = p[k:], off+int64(k)
		}
		if err == io.EOF {
			return off, nil
		}
		if err != nil {
			return off, err
		}
	}
}

// pipeRole runs the CLI as serve or as connect with stdin, against a
// library peer, and returns the peer's connection and the CLI's result.
type pipeRole struct {
	name string
	run  func(t *testing.T, dir string, stdin io.Reader) (peer net.Conn, wait func() result)
}

var pipeRoles = []pipeRole{
	{"serve", func(t *testing.T, dir string, stdin io.Reader) (net.Conn, func() result) {
		j := func(n string) string { return filepath.Join(dir, n) }
		addr, wait := serve(t, context.Background(), stdin, "-k", j("server.key"), "-r", j("server.keyring"), "-q")
		d := &noisetor.Dialer{Config: libConfig(t, j("client.key"), j("client.keyring")), Peer: "server"}
		c, err := d.DialContext(context.Background(), "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		return c, wait
	}},
	{"connect", func(t *testing.T, dir string, stdin io.Reader) (net.Conn, func() result) {
		j := func(n string) string { return filepath.Join(dir, n) }
		ln, err := noisetor.Listen("tcp", "127.0.0.1:0", libConfig(t, j("server.key"), j("server.keyring")))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		done := make(chan result, 1)
		go func() {
			var out, errb bytes.Buffer
			code := run([]string{"connect", "-k", j("client.key"), "-r", j("client.keyring"), "-q", "--peer", "server", ln.Addr().String()}, stdin, &out, &errb)
			done <- result{code, out.String(), errb.String()}
		}()
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return c, func() result {
			select {
			case r := <-done:
				return r
			case <-time.After(2 * time.Minute):
				t.Fatal("connect did not exit")
				return result{}
			}
		}
	}},
}

func libConfig(t *testing.T, keyFile, keyringFile string) *noisetor.Config {
	t.Helper()
	key, err := noisetor.LoadPrivateKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	kr, err := noisetor.LoadKeyring(keyringFile)
	if err != nil {
		t.Fatal(err)
	}
	return &noisetor.Config{StaticKey: key, Keyring: kr}
}

// The peer closes its side first, while the CLI still has hundreds of MiB to
// send: the CLI must send all of it, then its close record, and exit 0
// (WIRE.md §6.4: each direction closes on its own). It used to give up one
// second after the peer's close record, cutting the stream or, worse, ending
// it with a clean close record over missing data, and exit 0 either way.
func TestPipeSendsAllAfterPeerCloses(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	for _, role := range pipeRoles {
		t.Run(role.name, func(t *testing.T) {
			peer, wait := role.run(t, dir, &patternReader{n: pipeBulk})
			defer peer.Close()
			if _, err := peer.Write([]byte("short answer")); err != nil {
				t.Fatal(err)
			}
			if err := peer.(*noisetor.Conn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := checkPattern(peer)
			if err != nil || got != pipeBulk {
				t.Errorf("peer received %d of %d bytes, then %v; want all, then a clean end", got, pipeBulk, err)
			}
			r := wait()
			r.want(t, exitOK, "")
			if r.stdout != "short answer" {
				t.Errorf("CLI received %q", r.stdout)
			}
		})
	}
}

// A peer that closes completely cannot receive the rest: the CLI must exit
// non-zero and say that not all input was delivered.
func TestPipeFailsWhenPeerCannotReceive(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	for _, role := range pipeRoles {
		t.Run(role.name, func(t *testing.T) {
			peer, wait := role.run(t, dir, &patternReader{n: pipeBulk})
			if _, err := io.CopyN(io.Discard, peer, 1<<20); err != nil {
				t.Fatal(err)
			}
			peer.Close()
			wait().want(t, exitFail, "not all input was delivered")
		})
	}
}

// When the CLI cannot read all of its input, the peer must see a cut stream,
// never a close record: a clean end would tell it that it has everything.
// Here the peer has closed its side first, so the CLI's own Close used to
// find no Write in flight and send a close record after 1 MiB.
func TestPipeInputErrorIsNoCleanEnd(t *testing.T) {
	dir := t.TempDir()
	ceremony(t, dir)
	readErr := errors.New("input device failed")
	for _, role := range pipeRoles {
		t.Run(role.name, func(t *testing.T) {
			// The input fails only once the peer has closed its side,
			// which is the case this test is for (and a CloseWrite on a
			// connection the CLI has already cut would fail).
			gate := make(chan struct{})
			peer, wait := role.run(t, dir, &patternReader{n: 1 << 20, failErr: readErr, gate: gate})
			defer peer.Close()
			if err := peer.(*noisetor.Conn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			close(gate)
			// A cut, never a clean end: the stream ends without a close
			// record (io.ErrUnexpectedEOF) or is reset, when the CLI's
			// socket closes with our close record unread.
			got, err := checkPattern(peer)
			if err == nil || errors.Is(err, io.EOF) || !(errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)) {
				t.Errorf("peer received %d bytes, then %v; want a truncation (io.ErrUnexpectedEOF or a reset)", got, err)
			}
			r := wait()
			r.want(t, exitFail, "not all input was delivered")
			if !strings.Contains(r.stderr, readErr.Error()) {
				t.Errorf("stderr does not give the cause: %s", r.stderr)
			}
		})
	}
}
