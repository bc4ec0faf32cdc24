package main

import (
	"fmt"
	"io"
	"reflect"
	"strings"
	"unicode"

	"github.com/noisetor/noisetor"
)

// Exit statuses of 'keyring diff', as diff(1)'s.
const (
	diffSame      = 0
	diffDifferent = 1
	diffTrouble   = 2
)

// keyringDiff prints what changed from the keyring file oldPath to newPath
// (either may be "-", standard input) and both keyrings' fingerprints, in
// lines operators read to each other on the phone.
func keyringDiff(e *env, oldPath, newPath string) error {
	if oldPath == "-" && newPath == "-" {
		return usagef("only one of the two keyrings can be standard input")
	}
	load := func(path string) (*noisetor.Keyring, error) {
		if path != "-" {
			return noisetor.LoadKeyring(path)
		}
		kr, err := noisetor.ParseKeyring(e.stdin)
		if err != nil {
			return nil, fmt.Errorf("standard input: %w", err)
		}
		return kr, nil
	}
	old, err := load(oldPath)
	if err != nil {
		return &exitError{diffTrouble, err}
	}
	next, err := load(newPath)
	if err != nil {
		return &exitError{diffTrouble, err}
	}
	n := writeKeyringDiff(e.stdout, old, next)
	name := func(path string) string {
		if path == "-" {
			return "(standard input)"
		}
		return path
	}
	fmt.Fprintf(e.stdout, "old keyring %s: %s, fingerprint %s\n", name(oldPath), nPeers(old.Len()), old.Fingerprint())
	fmt.Fprintf(e.stdout, "new keyring %s: %s, fingerprint %s\n", name(newPath), nPeers(next.Len()), next.Fingerprint())
	if n == (diffCounts{}) {
		fmt.Fprintln(e.stdout, "the keyrings are the same")
		return nil
	}
	fmt.Fprintf(e.stdout, "%d added, %d removed, %d changed\n", n.added, n.removed, n.changed)
	return &exitError{code: diffDifferent}
}

type diffCounts struct{ added, removed, changed int }

// writeKeyringDiff writes one block per peer added, removed or changed
// (matched by name), sorted by name, and a blank line after them if any.
func writeKeyringDiff(w io.Writer, old, next *noisetor.Keyring) diffCounts {
	var n diffCounts
	olds, news := old.Peers(), next.Peers() // sorted by name
	for len(olds) > 0 || len(news) > 0 {
		switch {
		case len(news) == 0 || len(olds) > 0 && olds[0].Name < news[0].Name:
			writePeerBlock(w, "removed", olds[0])
			olds = olds[1:]
			n.removed++
		case len(olds) == 0 || news[0].Name < olds[0].Name:
			writePeerBlock(w, "added", news[0])
			news = news[1:]
			n.added++
		default:
			if writePeerChange(w, olds[0], news[0]) {
				n.changed++
			}
			olds, news = olds[1:], news[1:]
		}
	}
	if n != (diffCounts{}) {
		fmt.Fprintln(w)
	}
	return n
}

// A peerField is one field of a Peer other than its name.
type peerField struct {
	label string
	value reflect.Value
}

// peerFields returns the exported fields of p but Name, by reflection, so
// that a field added to Peer shows up in the diff, and counts in the
// comparison, without a change here.
func peerFields(p noisetor.Peer) []peerField {
	v := reflect.ValueOf(p)
	var fields []peerField
	for i := 0; i < v.NumField(); i++ {
		f := v.Type().Field(i)
		if !f.IsExported() || f.Name == "Name" {
			continue
		}
		fields = append(fields, peerField{fieldLabel(f.Name, v.Field(i)), v.Field(i)})
	}
	return fields
}

// fieldLabel is the keyring-file name of a Peer field ("PublicKey": "key",
// "NextKey": "next-key"), with " fingerprint" after it for a key, which is
// shown as its fingerprint.
func fieldLabel(name string, v reflect.Value) string {
	var label string
	switch name {
	case "PublicKey":
		label = "key"
	case "Address":
		label = "addr"
	case "ClientAuth":
		label = "auth"
	default:
		var b strings.Builder
		for i, r := range name {
			if unicode.IsUpper(r) && i > 0 {
				b.WriteByte('-')
			}
			b.WriteRune(unicode.ToLower(r))
		}
		label = b.String()
	}
	if _, ok := v.Interface().(interface{ Fingerprint() string }); ok {
		label += " fingerprint"
	}
	return label
}

// fieldText shows a field's value: a key as its fingerprint, nothing as
// "none". A Peer holds only public data.
func fieldText(v reflect.Value) string {
	if v.IsZero() {
		return "none"
	}
	if f, ok := v.Interface().(interface{ Fingerprint() string }); ok {
		return f.Fingerprint()
	}
	return fmt.Sprint(v.Interface())
}

const diffIndent = "    "

func writeField(w io.Writer, label, text string) {
	fmt.Fprintf(w, "%s%-20s %s\n", diffIndent, label, text)
}

// writePeerBlock writes a peer added or removed, with every field set.
func writePeerBlock(w io.Writer, what string, p noisetor.Peer) {
	fmt.Fprintf(w, "%s %s\n", what, p.Name)
	for _, f := range peerFields(p) {
		if !f.value.IsZero() {
			writeField(w, f.label, fieldText(f.value))
		}
	}
}

// writePeerChange writes the fields that differ between two entries of one
// peer (any field: a new one too), and the key fingerprint even when the key
// is the same; it reports whether any differ.
func writePeerChange(w io.Writer, old, next noisetor.Peer) bool {
	of, nf := peerFields(old), peerFields(next)
	changed := false
	for i := range of {
		if !reflect.DeepEqual(of[i].value.Interface(), nf[i].value.Interface()) {
			changed = true
		}
	}
	if !changed {
		return false
	}
	fmt.Fprintf(w, "changed %s\n", old.Name)
	for i := range of {
		o, n := fieldText(of[i].value), fieldText(nf[i].value)
		switch {
		case !reflect.DeepEqual(of[i].value.Interface(), nf[i].value.Interface()):
			writeField(w, of[i].label, "old "+o)
			writeField(w, "", "new "+n)
		case of[i].label == "key fingerprint":
			writeField(w, of[i].label, o+" (unchanged)")
		}
	}
	return true
}
