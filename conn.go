package noisetor

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// A Conn is a noisetor connection: a Noise session over an underlying
// net.Conn. It implements net.Conn. Read and Write may be called concurrently
// with each other, and Close from any goroutine. The handshake runs on the
// first Read or Write unless HandshakeContext is called first.
type Conn struct {
	conn     net.Conn
	cfg      *Config
	isClient bool
	addr     string // the dialed address, for logs

	// Set before the handshake by HandshakeInitiate/Respond and the Listener.
	ephemeral       *PrivateKey
	remoteStatic    PublicKey
	guard           *listener                          // the Listener whose admission rules apply
	cancelHandshake atomic.Pointer[context.CancelFunc] // set with guard, cleared when the handshake ends
	dropReason      atomic.Pointer[string]             // why the Listener closed it mid-handshake

	// The Listener's admission state (admission.go), under its mutex.
	source          string
	unauthenticated bool
	preambleTimer   *time.Timer
	turn            *peerTurns
	turnStart       time.Time
	peerDH          chan struct{} // the peer's share of the DH slots

	live *liveConns // tracks c once established

	// Set by the responder's handshake.
	handshakeStart time.Time
	authenticated  bool   // the caller proved a keyring key
	refusal        string // why an unauthenticated caller was refused, in fixed words

	handshakeMu   sync.Mutex
	handshakeDone atomic.Bool
	handshakeErr  error
	state         ConnectionState // final once handshakeDone

	readDeadline  atomic.Int64 // UnixNano, 0 = none
	writeDeadline atomic.Int64

	// activeCall counts Writes in flight (in steps of 2); bit 0 is set once
	// Close has begun. As in crypto/tls, a Close that races a Write only
	// closes the socket instead of queueing a close record behind the Write.
	activeCall atomic.Int32

	in  inState
	out outState
}

type inState struct {
	mu   sync.Mutex
	half *halfState
	// Received bytes not yet opened are buf[start:end]. buf is small while
	// no pooled buffer is held: an idle connection, or one that carries only
	// small records, holds no large buffer, and a small record costs one
	// read. A frame larger than small, or read-ahead of one, moves to a
	// pooled big buffer, which large reads fill several frames at a time and
	// which goes back to the pool as soon as it holds nothing unreturned.
	small      [smallRead]byte
	big        *[readBufSize]byte
	buf        []byte
	start, end int
	plain      []byte // decrypted data not yet returned, inside buf
	idle       int    // records in a row that carried no data
	err        error  // sticky
	// broken is set once a frame failed to authenticate: Close then sends
	// no close record, so the peer sees a truncation, not a clean end.
	broken atomic.Bool
}

type outState struct {
	mu        sync.Mutex
	half      *halfState
	pending   *[]byte // sealed bytes a timed-out Write left unsent
	pendingAt int
	// cut is set while the last Write that returned has failed to take all
	// of its bytes: the caller meant to send more than the peer got, so a
	// close record, which tells the peer it has everything, would be a lie.
	cut    bool
	closed bool // close record sent
	err    error
}

// maxIdleRecords bounds consecutive records without data (empty DATA,
// REKEY), as crypto/tls bounds empty records: a peer cannot keep a Read busy
// decrypting without making progress.
const maxIdleRecords = 16

// smallRead is the inline receive buffer: a frame of up to this size (a
// body of up to smallRead-19 bytes) needs no pooled buffer. Its size makes a
// Conn 896 bytes, one of the allocator's size classes. readBufSize is the
// pooled one: large reads need fewer system calls and wake-ups.
const (
	smallRead   = 448
	readBufSize = 4 * maxFrame
)

var readBufPool = sync.Pool{New: func() any { return new([readBufSize]byte) }}

// writeBatch is how many full frames one Write seals before it writes them.
const (
	writeBatch = 4
	maxFrame   = frameHeader + maxMessage
	rekeyFrame = frameHeader + 1 + aeadOverhead
)

var writeBufPool = sync.Pool{New: func() any {
	b := make([]byte, 0, writeBatch*maxFrame+rekeyFrame)
	return &b
}}

