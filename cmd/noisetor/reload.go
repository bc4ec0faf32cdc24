package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/noisetor/noisetor"
)

// notifyReload makes c receive SIGHUP, with which the operator asks a
// long-running command to reload its keyring file, and returns the function
// that stops it. A variable, so that tests can deliver the request without
// signalling the test binary.
var notifyReload = func(c chan<- os.Signal) (stop func()) {
	signal.Notify(c, syscall.SIGHUP)
	return func() { signal.Stop(c) }
}

// keyringPollInterval is how often the commands check their keyring file
// for changes: zero means the default of noisetor.KeyringFile; negative, not
// at all (SIGHUP only), for tests of SIGHUP.
var keyringPollInterval time.Duration

// followKeyring keeps kr, loaded from the keyring file path, equal to the
// file until the returned function is called: it reloads the file on SIGHUP
// and when it changes (noisetor.KeyringFile). A reload that fails is logged
// to log and keeps the old keyring.
func followKeyring(ctx context.Context, path string, kr *noisetor.Keyring, log *slog.Logger) (stop func()) {
	kf := &noisetor.KeyringFile{Path: path, Keyring: kr, Interval: keyringPollInterval, Logger: log}
	ctx, cancel := context.WithCancel(ctx)
	hup := make(chan os.Signal, 1)
	stopNotify := notifyReload(hup)
	var wg sync.WaitGroup
	if keyringPollInterval >= 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kf.Watch(ctx)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				log.Info("noisetor: SIGHUP: reloading the keyring file", "path", path)
				kf.Reload() // logs a failure itself
			}
		}
	}()
	return func() {
		stopNotify()
		cancel()
		wg.Wait()
	}
}

// reloadHelp is the paragraph of the long-running commands' help about
// keyring reloads.
const reloadHelp = `While it runs, it reloads the keyring file on SIGHUP and whenever the file
changes (checked twice a second): a peer removed from the file is cut off at
once, and a file that fails to load is logged with its bad line and changes
nothing, the old keyring staying in force. An onion service whose auth= keys
changed is published again at once with the new set, so that tor itself
refuses a removed peer; other peers' connections stay up.`
