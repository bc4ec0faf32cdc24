package noisetor

import (
	"errors"
	"fmt"
)

// A RelayRule lets every peer whose keyring name matches From reach every
// peer whose name matches To through a RelayServer. A pattern is a name, or
// a name with '*' (any run of characters) and '?' (one character) wildcards:
// "*" matches every peer, "wallet-*" every name starting with "wallet-".
type RelayRule struct {
	From, To string
}

// RelayRules is an allow list: a connection is allowed if any rule matches
// it, and denied otherwise. Its Allow method is a RelayServer.Allow policy.
type RelayRules []RelayRule

// Allow reports whether some rule lets from reach to.
func (r RelayRules) Allow(from, to Peer) bool {
	for _, rule := range r {
		if relayMatch(rule.From, from.Name) && relayMatch(rule.To, to.Name) {
			return true
		}
	}
	return false
}

// Check reports a rule with a malformed pattern, or with a pattern that
// matches no peer of kr: most likely a typo that would silently deny.
func (r RelayRules) Check(kr *Keyring) error {
	peers := kr.Peers()
	for _, rule := range r {
		for _, pat := range []string{rule.From, rule.To} {
			if err := CheckRelayPattern(pat); err != nil {
				return fmt.Errorf("noisetor: relay rule %q -> %q: %v", rule.From, rule.To, err)
			}
			found := false
			for _, p := range peers {
				if relayMatch(pat, p.Name) {
					found = true
					break
				}
			}
			if !found {
				return fmt.Errorf("noisetor: relay rule %s -> %s: %q matches no peer of the keyring", rule.From, rule.To, pat)
			}
		}
	}
	return nil
}

// CheckRelayPattern reports a malformed RelayRule pattern. Its error does not
// quote the pattern and has no "noisetor: " prefix: the caller adds the
// context (Check, and the relay configuration of the noisetor command, which
// must not quote what could be a secret pasted into the wrong file).
func CheckRelayPattern(pat string) error {
	if pat == "" || len(pat) > maxNameLen {
		return fmt.Errorf("a pattern must be 1 to %d characters", maxNameLen)
	}
	for i := 0; i < len(pat); i++ {
		c := pat[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-' || c == '*' || c == '?') {
			return errors.New("use peer-name characters (a-z, 0-9, '.', '_', '-') and the wildcards '*' and '?'")
		}
	}
	return nil
}

// relayMatch matches name against a pattern of literal characters, '*' and
// '?'.
func relayMatch(pat, name string) bool {
	// Iterative glob match with single-star backtracking.
	p, n, star, mark := 0, 0, -1, 0
	for n < len(name) {
		switch {
		case p < len(pat) && (pat[p] == '?' || pat[p] == name[n]):
			p++
			n++
		case p < len(pat) && pat[p] == '*':
			star, mark = p, n
			p++
		case star >= 0:
			p = star + 1
			mark++
			n = mark
		default:
			return false
		}
	}
	for p < len(pat) && pat[p] == '*' {
		p++
	}
	return p == len(pat)
}
