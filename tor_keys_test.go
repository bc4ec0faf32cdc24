package noisetor

import (
	"bytes"
	"errors"
	"testing"
)

// An onion key's text has one accepted form: a CR or LF inside the base64
// (which Go's decoder would skip) is refused, as for every other key text.
func TestOnionKeyTextStrict(t *testing.T) {
	ok, err := GenerateOnionKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	text := ok.MarshalPrivateText()
	if _, err := ParseOnionKey(text); err != nil {
		t.Fatalf("its own text: %v", err)
	}
	at := len(onionKeyPrefix) + 10
	for _, ins := range []string{"\n", "\r", "\r\n"} {
		bad := append(append(append([]byte(nil), text[:at]...), ins...), text[at:]...)
		if _, err := ParseOnionKey(bad); !errors.Is(err, ErrBadKey) {
			t.Errorf("%q inside the base64: %v, want ErrBadKey", ins, err)
		}
	}
	if !bytes.HasSuffix(text, []byte("\n")) {
		t.Error("MarshalPrivateText does not end with a newline")
	}
}
