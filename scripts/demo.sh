#!/bin/sh
# demo.sh: the README's first command. Installs what the demo needs when it
# is missing (tor, tor-gencert and softhsm2, through scripts/install-deps.sh),
# builds the noisetor command and runs its custody demo: a private Tor
# network on 127.0.0.1, a key ceremony with one key in SoftHSM, and a
# co-signer, a sync server, a watchtower, a wallet and an outsider, each in
# its own process with its own tor. Arguments go to `noisetor demo`
# (--keep keeps the keys and logs, -v prints every role's log).
set -eu
cd "$(dirname "$0")/.."

if ! command -v go >/dev/null 2>&1; then
	echo "demo.sh: Go is not installed (https://go.dev/dl/; noisetor needs Go 1.26)" >&2
	exit 1
fi
scripts/install-deps.sh

# Built, not `go run`, so that the demo's exit status is the script's.
# cgo is needed for PKCS#11 (the co-signer's key lives in SoftHSM).
bin=$(mktemp -d "${TMPDIR:-/tmp}/noisetor-bin-XXXXXX")
trap 'rm -rf "$bin"' EXIT
trap 'exit 130' INT TERM
echo "demo.sh: building noisetor..." >&2
CGO_ENABLED=1 go build -o "$bin/noisetor" ./cmd/noisetor
status=0
"$bin/noisetor" demo "$@" || status=$?
exit "$status"
