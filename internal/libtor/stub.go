//go:build !embedtor

package libtor

import (
	"io"

	"github.com/cretz/bine/process"
)

// Available reports whether tor is linked into this binary.
const Available = false

// Version returns "" when tor is not linked in.
func Version() string { return "" }

// DebianVersion returns "" when tor is not linked in.
func DebianVersion() string { return "" }

// GPL reports false when tor is not linked in.
func GPL() bool { return false }

// NewCreator returns nil when tor is not linked in; bine then runs the tor
// executable named by StartConf.ExePath.
func NewCreator(out io.Writer) process.Creator { return nil }

// NewInProcessCreator returns nil when tor is not linked in.
func NewInProcessCreator() process.Creator { return nil }

// CheckSignalHandlers returns nil: without the embedded tor there is nothing
// that could replace the Go runtime's signal handlers.
func CheckSignalHandlers() error { return nil }
