//go:build !embedtor

package noisetor

import (
	"github.com/cretz/bine/process"
)

// defaultTorProcessCreator is nil without the embedtor build tag: tor is
// started from ExePath, or from "tor" in PATH.
var defaultTorProcessCreator process.Creator

// embeddedTorHasPoW reports false without the embedtor build tag.
func embeddedTorHasPoW() bool { return false }

// EmbeddedTorVersion describes the Tor linked into this binary. ok is false,
// and the binary runs the system tor, unless it was built with
// -tags embedtor (see scripts/build-libtor.sh).
func EmbeddedTorVersion() (version string, ok bool) { return "", false }
