package tortest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// A torProc is one tor run by the fixture.
type torProc struct {
	name    string
	dir     string // DataDirectory; holds torrc and notice.log
	tor     torExe
	torrc   string
	orPort  int // relays only
	dirPort int // the authority only

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{} // closed when cmd has exited
	out    *tailBuffer   // tor's stdout and stderr
	waitEr error
}

// start writes the torrc and launches tor. tor runs in its own process
// group (a terminal's Ctrl-C reaches only the test binary) and, on Linux,
// gets SIGKILL when the test binary dies, even by a panic or a
// go test -timeout; the torrc's __OwningControllerProcess is the fallback
// elsewhere (tor polls it every 15 s).
func (p *torProc) start() error {
	path := filepath.Join(p.dir, "torrc")
	if err := os.WriteFile(path, []byte(p.torrc), 0o600); err != nil {
		return fmt.Errorf("tortest: %w", err)
	}
	// Each run appends to notice.log; mark where this one starts, so that
	// errors quote this run's lines.
	logPath := filepath.Join(p.dir, "notice.log")
	if f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
		fmt.Fprintf(f, "---- tortest: starting %s at %s\n", p.name, time.Now().Format(time.TimeOnly))
		f.Close()
	}
	cmd := p.tor.command(context.Background(), "-f", path)
	cmd.SysProcAttr = sysProcAttr()
	out := &tailBuffer{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("tortest: starting tor %s: %w", p.name, err)
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.done, p.out, p.waitEr = cmd, done, out, nil
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.waitEr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// exitError returns nil while tor runs, and an error saying why it stopped
// otherwise. A port clash is reported as errPortInUse.
func (p *torProc) exitError() error {
	p.mu.Lock()
	done, cmd := p.done, p.cmd
	p.mu.Unlock()
	if cmd == nil {
		return fmt.Errorf("tortest: tor %s is not running", p.name)
	}
	select {
	case <-done:
	default:
		return nil
	}
	p.mu.Lock()
	waitErr, out := p.waitEr, p.out.String()
	p.mu.Unlock()
	tail := p.logTail()
	if strings.Contains(tail, "Address already in use") || strings.Contains(out, "Address already in use") {
		return fmt.Errorf("%w: tor %s could not bind its port:\n%s", errPortInUse, p.name, tail)
	}
	return fmt.Errorf("tortest: tor %s exited (%v):\n%s%s", p.name, waitErr, out, tail)
}

// pid returns the process id of the tor last started, or 0.
//
//lint:ignore U1000 used by the tests that build with -tags embedtor
func (p *torProc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// running reports whether the tor process is alive.
func (p *torProc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to tor's process group, then SIGKILL if tor has not
// exited after 3 s, and waits for it. With ShutdownWaitLength 0 tor exits at
// once on SIGTERM.
func (p *torProc) stop() {
	p.signal(false)
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return
	}
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		p.signal(true)
		<-done
	}
}

// kill sends SIGKILL to tor's process group and waits for tor to exit: a
// crash, as far as anything talking to it can tell.
func (p *torProc) kill() {
	p.signal(true)
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done != nil {
		<-done
	}
}

func (p *torProc) signal(kill bool) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	signalGroup(cmd.Process, kill)
}

// logTail returns the end of this run's notice.log.
func (p *torProc) logTail() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "notice.log"))
	if i := bytes.LastIndex(b, []byte("---- tortest: starting")); i >= 0 {
		b = b[i:]
	}
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
