#!/usr/bin/env bash
# fuzz.sh - run every native Go fuzz target in the module, one after another.
#
#   scripts/fuzz.sh [seconds-per-target]      (default 30)
#
# Targets are discovered, not listed here: for each package of `go list ./...`,
# `go test -list '^Fuzz'` names its fuzz targets, and each runs alone with
# `go test -run '^$' -fuzz '^Name$' -fuzztime Ns`. Every target runs even
# after one fails. The exit status is non-zero if any target found a crash
# (Go writes the input to <package>/testdata/fuzz/<Target>/; commit it, and
# it runs as a regression test in every plain `go test` from then on), or if
# a package fails to build, or if no target is found at all.
#
# FUZZ_PARALLEL=n sets the fuzzing workers per target (default: GOMAXPROCS).
set -uo pipefail

secs=${1:-30}
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
	echo "usage: $0 [seconds-per-target]" >&2
	exit 2
fi
cd "$(dirname "$0")/.."

parallel=()
if [ -n "${FUZZ_PARALLEL:-}" ]; then
	parallel=(-parallel "$FUZZ_PARALLEL")
fi

if ! pkgs=$(go list ./...); then
	echo "fuzz.sh: go list failed" >&2
	exit 1
fi

ran=0
failed=()
for pkg in $pkgs; do
	if ! listing=$(go test -list '^Fuzz' "$pkg" 2>&1); then
		echo "fuzz.sh: cannot list the fuzz targets of $pkg:" >&2
		echo "$listing" >&2
		failed+=("$pkg (does not build)")
		continue
	fi
	for target in $(printf '%s\n' "$listing" | grep -E '^Fuzz[A-Za-z0-9_]*$'); do
		ran=$((ran + 1))
		echo "=== $pkg $target (${secs}s)"
		start=$SECONDS
		if go test -run '^$' -fuzz "^${target}\$" -fuzztime "${secs}s" "${parallel[@]}" "$pkg"; then
			echo "--- ok   $pkg $target ($((SECONDS - start))s)"
		else
			dir=$(go list -f '{{.Dir}}' "$pkg")
			echo "--- FAIL $pkg $target: failing input (if any) is in $dir/testdata/fuzz/$target/"
			failed+=("$pkg $target")
		fi
	done
done

if [ "$ran" -eq 0 ]; then
	echo "fuzz.sh: no fuzz targets found" >&2
	exit 1
fi
echo
echo "fuzz.sh: $ran targets, ${secs}s each, $((ran - ${#failed[@]})) passed"
if [ ${#failed[@]} -gt 0 ]; then
	printf 'FAILED: %s\n' "${failed[@]}"
	exit 1
fi
