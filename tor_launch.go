package noisetor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cretz/bine/process"
)

// Launching tor for StartTor: its command line and Unix sockets, the checks
// of its executable, its output.

// Names of the Unix sockets of a launched tor, in its data directory.
const (
	torControlSocket = "control"
	torSocksSocket   = "socks"
)

// maxUnixSocketPath is the longest path a Unix socket can have on Linux
// (sun_path is 108 bytes, with the terminating NUL), which is also below the
// limit of the BSDs and macOS (104).
const maxUnixSocketPath = 103

// torSocketPath returns the path of a Unix socket in a launched tor's data
// directory, or an error if the path is too long for one.
func torSocketPath(dir, name string) (string, error) {
	p := filepath.Join(dir, name)
	if len(p) > maxUnixSocketPath {
		return "", fmt.Errorf("noisetor: TorConfig.DataDir %s is too long: tor's Unix socket %s would exceed %d bytes; use a shorter path", dir, name, maxUnixSocketPath)
	}
	return p, nil
}

// launchedSocksTimeout is the SocksTimeout of the tors StartTor launches
// (tor's default is 2 minutes): how long tor keeps a SOCKS request waiting
// for a circuit before it gives up and says why.
const launchedSocksTimeout = 20 * time.Second

// launch starts the tor process and returns the path of its control socket.
//
// A launched tor has no TCP port at all: its control port and SOCKS port are
// Unix sockets in the data directory, which is mode 0700, so no other local
// user can reach them. (On TCP, any local user could use the SOCKS port, and
// with it this machine's client-authorization keys, to reach the services
// that authorize this machine.)
func (s *torSession) launch(ctx context.Context) (string, error) {
	t := s.t
	dir := t.cfg.DataDir
	ctlPath, err := torSocketPath(dir, torControlSocket)
	if err != nil {
		return "", err
	}
	socksPath, err := torSocketPath(dir, torSocksSocket)
	if err != nil {
		return "", err
	}
	torrc := filepath.Join(dir, "noisetor.torrc")
	if err := os.WriteFile(torrc, []byte(strings.Join(t.cfg.Torrc, "\n")+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("noisetor: writing torrc: %w", err)
	}
	// Left by a tor that was killed; the data directory's lock keeps a
	// second tor from using the directory.
	os.Remove(ctlPath)
	os.Remove(socksPath)
	args := []string{
		"-f", torrc,
		"--DataDirectory", dir,
		"--ControlPort", "unix:" + strconv.Quote(ctlPath),
		"--CookieAuthentication", "1",
		// ExtendedErrors: SOCKS replies say why an onion service failed
		// (0xF0-0xF7). OnionTrafficOnly: this SOCKS port only reaches onion
		// services, so nothing can use it to leave Tor by an exit relay.
		"--SocksPort", "unix:" + strconv.Quote(socksPath) + " ExtendedErrors OnionTrafficOnly",
		"--SocksTimeout", strconv.Itoa(int(launchedSocksTimeout / time.Second)),
		// Until TAKEOWNERSHIP: tor exits if this process dies.
		"__OwningControllerProcess", strconv.Itoa(os.Getpid()),
	}
	args = append(args, t.cfg.ExtraArgs...)
	creator := t.cfg.ProcessCreator
	if creator == nil {
		s.procOut = &torOutput{log: t.log}
		creator = process.CmdCreatorFunc(func(ctx context.Context, args ...string) (*exec.Cmd, error) {
			cmd := exec.CommandContext(ctx, t.exe, args...)
			cmd.Stdout, cmd.Stderr = s.procOut, s.procOut
			cmd.WaitDelay = 2 * time.Second
			return cmd, nil
		})
	}
	// The tor process's life is bounded by close, never by ctx: ctx only
	// bounds this start-up (bine's exec.CommandContext kills tor when its
	// context ends).
	var procCtx context.Context
	procCtx, s.procCancel = context.WithCancel(context.Background())
	p, err := creator.New(procCtx, args...)
	if err != nil {
		s.procCancel()
		return "", fmt.Errorf("noisetor: creating tor process: %w", err)
	}
	if err := p.Start(); err != nil {
		s.procCancel()
		return "", fmt.Errorf("noisetor: starting tor: %w", err)
	}
	s.proc, s.procDone = p, make(chan struct{})
	go func() {
		err := p.Wait()
		if err == nil {
			err = errors.New("exited")
		}
		s.end(fmt.Errorf("%w: tor process: %v%s", ErrTorDown, err, s.procOut.tail()))
		close(s.procDone)
	}()
	// Poll for the socket: tor creates it within milliseconds of starting,
	// and a restart is only as quick as this loop notices it.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if st, err := os.Stat(ctlPath); err == nil && st.Mode().Type() == fs.ModeSocket {
			return ctlPath, nil
		}
		select {
		case <-s.done:
			return "", s.err
		case <-ctx.Done():
			return "", fmt.Errorf("noisetor: tor opened no control socket: %w%s", ctx.Err(), s.procOut.tail())
		case <-tick.C:
		}
	}
}

// torPoW says whether a tor has the onion-service proof-of-work module.
type torPoW int

const (
	powUnknown torPoW = iota // attached, or a custom ProcessCreator
	powYes
	powNo
)

// checkTorExecutable runs "tor --version", so that a too-old tor is
// reported as such rather than as a failure to start, and
// "tor --list-modules", which says whether it has proof-of-work.
func checkTorExecutable(ctx context.Context, exe string) (torPoW, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, exe, "--version").Output()
	if err != nil {
		return powUnknown, fmt.Errorf("noisetor: running %s --version: %w", exe, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	if err := checkTorVersion(line); err != nil {
		return powUnknown, err
	}
	out, err = exec.CommandContext(ctx, exe, "--list-modules").Output()
	if err != nil {
		return powUnknown, nil
	}
	for _, l := range strings.Split(string(out), "\n") {
		switch strings.TrimSpace(l) {
		case "pow: yes":
			return powYes, nil
		case "pow: no":
			return powNo, nil
		}
	}
	return powUnknown, nil
}

// torOutput receives tor's stdout and stderr and passes its lines to the
// logger: warnings and errors at Warn, the rest at Debug. It keeps the last
// lines for error messages.
type torOutput struct {
	log  *slog.Logger
	mu   sync.Mutex
	buf  []byte
	last []string
}

func (o *torOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf = append(o.buf, p...)
	for {
		i := bytes.IndexByte(o.buf, '\n')
		if i < 0 {
			if len(o.buf) > 4096 {
				o.buf = o.buf[:0]
			}
			return len(p), nil
		}
		line := string(bytes.TrimSpace(o.buf[:i]))
		o.buf = o.buf[i+1:]
		if line == "" {
			continue
		}
		if len(o.last) == 5 {
			o.last = o.last[1:]
		}
		o.last = append(o.last, line)
		level := slog.LevelDebug
		if strings.Contains(line, "[warn]") || strings.Contains(line, "[err]") {
			level = slog.LevelWarn
		}
		o.log.Log(context.Background(), level, "tor: "+line)
	}
}

// tail returns the last lines tor printed, for an error message.
func (o *torOutput) tail() string {
	if o == nil {
		return ""
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.last) == 0 {
		return ""
	}
	return "; tor said: " + strings.Join(o.last, " | ")
}
