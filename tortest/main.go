package tortest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"time"

	"github.com/noisetor/noisetor/internal/libtor"
)

// RequireEnv lists the environment variables that, when set to a non-empty
// value, make a missing tor a test failure instead of a skip. CI sets one.
var RequireEnv = []string{"TORTEST_REQUIRE", "NOISETOR_REQUIRE_ALL"}

var shared struct {
	mu  sync.Mutex
	n   *Network
	err error
	ran bool
}

// Shared returns the network shared by the tests of this test binary,
// starting it on the first call; Main stops it after the tests. If
// Available reports an error (tor or tor-gencert is not installed), Shared
// skips t, unless one of RequireEnv is set, in which case it fails t.
func Shared(t TB) *Network {
	t.Helper()
	if err := Available(); err != nil {
		if required() {
			t.Fatalf("%v (required: %s is set)", err, requiredBy())
		}
		if s, ok := t.(interface{ Skip(...any) }); ok {
			s.Skip(err)
		}
		t.Fatalf("%v", err)
	}
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if !shared.ran {
		shared.ran = true
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		shared.n, shared.err = Start(ctx, &Options{Logf: t.Logf})
		cancel()
		if shared.err == nil {
			// t.Logf must not outlive this test.
			shared.n.logf = func(string, ...any) {}
			t.Logf("tortest: shared private Tor network (%s) ready in %.1fs (%s)", shared.n.torName(), shared.n.StartupTime.Seconds(), shared.n.Dir)
		}
	}
	if shared.err != nil {
		t.Fatalf("%v", shared.err)
	}
	return shared.n
}

// M is what Main and Run need of a *testing.M. It is an interface so that a
// program that uses tortest outside tests (noisetor demo) does not link
// package testing.
type M interface{ Run() int }

// Main runs the tests and exits: os.Exit(Run(m)). Call it from TestMain
// with its *testing.M.
func Main(m M) { os.Exit(Run(m)) }

// Run runs the tests (m.Run), then stops the shared network if a test
// started one, and returns the tests' exit code. Use it instead of Main
// when TestMain has more to do; stop tors that use the network first.
func Run(m M) int {
	code := m.Run()
	if err := CloseShared(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	return code
}

// CloseShared stops the shared network, if one was started. Shared starts
// a new one if called afterwards.
func CloseShared() error {
	shared.mu.Lock()
	n := shared.n
	shared.n, shared.err, shared.ran = nil, nil, false
	shared.mu.Unlock()
	if n == nil {
		return nil
	}
	return n.Close()
}

// Available reports whether Start can run a network with the default
// Options: whether tor and tor-gencert are installed (an error wrapping
// ErrNoTor if not) or, in a binary built with -tags embedtor, whether the
// embedded tor can run one (ErrEmbeddedClientOnly if not).
func Available() error {
	if libtor.Available {
		_, err := embeddedTor()
		return err
	}
	for _, exe := range []string{"tor", "tor-gencert"} {
		if _, err := exec.LookPath(exe); err != nil {
			return fmt.Errorf("%w: %v", ErrNoTor, err)
		}
	}
	return nil
}

func required() bool { return requiredBy() != "" }

func requiredBy() string {
	for _, v := range RequireEnv {
		if os.Getenv(v) != "" {
			return v
		}
	}
	return ""
}
