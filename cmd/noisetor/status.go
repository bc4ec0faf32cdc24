package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/noisetor/noisetor"
	"github.com/noisetor/noisetor/monitor"
)

func init() { register(statusCmd) }

// statusOptions are the flags of the long-running commands that expose
// their state: --status-socket and --metrics-listen.
type statusOptions struct {
	socket  string
	metrics string
}

func (o *statusOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.socket, "status-socket", "", "answer 'noisetor status' (and GET /metrics) on the Unix socket `path`,\nmode 0600, in a directory of mode 0700 (such as the tor data directory)")
	fs.StringVar(&o.metrics, "metrics-listen", "", "serve Prometheus metrics at http://`host:port`/metrics (peer names and counts,\nto anyone who can connect: keep it on loopback)")
}

// statusReadTimeout bounds a request on the status socket or the metrics
// address: a client that stalls must not hold a connection forever.
const statusReadTimeout = 10 * time.Second

// start serves the status socket and the metrics address that were asked
// for, reporting on cfg, on ln if it is an onion service, and on relay if
// not nil. stop ends both and removes the socket.
func (o *statusOptions) start(log *slog.Logger, cfg *noisetor.Config, ln net.Listener, relay *noisetor.RelayServer) (stop func(), err error) {
	if o.socket == "" && o.metrics == "" {
		return func() {}, nil
	}
	onion, _ := ln.(*noisetor.OnionListener)
	m := monitor.New(cfg, onion)
	if relay != nil {
		m.WithRelay(relay)
	}
	var servers []*http.Server
	stop = func() {
		for _, s := range servers {
			s.Close()
		}
	}
	serve := func(l net.Listener, h http.Handler) {
		servers = append(servers, monitor.Serve(l, h, slog.NewLogLogger(log.Handler(), slog.LevelWarn)))
	}
	if o.socket != "" {
		l, err := monitor.ListenUnix(o.socket)
		if err != nil {
			return nil, err
		}
		serve(l, m.Handler())
	}
	if o.metrics != "" {
		l, err := net.Listen("tcp", o.metrics)
		if err != nil {
			stop()
			return nil, fmt.Errorf("--metrics-listen: %w", err)
		}
		if !isLoopback(l.Addr()) {
			// Not refused: a monitoring network may be how the operator
			// wants it. The metrics name no key, but show who the peers
			// are and when they connect.
			log.Warn("noisetor: the metrics address is not on loopback: anyone who can reach it sees peer names and when they connect",
				"addr", l.Addr().String())
		}
		log.Info("noisetor: serving Prometheus metrics", "url", "http://"+l.Addr().String()+"/metrics")
		serve(l, m.MetricsHandler())
	}
	return stop, nil
}

func isLoopback(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}

type statusCmdOptions struct {
	socket  string
	json    bool
	metrics bool
}

var statusCmd = &command{
	name:  "status",
	args:  "--socket PATH [--json | --metrics]",
	short: "show the peers, handshakes, onion service and relay of a running serve or relay",
	long: `
Status asks a running 'noisetor serve' or 'noisetor relay' started with
--status-socket PATH for its state and prints, for each peer of its keyring,
the connections open now, when the last handshake completed (and which way),
the handshakes that completed and failed, and when the last attempt failed and
why; then the callers refused because they proved no keyring key, counted by
reason, the state of the onion service, if there is one, and for a relay the
peers registered (reachable through it) and its sessions.

With --json it prints the state as the socket sends it (GET /status); with
--metrics, the Prometheus metrics (GET /metrics), for a collector that reads
files or for a look by hand. The socket is private to the user running the
server (mode 0600 in a directory of mode 0700).`,
	flags: func(fs *flag.FlagSet) any {
		o := new(statusCmdOptions)
		fs.StringVar(&o.socket, "socket", "", "the status socket `path` of the server (its --status-socket)")
		fs.BoolVar(&o.json, "json", false, "print the state as JSON")
		fs.BoolVar(&o.metrics, "metrics", false, "print the Prometheus metrics")
		return o
	},
	run: runStatus,
}

