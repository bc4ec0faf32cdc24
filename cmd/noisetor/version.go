package main

import (
	"flag"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/noisetor/noisetor"
)

func init() { register(versionCmd) }

var versionCmd = &command{
	name:  "version",
	args:  "",
	short: "print the version of noisetor",
	long:  "Version prints noisetor's version, the Go version it was built with, the embedded Tor, if any, and whether PKCS#11 tokens can be used.",
	run: func(e *env, _ *flag.FlagSet, _ any, args []string) error {
		if err := wantArgs(args, 0, 0, ""); err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, versionString())
		return nil
	},
}

func versionString() string {
	v, rev := "(devel)", ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				rev = " " + s.Value[:12]
			}
		}
	}
	tor := "system tor"
	if tv, ok := noisetor.EmbeddedTorVersion(); ok {
		tor = "embedded " + tv
	}
	p11 := "PKCS#11"
	if !noisetor.PKCS11Available() {
		p11 = "no PKCS#11 (built without cgo)"
	}
	return fmt.Sprintf("noisetor %s%s (%s, %s/%s, %s, %s)", v, rev, runtime.Version(), runtime.GOOS, runtime.GOARCH, tor, p11)
}
