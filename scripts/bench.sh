#!/usr/bin/env bash
# bench.sh - run noisetor's comparison benchmarks in interleaved rounds and
# print the medians of the ratios that issue 15 sets targets for.
#
#   scripts/bench.sh [count]        (default 5)
#   scripts/bench.sh -f raw.txt     (analyse an earlier run again)
#
# Each benchmark measures its own baselines in the same run, interleaved with
# the measured operation (crypto/tls 1.3 and raw TCP; for throughput also the
# AEAD on full frames), and reports the ratios itself (x-tls13, x-bound, and
# -cpu variants by CPU time; see bench_test.go). This script builds the test
# binary once and runs it `count` times with -test.count=1, so that a load
# spike on a shared machine spoils one round, not one side of a ratio; it
# prints the median over rounds of every ratio, the load average of each
# round, and the CPU. The raw output is in the standard benchmark format
# (benchstat reads it); its path is printed at the end.
#
# Before each round the script waits (up to 2 minutes) while the 1-minute
# load average exceeds the number of CPUs. Wall-clock ratios assume the two
# ends of a connection have a core each; when other work shares the cores,
# trust the -cpu ratios more.
#
# BENCHTIME=2s sets -test.benchtime (default 1s).
# BENCH_OUT=file keeps the raw output there (default: a new temporary file).
# BENCH_BIN=file runs that test binary instead of building one (to compare
# an older revision's code with the same benchmarks).
set -euo pipefail