func runStatus(e *env, _ *flag.FlagSet, opts any, args []string) error {
	o := opts.(*statusCmdOptions)
	if err := wantArgs(args, 0, 0, ""); err != nil {
		return err
	}
	if o.socket == "" {
		return usagef("missing --socket PATH (the --status-socket of the server)")
	}
	if o.json && o.metrics {
		return usagef("give --json or --metrics, not both")
	}
	ctx, cancel := context.WithTimeout(e.ctx, statusReadTimeout)
	defer cancel()
	if o.metrics {
		b, err := monitor.FetchMetrics(ctx, o.socket)
		if err != nil {
			return statusHint(err, o.socket)
		}
		_, err = e.stdout.Write(b)
		return err
	}
	if o.json {
		st, err := monitor.FetchStatus(ctx, o.socket)
		if err != nil {
			return statusHint(err, o.socket)
		}
		b, err := json.MarshalIndent(st, "", "  ")
		if err != nil {
			return err
		}
		_, err = e.stdout.Write(append(b, '\n'))
		return err
	}
	st, err := monitor.FetchStatus(ctx, o.socket)
	if err != nil {
		return statusHint(err, o.socket)
	}
	printStatus(e.stdout, st)
	return nil
}

// statusHint says what a socket that does not answer most likely means.
func statusHint(err error, path string) error {
	var ne *net.OpError
	if errors.As(err, &ne) && ne.Op == "dial" {
		return fmt.Errorf("%w (is a serve or relay running with --status-socket %s?)", err, path)
	}
	return err
}

// printStatus prints st as a table. Times are shown as how long before the
// snapshot they were, by the server's clock.
func printStatus(w io.Writer, st *monitor.Status) {
	ago := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		d := st.Time.Sub(t)
		if d < time.Second {
			return "just now"
		}
		return d.Round(time.Second).String() + " ago"
	}
	fmt.Fprintf(w, "status at %s (monitoring for %s)\n\n", st.Time.Format(time.RFC3339), st.Time.Sub(st.Started).Round(time.Second))

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tCONNECTED\tLAST HANDSHAKE\tOK\tFAILED\tLAST FAILURE")
	gone := false
	for _, p := range st.Peers {
		name := printable(p.Name)
		if !p.InKeyring {
			name += " (removed)"
			gone = true
		}
		last := "never"
		if h := p.LastHandshake; h != nil {
			last = fmt.Sprintf("%s (%s, %s)", ago(h.Time), h.Direction, printable(h.Pattern))
		}
		fail := "-"
		if f := p.LastFailure; f != nil {
			fail = fmt.Sprintf("%s (%s): %s", ago(f.Time), f.Direction, printable(f.Error))
		}
		c := p.Handshakes
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%s\n", name, p.Connections, last, c.InOK+c.OutOK, c.InFailed+c.OutFailed, fail)
	}
	tw.Flush()
	if len(st.Peers) == 0 {
		fmt.Fprintln(w, "(the keyring has no peers)")
	}
	if gone {
		fmt.Fprintln(w, "(removed: no longer in the keyring; shown with what was recorded before)")
	}

	var total uint64
	reasons := make([]string, 0, len(st.Refused))
	for r, n := range st.Refused {
		total += n
		reasons = append(reasons, r)
	}
	sort.Strings(reasons)
	fmt.Fprintf(w, "\nrefused callers that proved no keyring key: %d\n", total)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range reasons {
		fmt.Fprintf(tw, "  %s\t%d\n", printable(r), st.Refused[r])
	}
	tw.Flush()

	if o := st.Onion; o != nil {
		fmt.Fprintf(w, "\nonion service %s: %s\n", printable(o.Address), printable(o.State))
		fmt.Fprintf(w, "  published %d times, last upload %s; republished by the checks %d times\n", o.Publications, ago(o.LastUpload), o.Republished)
		fmt.Fprintf(w, "  last check %s, last reached %s", ago(o.LastCheck), ago(o.LastReached))
		if o.CheckFailures > 0 {
			fmt.Fprintf(w, "; %d failed in a row: %s", o.CheckFailures, printable(o.Error))
		}
		fmt.Fprintln(w)
	}

	if r := st.Relay; r != nil {
		fmt.Fprintf(w, "\nrelay: peers registered: %d; sessions open or being set up: %d\n", len(r.Registered), r.Sessions)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, p := range r.Registered {
			fmt.Fprintf(tw, "  %s\tregistered %s\n", printable(p.Peer), ago(p.Since))
		}
		tw.Flush()
	}
}

// printable replaces control characters (and anything else a terminal
// could act on) in text that came over the socket: error texts may quote
// what a remote peer sent.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return '?'
	}, s)
}
