//go:build embedtor && cgo

package libtor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/cretz/bine/process"
)

// In-process tor lifecycle: tor's global state allows one tor_run_main per
// process. A second concurrent one dies on an assertion in
// hs_circuitmap_init, and one started after the first returned dies on a
// mutex left behind by the first one's worker threads (tor bug 23847); both
// abort the whole process.
const (
	inProcessNever int32 = iota
	inProcessRunning
	inProcessExited
)

var inProcessState atomic.Int32

// inProcessArgs come before bine's arguments.
//
// __DisableSignalHandlers: otherwise tor takes SIGINT, SIGTERM, SIGHUP,
// SIGUSR1, SIGUSR2, SIGPIPE, SIGXFSZ and SIGCHLD from the Go runtime while
// it runs: Ctrl-C would stop tor rather than the program and signal.Notify
// would never fire. (tor then cannot reap pluggable-transport children; use
// NewCreator for those.)
//
// DisableDebuggerAttachment 0: otherwise tor makes the whole Go process
// undumpable (no core dumps, no ptrace, /proc/self owned by root).
var inProcessArgs = []string{"__DisableSignalHandlers", "1", "--DisableDebuggerAttachment", "0"}

// NewInProcessCreator returns a bine process.Creator that runs the linked-in
// tor on a thread of this process. Only the first Start in the process
// lifetime succeeds; later ones return an error wrapping ErrInProcessUsed.
// Cancelling the context given to New (bine: to tor.Start) stops tor.
func NewInProcessCreator() process.Creator { return inProcessCreator{} }

type inProcessCreator struct{}

func (inProcessCreator) New(ctx context.Context, args ...string) (process.Process, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	return &inProcess{ctx: ctx, args: args}, nil
}

type inProcess struct {
	ctx  context.Context
	args []string

	mu      sync.Mutex
	owner   *ownerSocket
	started bool
	done    chan struct{} // closed when tor_run_main has returned
	rc      int
}

// EmbeddedControlConn implements process.Process: an authenticated control
// connection; closing it stops tor. Call it before Start.
func (p *inProcess) EmbeddedControlConn() (net.Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return embeddedControlConn(&p.owner, p.started)
}

func claimInProcess() error {
	if inProcessState.CompareAndSwap(inProcessNever, inProcessRunning) {
		return nil
	}
	if inProcessState.Load() == inProcessRunning {
		return fmt.Errorf("%w: one is running now, and a second would abort the process", ErrInProcessUsed)
	}
	return fmt.Errorf("%w: an earlier one has exited, and restarting it would abort the process", ErrInProcessUsed)
}

// Start implements process.Process: tor_run_main runs on its own goroutine,
// which cgo keeps on one OS thread until tor returns.
func (p *inProcess) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started {
		return errors.New("noisetor: embedded tor: Start called twice")
	}
	p.started = true
	if p.owner == nil {
		// Kept even when bine uses a TCP control port: closing it is how
		// cancelling the context stops tor.
		o, err := newOwnerSocket()
		if err != nil {
			return err
		}
		p.owner = o
	}
	owner := p.owner
	if err := claimInProcess(); err != nil {
		// tor never saw its end: closing it makes a control connection
		// already handed to bine read EOF. Otherwise bine's error path
		// (QUIT, then wait for the reply) would block forever.
		owner.releaseTorEnd()
		owner.closeUnlessGiven()
		return err
	}

	args := append([]string{"tor"}, inProcessArgs...)
	args = append(args, p.args...)
	// After bine's arguments, so that they win: RunAsDaemon 1 would fork the
	// Go process.
	args = append(args, "__OwningControllerFD", strconv.Itoa(owner.torFD), "--RunAsDaemon", "0")

	p.done = make(chan struct{})
	go func() {
		rc := runTor(args)
		restoreCrashSignals()
		p.mu.Lock()
		p.rc = rc
		owner.releaseTorEnd()
		owner.closeUnlessGiven()
		p.mu.Unlock()
		inProcessState.Store(inProcessExited)
		close(p.done)
	}()
	go func() {
		select {
		case <-p.ctx.Done():
			// tor: "Owning controller connection has closed -- exiting now."
			owner.conn.Close()
		case <-p.done:
		}
	}()
	return nil
}

// Wait implements process.Process.
func (p *inProcess) Wait() error {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return errors.New("noisetor: embedded tor was not started")
	}
	<-done
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rc != 0 {
		return fmt.Errorf("noisetor: embedded tor exited with status %d", p.rc)
	}
	return nil
}
