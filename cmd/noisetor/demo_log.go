package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// A logRecord is one JSON line of a role's log (log/slog's JSONHandler).
type logRecord struct {
	Time      time.Time `json:"time"`
	Level     string    `json:"level"`
	Msg       string    `json:"msg"`
	Role      string    `json:"role"`
	Direction string    `json:"direction"`
	Addr      string    `json:"addr"`
	Peer      string    `json:"peer"`
	Pattern   string    `json:"pattern"`
	Outcome   string    `json:"outcome"`
	Reason    string    `json:"reason"`
	// A listener's counts of callers that proved no key, by reason.
	Reasons  map[string]int `json:"reasons"`
	Duration int64          `json:"duration"` // nanoseconds
	// Relay decisions.
	Op     string `json:"op"`
	From   string `json:"from"`
	To     string `json:"to"`
	Server string `json:"server"`
}

func readRoleLog(path string) ([]logRecord, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var recs []logRecord
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var rec logRecord
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg != "" {
			recs = append(recs, rec)
		}
	}
	return recs, nil
}

// isAttempt reports whether rec records a connection attempt or a relay
// decision, as opposed to tor's and the demo's other messages.
func isAttempt(rec logRecord) bool {
	switch rec.Msg {
	case "noisetor: handshake", "noisetor: relay", refusedCallersMsg:
		return true
	}
	return false
}

// refusedCallersMsg is the message of a listener's counts of callers that
// proved no keyring key (logged in aggregate, not one record each).
const refusedCallersMsg = "noisetor: refused callers that proved no keyring key"

// printConnectionLog prints every connection attempt from every role's log,
// in time order.
func (d *demo) printConnectionLog() error {
	var all []logRecord
	for _, r := range demoRoles {
		recs, err := readRoleLog(d.path(r, "log.jsonl"))
		if err != nil {
			return err
		}
		if d.o.verbose {
			d.printf("\n--- %s log (%s)\n", r, d.path(r, "log.jsonl"))
			raw, _ := os.ReadFile(d.path(r, "log.jsonl"))
			d.printf("%s", raw)
		}
		for _, rec := range recs {
			if isAttempt(rec) {
				all = append(all, rec)
			}
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })

	d.printf("\nConnection log: every attempt, in and out, from the roles' logs (%s/*/log.jsonl)\n", filepath.Base(d.dir))
	tw := tabwriter.NewWriter(d.e.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  TIME\tROLE\tWHAT\tPEER\tOUTCOME\tDETAIL")
	for _, rec := range all {
		what, peer, detail := "", rec.Peer, ""
		switch rec.Msg {
		case "noisetor: handshake":
			what = "handshake " + rec.Direction + " " + rec.Pattern
			if rec.Direction == "out" {
				detail = "to " + shortAddr(rec.Addr)
			}
		case refusedCallersMsg:
			what, rec.Outcome = "handshakes in", "refused"
			var reasons []string
			for _, r := range slices.Sorted(maps.Keys(rec.Reasons)) {
				reasons = append(reasons, fmt.Sprintf("%d× %s", rec.Reasons[r], r))
			}
			detail = strings.Join(reasons, ", ")
		case "noisetor: relay":
			what = "relay " + rec.Op
			switch {
			case rec.From != "" && rec.To != "":
				peer = rec.From + " -> " + rec.To
			case rec.From != "":
				peer = rec.From
			case rec.Server != "":
				peer = rec.Server
				if rec.Peer != "" {
					peer = "via " + rec.Server + " to " + rec.Peer
				}
			}
		}
		if peer == "" {
			peer = "(unknown)"
		}
		if rec.Reason != "" {
			detail = strings.TrimSpace(detail + " " + tidy(rec.Reason))
		}
		if rec.Duration > 0 {
			detail = strings.TrimSpace(fmt.Sprintf("%s (%s)", detail, time.Duration(rec.Duration).Round(time.Millisecond)))
		}
		fmt.Fprintf(tw, "  +%.1fs\t%s\t%s\t%s\t%s\t%s\n", rec.Time.Sub(d.start).Seconds(), rec.Role, what, peer, strings.ToUpper(rec.Outcome), detail)
	}
	tw.Flush()
	return nil
}

// shortAddr abbreviates an onion address for the table.
func shortAddr(a string) string { return onionRE.ReplaceAllString(a, "$1….onion") }

var onionRE = regexp.MustCompile(`\b([a-z2-7]{8})[a-z2-7]{48}\.onion`)

// tidy shortens a message for the screen: abbreviated onion addresses and
// no repeated "noisetor: " prefixes of wrapped errors.
func tidy(s string) string {
	s = strings.TrimPrefix(s, "noisetor: ")
	s = strings.ReplaceAll(s, ": noisetor: ", ": ")
	return shortAddr(s)
}
