package noisetor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"time"

	"github.com/cretz/bine/control"
)

// The client of tor's control protocol.

// A torControl is a control-port connection with one reader goroutine, so
// that commands from many goroutines and asynchronous events interleave
// safely. (bine's control.Conn reads replies in the calling goroutine, which
// races with its own event loop.) bine parses the replies and authenticates.
type torControl struct {
	tc      *textproto.Conn
	c       *control.Conn
	onEvent func(code, data string)

	wmu     sync.Mutex // held while queueing and writing a command
	mu      sync.Mutex
	pending []chan *control.Response // FIFO: tor answers commands in order
	done    chan struct{}            // closed when the reader stops
	err     error                    // why; set before done is closed
}

func dialTorControl(ctx context.Context, network, addr, password string, onEvent func(code, data string)) (*torControl, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("%w: control port %s: %w", ErrTorDown, addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(30 * time.Second))
	}
	tc := textproto.NewConn(conn)
	c := control.NewConn(tc)
	if err := authenticateTor(c, password); err != nil {
		tc.Close()
		return nil, fmt.Errorf("%w: %s: %v", ErrTorAuth, addr, err)
	}
	conn.SetDeadline(time.Time{})
	k := &torControl{tc: tc, c: c, onEvent: onEvent, done: make(chan struct{})}
	go k.readLoop()
	return k, nil
}

// authenticateTor authenticates with the password if one is given and tor
// accepts passwords, and otherwise as bine chooses (NULL, SAFECOOKIE).
func authenticateTor(c *control.Conn, password string) error {
	pi, err := c.ProtocolInfo()
	if err != nil {
		return err
	}
	if password != "" && pi.HasAuthMethod("HASHEDPASSWORD") {
		// tor takes the password hex-encoded; it never appears in an error.
		if _, err := c.SendRequest("AUTHENTICATE %x", password); err != nil {
			return err
		}
		c.Authenticated = true
		return nil
	}
	if password == "" && !pi.HasAuthMethod("NULL") && !pi.HasAuthMethod("SAFECOOKIE") && pi.HasAuthMethod("HASHEDPASSWORD") {
		return errors.New("tor requires a control port password")
	}
	return c.Authenticate(password)
}

func (k *torControl) readLoop() {
	for {
		resp, err := k.c.ReadResponse()
		if err != nil {
			k.mu.Lock()
			k.err = err
			pending := k.pending
			k.pending = nil
			close(k.done)
			k.mu.Unlock()
			for _, ch := range pending {
				close(ch)
			}
			return
		}
		if resp.Err.Code == control.StatusAsyncEvent {
			line := resp.Reply
			if len(resp.Data) > 0 {
				line = resp.Data[0]
			}
			code, data, _ := strings.Cut(line, " ")
			k.onEvent(code, data)
			continue
		}
		k.mu.Lock()
		var ch chan *control.Response
		if len(k.pending) > 0 {
			ch = k.pending[0]
			k.pending = k.pending[1:]
		}
		k.mu.Unlock()
		if ch != nil {
			ch <- resp
		}
	}
}

// request sends one command line and waits for its reply. name is the
// command's name for errors: the line itself may hold key material and is
// never quoted. Any 2xx reply is success.
func (k *torControl) request(ctx context.Context, name, line string) (*control.Response, error) {
	resps, errs := k.requestBatch(ctx, []string{name}, []string{line})
	return resps[0], errs[0]
}

// requestBatch sends the command lines in one write and waits for each
// reply, returning them and their errors as request would. tor runs every
// complete command in its input buffer before it does anything else
// (connection_control_process_inbuf in tor's control.c loops until the
// buffer is empty), so no cell is handled between them.
func (k *torControl) requestBatch(ctx context.Context, names, lines []string) ([]*control.Response, []error) {
	resps, errs := make([]*control.Response, len(lines)), make([]error, len(lines))
	fail := func(err error) ([]*control.Response, []error) {
		for i := range errs {
			if errs[i] == nil && resps[i] == nil {
				errs[i] = err
			}
		}
		return resps, errs
	}
	chs := make([]chan *control.Response, len(lines))
	var b strings.Builder
	for i, line := range lines {
		chs[i] = make(chan *control.Response, 1)
		b.WriteString(line + "\r\n")
	}
	k.wmu.Lock()
	k.mu.Lock()
	select {
	case <-k.done:
		k.mu.Unlock()
		k.wmu.Unlock()
		return fail(fmt.Errorf("%w: control connection lost: %v", ErrTorDown, k.err))
	default:
	}
	k.pending = append(k.pending, chs...)
	k.mu.Unlock()
	// One Write on the empty buffer: one that is larger than the buffer
	// goes to the socket directly, a smaller one on Flush.
	_, err := k.tc.W.Write([]byte(b.String()))
	if err == nil {
		err = k.tc.W.Flush()
	}
	k.wmu.Unlock()
	if err != nil {
		k.tc.Close()
		return fail(fmt.Errorf("%w: control connection: %v", ErrTorDown, err))
	}
	for i, ch := range chs {
		select {
		case resp, ok := <-ch:
			if !ok {
				return fail(fmt.Errorf("%w: control connection lost: %v", ErrTorDown, k.err))
			}
			resps[i] = resp
			if resp.Err.Code/100 != 2 {
				errs[i] = fmt.Errorf("noisetor: tor refused %s: %d %s", names[i], resp.Err.Code, resp.Reply)
			}
		case <-ctx.Done():
			// The replies, when they come, go to the buffered channels and
			// are dropped.
			for j := i; j < len(chs); j++ {
				errs[j] = fmt.Errorf("noisetor: tor %s: %w", names[j], ctx.Err())
			}
			return resps, errs
		}
	}
	return resps, errs
}

// getInfo runs GETINFO and returns the values by key.
func (k *torControl) getInfo(ctx context.Context, keys ...string) (map[string]string, error) {
	resp, err := k.request(ctx, "GETINFO", "GETINFO "+strings.Join(keys, " "))
	if err != nil {
		return nil, err
	}
	m := make(map[string]string, len(keys))
	for _, d := range resp.Data {
		key, val, _ := strings.Cut(d, "=")
		// Multi-line values arrive as "key=\r\n<lines>".
		m[key] = strings.TrimPrefix(val, "\r\n")
	}
	return m, nil
}

func (k *torControl) close() {
	if k != nil {
		k.tc.Close()
		<-k.done
	}
}
