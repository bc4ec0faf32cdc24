//go:build embedtor

package noisetor

import (
	"github.com/cretz/bine/process"

	"github.com/noisetor/noisetor/internal/libtor"
)

// defaultTorProcessCreator starts tor when the caller names neither a
// ProcessCreator nor an ExePath. Built with the embedtor tag it is the Tor
// linked into this binary, run as a child process of the same executable:
// several tors and restarts work, and tor's signal handling and crashes stay
// out of this process. tor's output goes to os.Stderr. Such a binary,
// started with libtor.ChildArg as its first argument, runs tor during
// package initialization and exits.
var defaultTorProcessCreator process.Creator = libtor.NewCreator(nil)

// embeddedTorHasPoW reports whether the embedded tor has the onion-service
// proof-of-work module (build-libtor.sh --gpl). The default build lacks it,
// and then tor accepts ADD_ONION ... PoWDefensesEnabled=1 and runs the
// service without the defense, so ListenOnion must know: it logs that the
// service runs without PoW (PoWAuto) or refuses (PoWRequire).
func embeddedTorHasPoW() bool { return libtor.GPL() }

// EmbeddedTorVersion describes the Tor linked into this binary, for example
// "tor 0.4.9.11 (Debian source 0.4.9.11-0+deb12u1, without onion-service
// PoW)". ok is false, and the binary runs the system tor, unless it was
// built with -tags embedtor (see scripts/build-libtor.sh).
func EmbeddedTorVersion() (version string, ok bool) {
	lic := "without onion-service PoW"
	if libtor.GPL() {
		lic = "with onion-service PoW; GPL-3.0"
	}
	return libtor.Version() + " (Debian source " + libtor.DebianVersion() + ", " + lic + ")", true
}
