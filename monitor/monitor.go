// Package monitor shows operators the state of a running noisetor program:
// which keyring peers are connected, when each last completed a handshake,
// why its last attempt failed, which callers were refused, and whether the
// onion service is published and reachable.
//
// A Monitor reports on one noisetor.Config (and optionally one onion
// service, and a sync server's relay: WithRelay). Its Handler answers GET
// /status with a JSON Status, which `noisetor status` prints as a table,
// and GET /metrics with Prometheus metrics. A long-running program serves it on a Unix socket made by
// ListenUnix (mode 0600, in a private directory), and the metrics alone, if
// the operator asks, on a loopback TCP address for Prometheus:
//
//	m := monitor.New(cfg, onionListener) // onionListener may be nil
//	l, err := monitor.ListenUnix(filepath.Join(dataDir, "status.sock"))
//	...
//	go (&http.Server{Handler: m.Handler(), ReadHeaderTimeout: 5 * time.Second}).Serve(l)
//
// Nothing reported is secret: the metrics carry peer names, counts and
// times, never a key; GET /status adds addresses and error texts as the log
// records them, which may name a public key or its fingerprint, never a
// private one. Peer names and timings still tell an observer who talks to
// whom and when, which is why the socket is private to its user.
//
// The metrics are:
//
//	noisetor_handshakes_total{peer,direction,outcome}  counter; direction in|out, outcome ok|failed
//	noisetor_connections{peer}                         gauge: live connections
//	noisetor_last_handshake_timestamp_seconds{peer}    gauge, for peers that have had one
//	noisetor_last_failure_timestamp_seconds{peer}      gauge, for peers that have had one
//	noisetor_peer_in_keyring{peer}                     gauge: 1, or 0 for a peer removed since
//	noisetor_refused_total{reason}                     counter: callers that proved no keyring key
//	noisetor_onion_state{state}                        gauge: 1 for the current state, with an onion service
//	noisetor_onion_publications_total                  counter
//	noisetor_onion_republished_total                   counter: republished by the reachability checks
//	noisetor_onion_check_failures                      gauge: checks failed in a row
//	noisetor_onion_last_upload_timestamp_seconds       gauge
//	noisetor_onion_last_check_timestamp_seconds        gauge
//	noisetor_onion_last_reached_timestamp_seconds      gauge
//	noisetor_relay_registered{peer}                    gauge, with a relay: 1 if the keyring peer is registered, else 0
//	noisetor_relay_sessions                            gauge, with a relay: relayed sessions open or being set up
//
// and, from Handler, the Go runtime's and the process's standard metrics
// (go_*, process_*).
package monitor