// smallWrite is the most data a Write seals into a small buffer. Most
// Writes (requests, responses, protocol messages) are small; without a small
// buffer each would hold a 256 KiB batch buffer for as long as it is blocked
// on a slow peer or left pending by a timeout.
const smallWrite = 16 << 10

var smallWriteBufPool = sync.Pool{New: func() any {
	b := make([]byte, 0, frameHeader+1+smallWrite+aeadOverhead+rekeyFrame)
	return &b
}}

// getWriteBuf returns a buffer for sealing the next n bytes of a Write.
func getWriteBuf(n int) *[]byte {
	if n <= smallWrite {
		return smallWriteBufPool.Get().(*[]byte)
	}
	return writeBufPool.Get().(*[]byte)
}

func putWriteBuf(p *[]byte) {
	if cap(*p) >= writeBatch*maxFrame {
		writeBufPool.Put(p)
	} else {
		smallWriteBufPool.Put(p)
	}
}

// Client returns a new client-side (initiator) connection over conn that
// authenticates the keyring peer named peer. The handshake runs on first use
// or on HandshakeContext.
func Client(conn net.Conn, cfg *Config, peer string) *Conn {
	c := newConn(conn, cfg, true)
	c.state.Peer.Name = peer
	return c
}

// Server returns a new server-side (responder) connection over conn. The
// caller is authenticated against cfg.Keyring during the handshake.
func Server(conn net.Conn, cfg *Config) *Conn {
	return newConn(conn, cfg, false)
}

func newConn(conn net.Conn, cfg *Config, isClient bool) *Conn {
	c := &Conn{conn: conn, cfg: cfg, isClient: isClient}
	c.state.Initiator = isClient
	if cfg != nil {
		c.state.Pattern = cfg.patterns()[0]
		c.state.CipherSuite = cfg.cipherSuites()[0]
		if cfg.StaticKey != nil {
			c.state.Curve = cfg.StaticKey.PublicKey().Curve()
		}
	}
	return c
}