usage() {
	echo "usage: $0 [count]      run and analyse" >&2
	echo "       $0 -f file      analyse an earlier run's raw output" >&2
	exit 2
}
count=${1:-5}
analyse_only=
if [ "$count" = "-f" ]; then
	[ $# -eq 2 ] || usage
	out=$2
	analyse_only=1
elif ! [[ $count =~ ^[0-9]+$ ]] || [ "$count" -eq 0 ]; then
	usage
fi
cd "$(dirname "$0")/.."

if [ -z "$analyse_only" ]; then
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	out=${BENCH_OUT:-$(mktemp "${TMPDIR:-/tmp}/noisetor-bench.XXXXXX")}
	: >"$out"
	bin=${BENCH_BIN:-}
	if [ -z "$bin" ]; then
		bin=$work/noisetor.test
		go test -c -o "$bin" .
	fi
	bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

	ncpu=$(nproc)
	echo "# cpu $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') (family $(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), model $(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), $ncpu CPUs)" | tee -a "$out" >&2
	load1() { cut -d' ' -f1 /proc/loadavg; }
	for round in $(seq 1 "$count"); do
		waited=0
		while awk -v l="$(load1)" -v n="$ncpu" 'BEGIN { exit !(l > n) }' && [ "$waited" -lt 120 ]; do
			[ "$waited" -eq 0 ] && echo "round $round: load $(load1) > $ncpu CPUs, waiting..." >&2
			sleep 10
			waited=$((waited + 10))
		done
		echo "round $round/$count: load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
		echo "# round $round load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out"
		(cd "$work" && "$bin" -test.run '^$' \
			-test.bench '^(BenchmarkThroughput|BenchmarkRoundTrip|BenchmarkHandshake|BenchmarkHandshakeKeyring|BenchmarkIdleConn)$' \
			-test.benchtime "${BENCHTIME:-1s}" -test.count 1 -test.benchmem) | tee -a "$out" | grep '^Benchmark' >&2
	done
fi

echo
awk '
function median(key,    n, i, j, v, tmp) {
	n = cnt[key]
	if (n == 0) return ""
	for (i = 1; i <= n; i++) v[i] = val[key, i]
	for (i = 2; i <= n; i++) {
		tmp = v[i]
		for (j = i - 1; j >= 1 && v[j] > tmp; j--) v[j + 1] = v[j]
		v[j + 1] = tmp
	}
	if (n % 2) return v[(n + 1) / 2]
	return (v[n / 2] + v[n / 2 + 1]) / 2
}
function m(name, unit) { return median(name SUBSEP unit) }
function check(label, name, unit, op, target,    r, ok) {
	r = m(name, unit)
	if (r == "") { printf "  %-46s    n/a\n", label; return }
	ok = (op == ">=") ? (r >= target) : (r <= target)
	printf "  %-46s %8.3f   target %s %-5g %s\n", label, r, op, target, ok ? "ok" : "MISSED"
}
/^# cpu/ { sub(/^# cpu /, ""); cpu = $0 }
/^# round/ { rounds++; loads = loads (loads == "" ? "" : ", ") $5 }
/^Benchmark/ {
	name = $1
	sub(/-[0-9]+$/, "", name)
	if (!(name in seen)) { seen[name] = 1; order[++names] = name }
	for (i = 3; i < NF; i += 2) {
		key = name SUBSEP $(i + 1)
		val[key, ++cnt[key]] = $i
	}
}
END {
	printf "CPU: %s\n", cpu
	printf "medians of %d rounds (1-minute load average at the start of each: %s)\n\n", rounds, loads
	printf "%-30s %12s %10s %12s %12s %12s %8s\n", "benchmark", "ns/op", "MB/s", "tls13", "tcp", "bound MB/s", "allocs"
	for (k = 1; k <= names; k++) {
		n = order[k]
		tls = m(n, "tls13-MB/s"); if (tls == "") tls = m(n, "tls13-ns/op")
		tcp = m(n, "tcp-MB/s"); if (tcp == "") tcp = m(n, "tcp-ns/op")
		printf "%-30s %12s %10s %12s %12s %12s %8s\n", n, m(n, "ns/op"), m(n, "MB/s"), tls, tcp, m(n, "bound-MB/s"), m(n, "allocs/op")
	}
	T = "BenchmarkThroughput/"; R = "BenchmarkRoundTrip/"; H = "BenchmarkHandshake/"
	print ""
	print "ratios (median over rounds of each round'"'"'s ratio)"
	check("throughput aesgcm / two-core bound", T "aesgcm", "x-bound", ">=", 0.8)
	check("throughput chachapoly / two-core bound", T "chachapoly", "x-bound", ">=", 0.8)
	check("throughput aesgcm / tls13", T "aesgcm", "x-tls13", ">=", 1.2)
	check("  raw tcp / tls13: the most any protocol can be", T "aesgcm", "tcp-x-tls13", ">=", 1.2)
	check("round trip aesgcm / tls13 (time)", R "aesgcm", "x-tls13", "<=", 1.0)
	check("round trip chachapoly / tls13 (time)", R "chachapoly", "x-tls13", "<=", 1.0)
	check("round trip aesgcm allocs/op", R "aesgcm", "allocs/op", "<=", 0)
	check("round trip chachapoly allocs/op", R "chachapoly", "allocs/op", "<=", 0)
	check("throughput aesgcm allocs/op (64 KiB)", T "aesgcm", "allocs/op", "<=", 0)
	check("handshake kk / tls13 mutual (time)", H "kk", "x-tls13", "<=", 0.5)
	check("handshake xk / tls13 mutual (time)", H "xk", "x-tls13", "<=", 0.5)
	check("handshake, 10,000-peer / 1-peer keyring", "BenchmarkHandshakeKeyring", "x-1peer", "<=", 1.1)
	check("  bytes allocated per handshake, 10,000 / 1", "BenchmarkHandshakeKeyring", "x-1peer-B", "<=", 1.1)
	check("idle conn heap per end (B)", "BenchmarkIdleConn", "B/conn", "<=", 4096)
	print "  by CPU time (steadier when other work shares the cores)"
	check("throughput aesgcm / bound", T "aesgcm", "x-bound-cpu", ">=", 0.8)
	check("throughput chachapoly / bound", T "chachapoly", "x-bound-cpu", ">=", 0.8)
	check("throughput aesgcm / tls13", T "aesgcm", "x-tls13-cpu", ">=", 1.2)
	check("round trip aesgcm / tls13", R "aesgcm", "x-tls13-cpu", "<=", 1.0)
	check("round trip chachapoly / tls13", R "chachapoly", "x-tls13-cpu", "<=", 1.0)
	check("handshake kk / tls13 mutual", H "kk", "x-tls13-cpu", "<=", 0.5)
	check("handshake xk / tls13 mutual", H "xk", "x-tls13-cpu", "<=", 0.5)
	check("handshake, 10,000-peer / 1-peer keyring", "BenchmarkHandshakeKeyring", "x-1peer-cpu", "<=", 1.1)
	print "  for information (no target)"
	check("throughput chachapoly / tls13 (AES-128-GCM)", T "chachapoly", "x-tls13", ">=", 0)
	check("noisetor read syscalls per 64 KiB, both ends", T "aesgcm", "reads/op", ">=", 0)
	check("noisetor write syscalls per 64 KiB", T "aesgcm", "writes/op", ">=", 0)
}' "$out"

bs=$(command -v benchstat || true)
if [ -z "$bs" ] && [ -x "$(go env GOPATH)/bin/benchstat" ]; then
	bs=$(go env GOPATH)/bin/benchstat
fi
if [ -n "$bs" ]; then
	echo
	"$bs" "$out" || true
fi
echo
echo "raw results: $out"