import (
	"encoding/json"
	"log"
	"net"
	"net/http"
	"time"

	"github.com/noisetor/noisetor"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// A Monitor reports the state of a noisetor.Config and of an onion service.
// It is a prometheus.Collector, so a program that has its own registry can
// register it there instead of serving Handler. Its methods may be called
// concurrently.
type Monitor struct {
	cfg     *noisetor.Config
	onion   *noisetor.OnionListener
	relay   *noisetor.RelayServer
	started time.Time
}

// New returns a Monitor of cfg, which must not be nil, and, if onion is not
// nil, of that onion service. Counts start from cfg's first use, not from
// New.
func New(cfg *noisetor.Config, onion *noisetor.OnionListener) *Monitor {
	return &Monitor{cfg: cfg, onion: onion, started: time.Now()}
}

// WithRelay has m also report on the sync server's relay s: which peers are
// registered, and how many sessions it carries. Call it before serving m.
// It returns m.
func (m *Monitor) WithRelay(s *noisetor.RelayServer) *Monitor {
	m.relay = s
	return m
}

// Status is a snapshot of a Monitor, as GET /status returns it in JSON.
type Status struct {
	Time    time.Time         `json:"time"`    // when the snapshot was taken, by the server's clock
	Started time.Time         `json:"started"` // when the Monitor was made
	Peers   []Peer            `json:"peers"`   // as noisetor.Config.PeerStates lists them
	Refused map[string]uint64 `json:"refused"` // noisetor.Config.Refusals
	Onion   *Onion            `json:"onion,omitempty"`
	Relay   *Relay            `json:"relay,omitempty"`
}

// Relay is the state of the sync server's relay (noisetor.RelayStatus).
type Relay struct {
	Registered []Registered `json:"registered"` // in name order
	Sessions   int          `json:"sessions"`   // open or being set up
}

// Registered is one registered peer (noisetor.RelayRegistered).
type Registered struct {
	Peer  string    `json:"peer"`
	Since time.Time `json:"since"`
}

// Peer is the state of one peer (noisetor.PeerState).
type Peer struct {
	Name          string   `json:"name"`
	InKeyring     bool     `json:"in_keyring"`
	Connections   int      `json:"connections"`
	Handshakes    Counts   `json:"handshakes"`
	LastHandshake *Attempt `json:"last_handshake,omitempty"` // nil: none yet
	LastFailure   *Attempt `json:"last_failure,omitempty"`   // nil: none yet
}

// Counts are the handshakes of one peer (noisetor.HandshakeCounts).
type Counts struct {
	InOK      uint64 `json:"in_ok"`
	InFailed  uint64 `json:"in_failed"`
	OutOK     uint64 `json:"out_ok"`
	OutFailed uint64 `json:"out_failed"`
}

// Attempt is one handshake attempt (noisetor.HandshakeAttempt).
type Attempt struct {
	Time      time.Time `json:"time"`
	Direction string    `json:"direction"` // "in" or "out", as in the log
	Addr      string    `json:"addr,omitempty"`
	Pattern   string    `json:"pattern"`
	Cipher    string    `json:"cipher"`
	Seconds   float64   `json:"duration_seconds"`
	Error     string    `json:"error,omitempty"` // why it failed
}

// Onion is the state of the onion service (noisetor.OnionStatus).
type Onion struct {
	Address       string    `json:"address"`
	State         string    `json:"state"` // noisetor.OnionState's name
	Publications  int       `json:"publications"`
	LastUpload    time.Time `json:"last_upload,omitzero"`
	LastCheck     time.Time `json:"last_check,omitzero"`
	LastReached   time.Time `json:"last_reached,omitzero"`
	CheckFailures int       `json:"check_failures"`
	Error         string    `json:"error,omitempty"` // why the last check failed
	Republished   int       `json:"republished"`
}

// Status returns a snapshot of the state.
func (m *Monitor) Status() Status {
	st := Status{Time: time.Now(), Started: m.started, Refused: m.cfg.Refusals(), Peers: []Peer{}}
	for _, p := range m.cfg.PeerStates() {
		h := p.Handshakes
		st.Peers = append(st.Peers, Peer{
			Name: p.Name, InKeyring: p.InKeyring, Connections: p.Connections,
			Handshakes:    Counts{InOK: h.InboundOK, InFailed: h.InboundFailed, OutOK: h.OutboundOK, OutFailed: h.OutboundFailed},
			LastHandshake: attempt(p.LastHandshake),
			LastFailure:   attempt(p.LastFailure),
		})
	}
	if m.onion != nil {
		o := m.onion.Status()
		st.Onion = &Onion{
			Address: m.onion.OnionAddress(), State: o.State.String(), Publications: o.Publications,
			LastUpload: o.LastUpload, LastCheck: o.LastCheck, LastReached: o.LastReached,
			CheckFailures: o.Failures, Republished: o.Republished,
		}
		if o.Err != nil {
			st.Onion.Error = o.Err.Error()
		}
	}
	if m.relay != nil {
		r := m.relay.Status()
		st.Relay = &Relay{Registered: []Registered{}, Sessions: r.Sessions}
		for _, p := range r.Registered {
			st.Relay.Registered = append(st.Relay.Registered, Registered{Peer: p.Peer, Since: p.Since})
		}
	}
	return st
}

func attempt(a noisetor.HandshakeAttempt) *Attempt {
	if a.Time.IsZero() {
		return nil
	}
	out := &Attempt{Time: a.Time, Direction: direction(a.Outbound), Addr: a.Addr,
		Pattern: a.Pattern.String(), Cipher: a.CipherSuite.String(), Seconds: a.Duration.Seconds()}
	if a.Err != nil {
		out.Error = a.Err.Error()
	}
	return out
}

func direction(outbound bool) string {
	if outbound {
		return "out"
	}
	return "in"
}

// Handler returns the handler of the status socket: GET /status (JSON
// Status) and GET /metrics (Prometheus text format, with the Go runtime's
// and the process's metrics).
func (m *Monitor) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		b, err := json.MarshalIndent(m.Status(), "", "  ")
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(append(b, '\n'))
	})
	mux.Handle("GET /metrics", m.MetricsHandler())
	return mux
}

// MetricsHandler returns a handler of GET /metrics alone, for a TCP
// address that Prometheus scrapes: it shows counts and peer names, never
// the error texts and addresses of GET /status.
func (m *Monitor) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", h)
	return mux
}

