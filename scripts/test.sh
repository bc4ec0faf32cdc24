#!/usr/bin/env bash
# The README's test command. Installs what the tests need (tor, tor-gencert,
# softhsm2) when missing, then runs every check: gofmt, go vet, staticcheck, the whole
# suite under the race detector against a real private Tor network and real
# SoftHSM2 tokens, the embedded-Tor build and every test that starts a tor
# again on it with no tor in PATH, and every fuzz target for NOISETOR_FUZZTIME seconds
# (default 15; 0 skips the fuzzing, the seed corpora still run as tests).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Tests that need tor or SoftHSM fail here instead of skipping.
export NOISETOR_REQUIRE_ALL=1

step() { printf '\n== %s\n' "$*"; }

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
	echo "not gofmt'ed:"; echo "$unformatted"; exit 1
fi

step "go vet"
go vet ./...

# Pinned, run from the module proxy: the tool is not a dependency of the module.
staticcheck="go run honnef.co/go/tools/cmd/staticcheck@v0.8.2"
step "staticcheck"
$staticcheck ./...

step "go test -race"
go test -race -count=1 -timeout 20m ./...

# The race detector inflates and retains heap (it keeps freed memory and
# drops sync.Pool contents), so the abuse tests' memory bounds are loose
# under -race and strict here.
step "abuse tests without the race detector (strict memory bounds)"
go test -count=1 -run '^TestAbuse' .

# The one-binary build with Tor linked in, tested as a user without a tor
# package would test it: go test -tags embedtor ./... on a PATH that has
# every command but tor and tor-gencert (symlinks). Every tor of the tests,
# the private network's included, is then the embedded one, and tortest makes
# the directory authority's certificate itself; TestEmbeddedNetwork checks
# that each tor of the network is the test binary. Without -race: bine
# v0.2.0's tor.Close races with itself (its tor/tor.go lines 425 and 435),
# which the race detector reports in any test that closes a bine-started tor.
step "embedded tor (-tags embedtor), no tor or tor-gencert in PATH"
scripts/build-libtor.sh
go vet -tags embedtor ./...
$staticcheck -tags embedtor ./...
go build -tags embedtor -o /dev/null ./cmd/noisetor
notor=$(mktemp -d)
trap 'rm -rf "$notor"' EXIT
IFS=: read -ra pathdirs <<< "$PATH"
for d in "${pathdirs[@]}"; do
	for f in "$d"/*; do
		name=${f##*/}
		case $name in tor | tor-* | torify) continue ;; esac
		if [ -f "$f" ] && [ -x "$f" ] && [ ! -e "$notor/$name" ]; then
			ln -s "$f" "$notor/$name"
		fi
	done
done
if PATH=$notor command -v tor || PATH=$notor command -v tor-gencert; then
	echo "tor is still in the PATH of the embedded-tor tests"; exit 1
fi
# Every package that starts a tor, and the root package's Tor tests (its
# other tests do not depend on the build tag and ran above).
PATH=$notor go test -tags embedtor -count=1 -timeout 15m ./tortest ./internal/... ./cmd/... ./examples/...
PATH=$notor go test -tags embedtor -count=1 -timeout 15m -run '^(TestTor|TestEmbedded|TestRelayOverTor)' .

fuzztime=${NOISETOR_FUZZTIME:-15}
if [ "$fuzztime" != 0 ]; then
	step "fuzz (${fuzztime}s per target)"
	scripts/fuzz.sh "$fuzztime"
fi

step "all checks passed"
