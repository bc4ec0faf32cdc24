// Package libtor runs the Tor that scripts/build-libtor.sh builds (Debian's
// tor source compiled into one static libtor.a) from inside a Go program,
// offered to github.com/cretz/bine as a process.Creator.
//
// The real implementation is compiled only with `-tags embedtor` (and cgo);
// without the tag Available is false, the creators are nil and callers fall
// back to a tor executable.
//
// Two creators exist because tor keeps process-global state:
//
//   - NewCreator (the default) re-executes the running binary as a child
//     process that runs the embedded tor and nothing else. Any number of tors
//     can run, one after another or at once; tor's signal handling and crashes
//     stay out of the Go process; no tor executable is needed.
//   - NewInProcessCreator runs tor on a thread of the calling process. tor can
//     run only once in a process lifetime: a second tor, concurrent or after
//     the first exited, aborts the whole process inside tor, so Start refuses
//     it with ErrInProcessUsed.
//
// Both give tor an owning control connection: closing it, cancelling the
// context passed to tor.Start, or the Go process dying makes tor exit, and
// both support tor.StartConf.UseEmbeddedControlConn. An in-process tor
// writes its log to the process's standard output unless its Log option
// says otherwise; a child's output goes where NewCreator is told.
//
// A binary built with the tag that is started with ChildArg as its first
// argument runs tor with the remaining arguments during package
// initialization and exits with tor's status. That is how the child process
// of NewCreator starts; it works the same for any program or test binary
// that links this package.
package libtor

import "errors"

// ChildArg is the first argument that makes a binary built with the
// embedtor tag run tor instead of its main function.
const ChildArg = "__noisetor_embedded_tor__"

// ErrInProcessUsed is returned (wrapped) by the Start of a process made by
// NewInProcessCreator when a tor has already been started in this process.
var ErrInProcessUsed = errors.New("noisetor: in-process embedded tor can run only once per process lifetime")
