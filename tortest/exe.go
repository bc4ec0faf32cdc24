package tortest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"sync"

	"github.com/noisetor/noisetor/internal/libtor"
)

// A torExe says how to run tor: a tor executable, or this binary started
// again as the tor linked into it.
type torExe struct {
	path string   // the executable
	pre  []string // arguments before tor's own: libtor.ChildArg for the embedded tor
}

// embedded reports whether e runs the tor linked into this binary.
func (e torExe) embedded() bool { return len(e.pre) > 0 }

// command returns the command that runs tor with args.
func (e torExe) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, e.path, append(append([]string(nil), e.pre...), args...)...)
	if e.embedded() {
		cmd.Args[0] = "tor" // what ps shows; the binary still runs its own code
	}
	return cmd
}

// findTor returns the tor executable at path (looked up in PATH), or, when
// path is "" in a binary built with -tags embedtor, the embedded tor.
func findTor(path string) (torExe, error) {
	if path == "" && libtor.Available {
		return embeddedTor()
	}
	if path == "" {
		path = "tor"
	}
	p, err := exec.LookPath(path)
	if err != nil {
		return torExe{}, fmt.Errorf("%w: %v", ErrNoTor, err)
	}
	return torExe{path: p}, nil
}

// embeddedTor is the tor linked into this binary, run the way the library
// runs it: this executable started again with libtor.ChildArg, which makes
// package libtor run tor during initialization, before any test code. It
// must have been built with tor's relay and directory-authority modules,
// which the network's tors use; tor itself is asked.
var embeddedTor = sync.OnceValues(func() (torExe, error) {
	exe, err := libtor.Executable()
	if err != nil {
		return torExe{}, fmt.Errorf("tortest: cannot find this binary to run its embedded tor: %w", err)
	}
	e := torExe{path: exe, pre: []string{libtor.ChildArg}}
	out, err := e.command(context.Background(), "--list-modules").Output()
	if err != nil && len(out) == 0 {
		return torExe{}, fmt.Errorf("tortest: running the embedded tor: %w", err)
	}
	for _, m := range []string{"relay", "dirauth"} {
		if !bytes.Contains(out, []byte("\n"+m+": yes\n")) && !bytes.HasPrefix(out, []byte(m+": yes\n")) {
			return torExe{}, ErrEmbeddedClientOnly
		}
	}
	return e, nil
})

// ErrEmbeddedClientOnly is returned by Start and Available in a binary built
// with -tags embedtor whose embedded tor lacks the relay and
// directory-authority modules that the network's tors need.
var ErrEmbeddedClientOnly = errors.New("tortest: the embedded tor was built without its relay and directory-authority modules (scripts/build-libtor.sh --client-only); rebuild it with scripts/build-libtor.sh to run the test network on it")
