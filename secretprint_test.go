package noisetor

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// secretEncodings returns the forms in which fmt, slog or encoding/json
// could show secret: as is, in hex either case, base64, and as Go prints a
// byte slice.
func secretEncodings(secret []byte) []string {
	forms := []string{
		string(secret),
		hex.EncodeToString(secret),
		strings.ToUpper(hex.EncodeToString(secret)),
		base64.StdEncoding.EncodeToString(secret),
		base64.RawURLEncoding.EncodeToString(secret),
		strings.Trim(fmt.Sprint(secret), "[]"),
		strings.TrimSuffix(strings.TrimPrefix(fmt.Sprintf("%#v", secret), "[]byte{"), "}"),
	}
	for i, f := range forms {
		if len(f) > 40 { // a prefix is a leak too
			forms[i] = f[:40]
		}
	}
	return forms
}

// checkNeverPrinted renders each value of values (the type holding a secret,
// by value and by pointer) with every fmt verb, inside structs (exported and
// unexported fields), slices, maps and interfaces, through log/slog's text
// and JSON handlers and through encoding/json, and fails if any output shows
// any form of any secret.
//
// With strict, so must what fmt does when it cannot call the type's methods:
// for a value in an unexported field of another struct, and for %p on a
// value and %w, it prints the fields, and for verbs such as %s even what
// pointer fields point to. Only a type whose secret is two pointers away
// survives that (go vet's printf check reports %p and %w misuse).
func checkNeverPrinted(t *testing.T, values map[string]any, secrets [][]byte, strict bool) {
	t.Helper()
	var forms []string
	for _, s := range secrets {
		forms = append(forms, secretEncodings(s)...)
	}
	check := func(what, out string) {
		t.Helper()
		for _, f := range forms {
			if strings.Contains(out, f) {
				t.Errorf("%s reveals a secret (%q): %q", what, f, out)
				return
			}
		}
	}
	type exported struct{ V any }
	type unexported struct{ v any }
	verbs := []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d", "%T", "%t", "%o", "%e", "%g", "%c", "%U", "%b", "%10.3v", "%-+#v"}
	if strict {
		verbs = append(verbs, "%p", "%w")
	}
	for name, v := range values {
		wrapped := map[string]any{
			name:                     v,
			"struct{V " + name:       exported{v},
			"*struct{V " + name:      &exported{v},
			"[]any{" + name:          []any{v},
			"map[string]any{" + name: map[string]any{"k": v},
		}
		if strict {
			wrapped["struct{v "+name] = unexported{v}
			wrapped["*struct{v "+name] = &unexported{v}
		}
		for wname, w := range wrapped {
			for _, verb := range verbs {
				check(wname+" "+verb, fmt.Sprintf(verb, w))
			}
			check(wname+" Sprint", fmt.Sprint(w))
			check(wname+" Sprintln", fmt.Sprintln(w))
			check(wname+" Errorf", fmt.Errorf("x: %v", w).Error())
		}
		var b bytes.Buffer
		for _, h := range []slog.Handler{slog.NewTextHandler(&b, nil), slog.NewJSONHandler(&b, nil)} {
			slog.New(h).Info("msg", "v", v, "s", exported{v}, slog.Group("g", "v", v))
		}
		check(name+" slog", b.String())
		for _, j := range []any{v, exported{v}} {
			if out, err := json.Marshal(j); err == nil {
				check(name+" json", string(out))
			}
		}
	}
}

func TestSecretsNeverPrinted(t *testing.T) {
	for _, c := range curves {
		k, err := GenerateKey(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Run("PrivateKey "+c.String(), func(t *testing.T) {
			checkNeverPrinted(t, map[string]any{
				"*PrivateKey": k, "PrivateKey": *k, "StaticKey": StaticKey(k),
				"Config": Config{StaticKey: k}, "*Config": &Config{StaticKey: k},
			}, [][]byte{k.priv.Bytes()}, true)
		})
	}
	t.Run("PKCS11Config", func(t *testing.T) {
		pin := "pin-Zq7-8c3e-secret"
		cfg := PKCS11Config{Module: "/m.so", TokenLabel: "t", KeyLabel: "k", PIN: pin}
		// fmt prints an exported PIN field when it cannot call the
		// methods (see the PIN field's comment): not strict.
		checkNeverPrinted(t, map[string]any{"PKCS11Config": cfg, "*PKCS11Config": &cfg}, [][]byte{[]byte(pin)}, false)
	})
	t.Run("OnionKey and ClientAuthKey", func(t *testing.T) {
		ok, err := GenerateOnionKey(nil)
		if err != nil {
			t.Fatal(err)
		}
		ck, err := GenerateClientAuthKey(nil)
		if err != nil {
			t.Fatal(err)
		}
		checkNeverPrinted(t, map[string]any{"*OnionKey": ok, "OnionKey": *ok, "*ClientAuthKey": ck, "ClientAuthKey": *ck},
			[][]byte{ok.expanded[:32], ok.expanded[32:], ck.priv.Bytes()}, true)
	})
	t.Run("Tor", func(t *testing.T) {
		pw := "control-pw-Zq7-secret"
		tr := &Tor{password: &pw}
		for _, verb := range []string{"%v", "%+v", "%#v", "%s"} {
			if got := fmt.Sprintf(verb, tr); strings.Contains(got, pw) {
				t.Errorf("%s of a *Tor shows its control password: %s", verb, got)
			}
		}
	})
}