// HandshakeInitiate is the seed API's handshake_initiate(ephemeral,
// remote_static): it runs the initiator side of a handshake over conn with
// the given ephemeral key (nil: a fresh one from cfg.Random) against the
// responder key remoteStatic, which must be in cfg.Keyring. Ordinary callers
// use Dial or Client; this entry point exists for test vectors and for
// protocols that must fix the ephemeral key.
func HandshakeInitiate(ctx context.Context, conn net.Conn, cfg *Config, ephemeral *PrivateKey, remoteStatic PublicKey) (*Conn, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	peer, ok := cfg.Keyring.ByKey(remoteStatic)
	if !ok {
		return nil, fmt.Errorf("%w: responder key %v is not in the keyring", ErrUnknownPeer, remoteStatic)
	}
	c := Client(conn, cfg, peer.Name)
	c.ephemeral, c.remoteStatic = ephemeral, remoteStatic
	if err := c.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// HandshakeRespond is the seed API's handshake_respond(ephemeral,
// remote_static): the responder side over conn with the given ephemeral key
// (nil: a fresh one). If remoteStatic is not zero, the initiator must prove
// that key; otherwise any keyring peer is accepted. Ordinary callers use
// Listen or Server.
func HandshakeRespond(ctx context.Context, conn net.Conn, cfg *Config, ephemeral *PrivateKey, remoteStatic PublicKey) (*Conn, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	c := Server(conn, cfg)
	c.ephemeral = ephemeral
	if err := c.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	if !remoteStatic.IsZero() && c.state.PeerKey != remoteStatic {
		c.Close()
		return nil, fmt.Errorf("%w: initiator is %q, not the expected key %v", ErrUnknownPeer, c.state.Peer.Name, remoteStatic)
	}
	return c, nil
}

// Handshake runs the handshake if it has not run yet; see HandshakeContext.
func (c *Conn) Handshake() error { return c.HandshakeContext(context.Background()) }

// HandshakeContext runs the handshake if it has not run yet, bounded by ctx and
// by Config.HandshakeTimeout. Any failure closes the underlying connection:
// a half-finished Noise state is never reused. Later calls return the first
// result.
func (c *Conn) HandshakeContext(ctx context.Context) error {
	if c.handshakeDone.Load() {
		return c.handshakeErr
	}
	c.handshakeMu.Lock()
	defer c.handshakeMu.Unlock()
	if c.handshakeDone.Load() {
		return c.handshakeErr
	}
	start := time.Now()
	c.handshakeStart = start
	err := c.cfg.check()
	if err == nil {
		stop, ctxBound := c.handshakeDeadline(ctx)
		if c.isClient {
			err = c.clientHandshake()
		} else {
			err = c.serverHandshake(ctx)
		}
		stop()
		c.ephemeral = nil // a connection keeps nothing of its handshake (see cipherTable.transport)
		if err != nil {
			cerr := ctx.Err()
			if cerr == nil && ctxBound && isTimeout(err) {
				cerr = context.DeadlineExceeded // the socket deadline fired a hair before ctx's timer
			}
			if cerr != nil {
				err = fmt.Errorf("noisetor: handshake abandoned: %w (%v)", cerr, err)
			}
		}
	}
	if err != nil {
		if r := c.dropReason.Load(); r != nil {
			err = &contextError{"dropped by the listener (" + *r + ")", err}
		}
		c.conn.Close()
		c.in.half, c.out.half = nil, nil
	}
	if err == nil {
		// The keyring was checked early in the handshake; a peer removed
		// since then must not get the session (track checks again, in step
		// with keyring changes).
		if err = c.cfg.liveConns().track(c); err != nil {
			c.conn.Close()
			c.in.half, c.out.half = nil, nil
		}
	}
	c.handshakeErr = err
	c.state.HandshakeComplete = err == nil
	c.handshakeDone.Store(true)
	if c.cfg != nil {
		c.logAttempt(time.Since(start), err)
	}
	return err
}

// ConnectionState returns the state of the connection. Before the handshake
// completes, only the configured Pattern, CipherSuite and (for a client)
// Peer.Name are set.
func (c *Conn) ConnectionState() ConnectionState {
	c.handshakeMu.Lock()
	defer c.handshakeMu.Unlock()
	s := c.state
	s.HandshakeHash = append([]byte(nil), s.HandshakeHash...)
	return s
}

// Read reads application data. After the peer's close record it returns
// io.EOF; if the stream ends without one (a reset, a truncation) it returns an
// error that matches io.ErrUnexpectedEOF, so a reader never takes an
// attacker's cut for the end of the data.
func (c *Conn) Read(b []byte) (int, error) {
	if err := c.Handshake(); err != nil {
		return 0, err
	}
	if len(b) == 0 {
		return 0, nil
	}
	in := &c.in
	in.mu.Lock()
	defer in.mu.Unlock()
	for len(in.plain) == 0 {
		if in.err != nil {
			return 0, in.err
		}
		if err := c.readRecord(true); err != nil {
			return 0, err
		}
	}
	n := copy(b, in.plain)
	in.plain = in.plain[n:]
	// Fill b from frames already received, without waiting for more.
	for n < len(b) && len(in.plain) == 0 && in.err == nil && c.readRecord(false) == nil && len(in.plain) > 0 {
		k := copy(b[n:], in.plain)
		in.plain, n = in.plain[k:], n+k
	}
	if len(in.plain) == 0 && in.start == in.end {
		in.releaseBuf()
	}
	return n, nil
}

// releaseBuf returns the big buffer to the pool once it holds nothing.
func (in *inState) releaseBuf() {
	in.plain = nil
	if in.big != nil {
		readBufPool.Put(in.big)
		in.big = nil
	}
	in.buf = in.small[:]
	in.start, in.end = 0, 0
}

// readRecord opens and handles the next frame, reading it first if it has
// not all arrived; without wait it only opens a frame that has (and returns
// errNoFrame otherwise). A timeout leaves what has arrived in place so that
// the next Read resumes; any other error is final.
func (c *Conn) readRecord(wait bool) error {
	in := &c.in
	if in.buf == nil {
		in.buf = in.small[:]
	}
	if in.start == in.end && wait {
		in.releaseBuf()
	}
	size := 0
	for {
		have := in.end - in.start
		if have >= frameHeader {
			size = int(binary.BigEndian.Uint16(in.buf[in.start:]))
			if size < aeadOverhead+1 {
				in.broken.Store(true)
				in.err = fmt.Errorf("%w: %d-byte frame is shorter than the AEAD tag", ErrFrame, size)
				in.releaseBuf()
				return in.err
			}
			if have >= frameHeader+size {
				break
			}
		}
		if !wait {
			return errNoFrame
		}
		if need := frameHeader + size; in.start+need > len(in.buf) {
			// Make room: move what has arrived to the start of the buffer,
			// or to the big buffer if the frame is larger than the small one.
			if in.big == nil && need > len(in.small) {
				in.big = readBufPool.Get().(*[readBufSize]byte)
				in.end = copy(in.big[:], in.buf[in.start:in.end])
				in.buf = in.big[:]
			} else {
				in.end = copy(in.buf, in.buf[in.start:in.end])
			}
			in.start = 0
		}
		n, err := c.conn.Read(in.buf[in.end:])
		in.end += n
		if err != nil {
			if have := in.end - in.start; have >= frameHeader && have >= frameHeader+int(binary.BigEndian.Uint16(in.buf[in.start:])) {
				continue // a whole frame arrived with the error: handle it first
			}
			return in.readFailed(err)
		}
	}
	frame := in.buf[in.start+frameHeader : in.start+frameHeader+size]
	in.start += frameHeader + size
	typ, body, err := in.half.open(frame[:0], frame)
	if err != nil {
		in.broken.Store(true)
		in.err = err
		in.releaseBuf()
		return err
	}
	switch {
	case typ == recordData && len(body) > 0:
		in.plain = body
		in.idle = 0
		return nil
	case typ == recordData || (typ == recordRekey && len(body) == 0):
		// Records without data cost a decryption each and return nothing;
		// a sender needs at most one REKEY between two DATA records.
		if in.idle++; in.idle > maxIdleRecords {
			in.broken.Store(true)
			in.err = fmt.Errorf("%w: %d records in a row without data", ErrFrame, in.idle)
			break
		}
		if typ == recordRekey {
			in.half.rekey()
		}
		return nil
	case typ == recordClose && len(body) == 0:
		in.err = io.EOF
	default:
		in.broken.Store(true)
		in.err = fmt.Errorf("%w: unexpected record type %d", ErrFrame, typ)
	}
	in.releaseBuf()
	return in.err
}

// errNoFrame is readRecord's answer, without wait, when no whole frame has
// arrived.
var errNoFrame = errors.New("noisetor: no whole frame buffered")

func (in *inState) readFailed(err error) error {
	if isTimeout(err) {
		return err // resumable: the partial frame stays
	}
	in.releaseBuf()
	if errors.Is(err, io.EOF) {
		in.err = fmt.Errorf("noisetor: connection ended without a close record: %w", io.ErrUnexpectedEOF)
	} else {
		in.err = err
	}
	return in.err
}

// ErrWriteClosed is returned by Write after CloseWrite.
var ErrWriteClosed = errors.New("noisetor: write after CloseWrite")

// ErrWriteCut is returned (wrapped) by CloseWrite and Close when the last
// Write returned an error before taking all its bytes: no close record is
// sent, so the peer reads a truncation (io.ErrUnexpectedEOF), not a clean
// end of a stream that lacks data.
var ErrWriteCut = errors.New("noisetor: the last Write was cut short")

// Write writes application data, split into frames of at most 65535 bytes.
// If the write deadline passes mid-write, Write returns the bytes it has
// sealed and a timeout error; sealed bytes not yet on the wire stay pending
// and go out first on the next Write (or Close), so the connection stays
// usable.
//
// A Write that returns an error before taking all of b leaves the stream
// cut: until a later Write completes in full, CloseWrite and Close send no
// close record (see ErrWriteCut).
func (c *Conn) Write(b []byte) (n int, err error) {
	for {
		x := c.activeCall.Load()
		if x&1 != 0 {
			return 0, net.ErrClosed
		}
		if c.activeCall.CompareAndSwap(x, x+2) {
			break
		}
	}
	defer c.activeCall.Add(-2)
	if err := c.Handshake(); err != nil {
		return 0, err
	}
	c.out.mu.Lock()
	defer c.out.mu.Unlock()
	if c.out.closed {
		return 0, ErrWriteClosed
	}
	if want := len(b); want > 0 {
		defer func() { c.out.cut = n < want }()
	}
	if c.out.err != nil {
		return 0, c.out.err
	}
	if d := c.writeDeadline.Load(); d != 0 && time.Now().UnixNano() >= d {
		return 0, &net.OpError{Op: "write", Net: "noisetor", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.ErrDeadlineExceeded}
	}
	if err := c.flushPending(); err != nil {
		return 0, err
	}
	written := 0
	for len(b) > 0 {
		bufp := getWriteBuf(len(b))
		out := (*bufp)[:0]
		sealed := 0
		// Room for the next frame and a rekey record before it.
		for len(b) > 0 && cap(out)-len(out) >= frameHeader+1+min(len(b), maxPayload)+aeadOverhead+rekeyFrame {
			out = c.maybeRekey(out)
			n := min(len(b), maxPayload)
			out = c.out.half.seal(out, recordData, b[:n])
			b, sealed = b[n:], sealed+n
		}
		*bufp = out
		if err := c.writeOut(bufp); err != nil {
			if isTimeout(err) {
				// What was sealed is committed: it is pending now.
				return written + sealed, err
			}
			return written, err
		}
		written += sealed
	}
	return written, nil
}

// writeOut writes the sealed bytes in *bufp. On a timeout the unwritten rest
// becomes pending; on any other error the connection is broken for writing.
// The buffer goes back to the pool once fully written.
func (c *Conn) writeOut(bufp *[]byte) error {
	n, err := c.conn.Write(*bufp)
	if err == nil {
		putWriteBuf(bufp)
		return nil
	}
	if isTimeout(err) {
		c.out.pending, c.out.pendingAt = bufp, n
		return err
	}
	c.out.err = err
	return err
}

func (c *Conn) flushPending() error {
	p := c.out.pending
	if p == nil {
		return nil
	}
	n, err := c.conn.Write((*p)[c.out.pendingAt:])
	c.out.pendingAt += n
	if err != nil {
		if !isTimeout(err) {
			c.out.err = err
		}
		return err
	}
	c.out.pending = nil
	putWriteBuf(p)
	return nil
}

// sendClose flushes pending data and sends the close record once. It sends
// none unless every byte of every Write was accepted and is on the wire.
func (c *Conn) sendClose() error {
	if c.out.err != nil {
		return c.out.err
	}
	if c.out.cut {
		return ErrWriteCut
	}
	if err := c.flushPending(); err != nil {
		return err
	}
	if c.out.closed {
		return nil
	}
	c.out.closed = true
	bufp := getWriteBuf(0)
	*bufp = c.out.half.seal((*bufp)[:0], recordClose, nil)
	return c.writeOut(bufp)
}

// CloseWrite sends the close record, after which the peer reads io.EOF, and
// then half-closes the underlying connection if it supports CloseWrite (as
// *net.TCPConn does). Reading stays possible. If the last Write was cut
// short, or sealed bytes cannot be sent, CloseWrite sends no close record and
// returns an error (ErrWriteCut in the first case).
func (c *Conn) CloseWrite() error {
	if err := c.Handshake(); err != nil {
		return err
	}
	c.out.mu.Lock()
	err := c.sendClose()
	c.out.mu.Unlock()
	if err != nil {
		return fmt.Errorf("noisetor: close record not sent: %w", err)
	}
	if cw, ok := c.conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// closeRecordTimeout bounds how long Close waits to send the close record to
// a peer that is not reading.
const closeRecordTimeout = 5 * time.Second

// Close sends the close record (when no Write is in flight, the handshake
// has completed and no Write was cut short, see ErrWriteCut) and closes the
// underlying connection. A Close concurrent with a Write breaks the Write and
// sends no close record. Close cannot know whether the caller has more to
// send: a program that stops a sender between two Writes, and means the
// stream to be incomplete, closes NetConn() first.
func (c *Conn) Close() error {
	if c.live != nil {
		c.live.untrack(c)
	}
	var x int32
	for {
		x = c.activeCall.Load()
		if x&1 != 0 {
			return net.ErrClosed
		}
		if c.activeCall.CompareAndSwap(x, x|1) {
			break
		}
	}
	if x != 0 {
		// A Write is in flight: Close is being used to break it. Don't queue
		// a close record behind it.
		return c.conn.Close()
	}
	var recordErr error
	if c.handshakeDone.Load() && c.handshakeErr == nil && !c.in.broken.Load() {
		c.out.mu.Lock()
		if c.out.pending != nil || !c.out.closed {
			c.conn.SetWriteDeadline(time.Now().Add(closeRecordTimeout))
			recordErr = c.sendClose()
		}
		c.out.mu.Unlock()
		if recordErr == nil {
			// Send our FIN before draining: a peer that is closing too then
			// sees the end of our stream at once and its drain returns,
			// and so does ours, instead of both waiting closeDrainTimeout.
			if cw, ok := c.conn.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
		}
		c.drainUnread()
	}
	if err := c.conn.Close(); err != nil {
		return err
	}
	if recordErr != nil && !errors.Is(recordErr, net.ErrClosed) {
		return fmt.Errorf("noisetor: close record not sent: %w", recordErr)
	}
	return nil
}

// closeDrainTimeout bounds how long Close reads what the peer has sent but
// we have not read.
const closeDrainTimeout = 20 * time.Millisecond

// drainUnread reads and discards, briefly, data the peer sent that nobody
// read, so that closing the socket sends a FIN, not a reset that could
// destroy our final data and close record (see torStream). If a Read is in
// progress it is consuming the data anyway, and Close does not wait for it.
func (c *Conn) drainUnread() {
	if !c.in.mu.TryLock() {
		return
	}
	defer c.in.mu.Unlock()
	if c.in.err != nil {
		return // the peer's stream has ended or failed: nothing to drain
	}
	c.conn.SetReadDeadline(time.Now().Add(closeDrainTimeout))
	io.Copy(io.Discard, c.conn)
}

// LocalAddr returns the local address of the underlying connection.
func (c *Conn) LocalAddr() net.Addr { return c.conn.LocalAddr() }

// RemoteAddr returns the remote address of the underlying connection (over
// an onion service every caller appears as 127.0.0.1).
func (c *Conn) RemoteAddr() net.Addr { return c.conn.RemoteAddr() }

// NetConn returns the underlying connection.
func (c *Conn) NetConn() net.Conn { return c.conn }

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline sets the read deadline. A Read that times out mid-frame
// keeps what it has read, and the next Read resumes.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.readDeadline.Store(unixNano(t))
	return c.conn.SetReadDeadline(t)
}

// SetWriteDeadline sets the write deadline. A Write that times out keeps its
// sealed, unsent bytes pending (see Write).
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.writeDeadline.Store(unixNano(t))
	return c.conn.SetWriteDeadline(t)
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func (c *Conn) userReadDeadline() time.Time  { return fromUnixNano(c.readDeadline.Load()) }
func (c *Conn) userWriteDeadline() time.Time { return fromUnixNano(c.writeDeadline.Load()) }

// boundIO bounds the I/O on c by ctx: until stop is called, c's deadline is
// ctx's deadline or fallback from now, whichever is sooner (ctxBound: ctx's),
// and a cancelled ctx cuts the I/O short at once. stop waits for a
// cancellation being applied, then calls restore to reset c's deadlines.
func boundIO(ctx context.Context, c interface{ SetDeadline(time.Time) error }, fallback time.Duration, restore func()) (stop func(), ctxBound bool) {
	deadline := time.Now().Add(fallback)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline, ctxBound = d, true
	}
	c.SetDeadline(deadline)
	// context.AfterFunc starts no goroutine unless ctx is cancelled (none
	// at all for a context that cannot be), where a watcher goroutine per
	// handshake cost a spawn and a wake-up.
	fired := make(chan struct{})
	stopWatch := context.AfterFunc(ctx, func() {
		c.SetDeadline(time.Unix(1, 0)) // unblock reads and writes now
		close(fired)
	})
	return func() {
		if !stopWatch() {
			<-fired // it ran or is running: let it finish before restoring
		}
		restore()
	}, ctxBound
}
