//go:build embedtor && cgo

package libtor

/*
#cgo CFLAGS: -I${SRCDIR}/dist/include
#cgo LDFLAGS: -L${SRCDIR}/dist/lib -Wl,-Bstatic -ltor -levent -lssl -lcrypto -lz -llzma -lzstd -lcap -Wl,-Bdynamic -lm -ldl -lpthread

#if !__has_include("libtor_dist.h") || !__has_include("tor_api.h")
#error "noisetor: the embedded tor is not built; run scripts/build-libtor.sh"
#endif

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include "libtor_dist.h"
#include "tor_api.h"

// Referenced from Go so that a rebuilt libtor.a (new id) changes this
// package's object code and every binary is relinked.
static const char *libtor_build_id(void) { return NOISETOR_LIBTOR_ID; }
static const char *libtor_deb_version(void) { return NOISETOR_LIBTOR_DEB_VERSION; }
static int libtor_gpl(void) { return NOISETOR_LIBTOR_GPL; }

// Signals tor can take over: the crash signals (tor's crash handler, compiled
// out by build-libtor.sh) come first, then those libevent handles for tor
// unless __DisableSignalHandlers is set.
static const int libtor_signals[] = {
	SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGSYS, SIGIO,
	SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGPIPE, SIGXFSZ, SIGCHLD,
};
#define LIBTOR_NSIGNALS (int)(sizeof libtor_signals / sizeof libtor_signals[0])
#define LIBTOR_NCRASH 6
static struct sigaction libtor_go_handlers[LIBTOR_NSIGNALS];

// Called from init, when the Go runtime's handlers are installed.
static void libtor_save_signals(void) {
	for (int i = 0; i < LIBTOR_NSIGNALS; i++)
		sigaction(libtor_signals[i], NULL, &libtor_go_handlers[i]);
}

// Returns the first signal whose handler is no longer the Go runtime's, or 0.
static int libtor_changed_signal(void) {
	for (int i = 0; i < LIBTOR_NSIGNALS; i++) {
		struct sigaction cur;
		sigaction(libtor_signals[i], NULL, &cur);
		if (cur.sa_sigaction != libtor_go_handlers[i].sa_sigaction)
			return libtor_signals[i];
	}
	return 0;
}

// A tor built with its crash handler resets the crash signals to SIG_DFL on
// exit, after which a Go nil dereference kills the process without a panic.
static void libtor_restore_crash_signals(void) {
	for (int i = 0; i < LIBTOR_NCRASH; i++)
		sigaction(libtor_signals[i], &libtor_go_handlers[i], NULL);
}

// The owning control socket is passed as __OwningControllerFD rather than made
// by tor_main_configuration_setup_control_socket: tor closes that socket when
// it exits, and tor_main_configuration_free would then close the same
// descriptor number again, when it may belong to a new Go socket or file.
static int libtor_run(int argc, char **argv) {
	tor_main_configuration_t *cfg = tor_main_configuration_new();
	if (cfg == NULL)
		return -1;
	int rc = -1;
	if (tor_main_configuration_set_command_line(cfg, argc, argv) == 0)
		rc = tor_run_main(cfg);
	tor_main_configuration_free(cfg);
	return rc;
}

// Go's os.Exit does not flush C's stdio buffers (tor --version uses printf).
static void libtor_flush(void) { fflush(NULL); }
*/
import "C"

import (
	"fmt"
	"os"
	"unsafe"
)

// Available reports whether tor is linked into this binary.
const Available = true

func init() {
	C.libtor_save_signals()
	if len(os.Args) > 1 && os.Args[1] == ChildArg {
		os.Exit(runChild(os.Args[2:]))
	}
}

// Version returns the version of the linked-in tor, e.g. "tor 0.4.9.11".
func Version() string { return C.GoString(C.tor_api_get_provider_version()) }

// DebianVersion returns the version of the Debian source package the
// linked-in tor was built from, e.g. "0.4.9.11-0+deb12u1".
func DebianVersion() string { return C.GoString(C.libtor_deb_version()) }

// GPL reports whether the linked-in tor was built with --enable-gpl (and so
// with onion-service proof-of-work), which puts the whole binary under the
// GPL-3.0.
func GPL() bool { return C.libtor_gpl() != 0 }

// buildID is the SHA-256 of the linked libtor.a.
func buildID() string { return C.GoString(C.libtor_build_id()) }

// CheckSignalHandlers reports an error if the Go runtime's handler for a
// signal that tor can take over has been replaced since this package was
// initialized. Call it while an in-process tor runs: an error means libtor.a
// was not built by scripts/build-libtor.sh (its crash handler is compiled in)
// or tor's signal handling was switched back on.
func CheckSignalHandlers() error {
	if sig := C.libtor_changed_signal(); sig != 0 {
		return fmt.Errorf("noisetor: embedded tor replaced the Go runtime's handler for signal %d", int(sig))
	}
	return nil
}

func restoreCrashSignals() { C.libtor_restore_crash_signals() }

// runTor runs tor_run_main with args (args[0] is the program name) on the
// calling thread and returns its result.
func runTor(args []string) int {
	argv := (**C.char)(C.calloc(C.size_t(len(args)+1), C.size_t(unsafe.Sizeof((*C.char)(nil)))))
	list := unsafe.Slice(argv, len(args)+1)
	for i, a := range args {
		list[i] = C.CString(a)
	}
	rc := C.libtor_run(C.int(len(args)), argv)
	for _, p := range list {
		C.free(unsafe.Pointer(p))
	}
	C.free(unsafe.Pointer(argv))
	return int(rc)
}

// runChild is the whole life of a NewCreator child process.
func runChild(args []string) int {
	rc := runTor(append([]string{"tor"}, args...))
	C.libtor_flush()
	if rc < 0 || rc > 255 {
		return 1
	}
	return rc
}
