//go:build embedtor && cgo

package libtor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/cretz/bine/process"
)

// NewCreator returns a bine process.Creator that runs the linked-in tor in a
// child process: this same executable, started with ChildArg. Each tor is
// its own process, so any number can run and tor can be restarted, and a
// tor crash or tor's signal handling cannot touch the Go process. The child
// exits when its owning control connection closes: on Close, when the
// context given to New (bine: to tor.Start) is cancelled, and when this
// process dies, however it dies.
//
// tor's standard output and error go to out; nil means os.Stderr. (Never
// this program's standard output by default: it may carry data.)
func NewCreator(out io.Writer) process.Creator { return childCreator{out: out} }

type childCreator struct{ out io.Writer }

func (c childCreator) New(ctx context.Context, args ...string) (process.Process, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	out := c.out
	if out == nil {
		out = os.Stderr
	}
	return &childProcess{ctx: ctx, args: args, out: out}, nil
}

type childProcess struct {
	ctx  context.Context
	args []string
	out  io.Writer

	mu      sync.Mutex
	owner   *ownerSocket
	started bool
	done    chan struct{} // closed when the child has been waited for
	err     error
}

// EmbeddedControlConn implements process.Process: an authenticated control
// connection; closing it stops tor. Call it before Start.
func (p *childProcess) EmbeddedControlConn() (net.Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return embeddedControlConn(&p.owner, p.started)
}

// Start implements process.Process.
func (p *childProcess) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started {
		return errors.New("noisetor: embedded tor: Start called twice")
	}
	p.started = true
	if p.owner == nil {
		o, err := newOwnerSocket()
		if err != nil {
			return err
		}
		p.owner = o
	}
	owner := p.owner
	exe, err := Executable()
	if err != nil {
		// Closing tor's end makes a control connection already handed to
		// bine read EOF instead of waiting for a tor that never ran.
		owner.releaseTorEnd()
		owner.closeUnlessGiven()
		return fmt.Errorf("noisetor: embedded tor: cannot find own executable: %w", err)
	}

	// The child's tor end becomes descriptor 3 (ExtraFiles[0]).
	args := append([]string{ChildArg}, p.args...)
	args = append(args, "__OwningControllerFD", "3", "--RunAsDaemon", "0")
	cmd := exec.CommandContext(p.ctx, exe, args...)
	cmd.Args[0] = os.Args[0]
	cmd.Stdout, cmd.Stderr = p.out, p.out
	torEnd := os.NewFile(uintptr(owner.torFD), "tor-owner")
	owner.torFD = -1 // now torEnd's
	cmd.ExtraFiles = []*os.File{torEnd}
	// Its own process group: a terminal's Ctrl-C goes to the program, which
	// stops tor in its own time; tor exits anyway if the program dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		owner.conn.Close()
		return cmd.Process.Signal(syscall.SIGTERM)
	}
	cmd.WaitDelay = 10 * time.Second
	err = cmd.Start()
	torEnd.Close()
	if err != nil {
		// torEnd is closed: as above, a handed-out connection reads EOF.
		owner.closeUnlessGiven()
		return fmt.Errorf("noisetor: starting embedded tor child process: %w", err)
	}
	p.done = make(chan struct{})
	go func() {
		err := cmd.Wait()
		owner.closeUnlessGiven()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	return nil
}

// Wait implements process.Process. It may be called more than once.
func (p *childProcess) Wait() error {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return errors.New("noisetor: embedded tor was not started")
	}
	<-done
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return fmt.Errorf("noisetor: embedded tor child process: %w", p.err)
	}
	return nil
}