var (
	descHandshakes    = prometheus.NewDesc("noisetor_handshakes_total", "Handshake attempts with a keyring peer, by direction (in: the peer called) and outcome.", []string{"peer", "direction", "outcome"}, nil)
	descConnections   = prometheus.NewDesc("noisetor_connections", "Established connections with the peer not closed yet.", []string{"peer"}, nil)
	descLastHandshake = prometheus.NewDesc("noisetor_last_handshake_timestamp_seconds", "When the last handshake with the peer completed (Unix time).", []string{"peer"}, nil)
	descLastFailure   = prometheus.NewDesc("noisetor_last_failure_timestamp_seconds", "When the last attempt with the peer failed (Unix time).", []string{"peer"}, nil)
	descInKeyring     = prometheus.NewDesc("noisetor_peer_in_keyring", "1 if the peer is in the keyring, 0 if it was removed since its state was recorded.", []string{"peer"}, nil)
	descRefused       = prometheus.NewDesc("noisetor_refused_total", "Callers refused before they proved a keyring key, by reason.", []string{"reason"}, nil)

	descOnionState       = prometheus.NewDesc("noisetor_onion_state", "1 for the onion service's current state.", []string{"state"}, nil)
	descOnionPubs        = prometheus.NewDesc("noisetor_onion_publications_total", "Times the onion service's descriptor was published, over every run of tor.", nil, nil)
	descOnionRepub       = prometheus.NewDesc("noisetor_onion_republished_total", "Times the reachability checks removed and added the onion service again.", nil, nil)
	descOnionFailures    = prometheus.NewDesc("noisetor_onion_check_failures", "Reachability checks of the onion service failed in a row.", nil, nil)
	descOnionLastUpload  = prometheus.NewDesc("noisetor_onion_last_upload_timestamp_seconds", "When a directory last accepted the onion service's descriptor (Unix time).", nil, nil)
	descOnionLastCheck   = prometheus.NewDesc("noisetor_onion_last_check_timestamp_seconds", "When the last reachability check of the onion service ended (Unix time).", nil, nil)
	descOnionLastReached = prometheus.NewDesc("noisetor_onion_last_reached_timestamp_seconds", "When a reachability check last reached the onion service (Unix time).", nil, nil)

	descRelayRegistered = prometheus.NewDesc("noisetor_relay_registered", "1 if the keyring peer is registered with the sync server (reachable through it), else 0.", []string{"peer"}, nil)
	descRelaySessions   = prometheus.NewDesc("noisetor_relay_sessions", "Relayed sessions open or being set up.", nil, nil)
)

var onionStates = []noisetor.OnionState{noisetor.OnionPublishing, noisetor.OnionPublished,
	noisetor.OnionReachable, noisetor.OnionUnreachable, noisetor.OnionClosed}

// Describe implements prometheus.Collector.
func (m *Monitor) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descHandshakes, descConnections, descLastHandshake, descLastFailure, descInKeyring, descRefused,
		descOnionState, descOnionPubs, descOnionRepub, descOnionFailures, descOnionLastUpload, descOnionLastCheck, descOnionLastReached,
		descRelayRegistered, descRelaySessions} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *Monitor) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	stamp := func(d *prometheus.Desc, t time.Time, labels ...string) {
		if !t.IsZero() {
			gauge(d, float64(t.UnixNano())/1e9, labels...)
		}
	}
	states := m.cfg.PeerStates()
	for _, p := range states {
		h := p.Handshakes
		counter(descHandshakes, float64(h.InboundOK), p.Name, "in", "ok")
		counter(descHandshakes, float64(h.InboundFailed), p.Name, "in", "failed")
		counter(descHandshakes, float64(h.OutboundOK), p.Name, "out", "ok")
		counter(descHandshakes, float64(h.OutboundFailed), p.Name, "out", "failed")
		gauge(descConnections, float64(p.Connections), p.Name)
		stamp(descLastHandshake, p.LastHandshake.Time, p.Name)
		stamp(descLastFailure, p.LastFailure.Time, p.Name)
		in := 0.0
		if p.InKeyring {
			in = 1
		}
		gauge(descInKeyring, in, p.Name)
	}
	for reason, n := range m.cfg.Refusals() {
		counter(descRefused, float64(n), reason)
	}
	if m.relay != nil {
		r := m.relay.Status()
		registered := make(map[string]bool, len(r.Registered))
		for _, p := range r.Registered {
			registered[p.Peer] = true
		}
		for _, p := range states {
			if p.InKeyring {
				v := 0.0
				if registered[p.Name] {
					v = 1
				}
				gauge(descRelayRegistered, v, p.Name)
			}
		}
		gauge(descRelaySessions, float64(r.Sessions))
	}
	if m.onion == nil {
		return
	}
	o := m.onion.Status()
	for _, s := range onionStates {
		v := 0.0
		if s == o.State {
			v = 1
		}
		gauge(descOnionState, v, s.String())
	}
	counter(descOnionPubs, float64(o.Publications))
	counter(descOnionRepub, float64(o.Republished))
	gauge(descOnionFailures, float64(o.Failures))
	stamp(descOnionLastUpload, o.LastUpload)
	stamp(descOnionLastCheck, o.LastCheck)
	stamp(descOnionLastReached, o.LastReached)
}

// serveTimeout bounds each request on the status socket and the metrics
// address: a client that stalls cannot hold a connection open.
const serveTimeout = 10 * time.Second

// Serve serves h on l in a goroutine with bounded request times, until the
// returned server is closed. errorLog, if not nil, receives the server's
// errors.
func Serve(l net.Listener, h http.Handler, errorLog *log.Logger) *http.Server {
	s := &http.Server{Handler: h, ReadHeaderTimeout: serveTimeout, ReadTimeout: serveTimeout,
		WriteTimeout: serveTimeout, ErrorLog: errorLog}
	go s.Serve(l)
	return s
}

// ServeUnix makes the status socket at path (ListenUnix) and serves
// Handler on it until the returned server is closed, which also removes
// the socket.
func (m *Monitor) ServeUnix(path string) (*http.Server, error) {
	l, err := ListenUnix(path)
	if err != nil {
		return nil, err
	}
	return Serve(l, m.Handler(), nil), nil
}
