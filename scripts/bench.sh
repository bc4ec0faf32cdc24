#!/usr/bin/env bash
# bench.sh - run noisetor's comparison benchmarks and print medians and the
# ratios against crypto/tls that issue 5 sets targets for.
#
#   scripts/bench.sh [count]        (default 5)
#   scripts/bench.sh -f raw.txt     (analyse an earlier run again)
#
# Runs BenchmarkThroughput, BenchmarkHandshake and BenchmarkIdleConn `count`
# times each, like `go test -bench ... -count=5`, but interleaved: the test
# binary is built once and run `count` times with -test.count=1, so that every
# round measures tls13 and noisetor close together in time. On a machine
# shared with other work this keeps a load spike from landing on one side of
# a ratio only. The raw output is in the standard benchmark format (benchstat
# reads it); its path is printed at the end.
#
# Ratios are given two ways: "medians", the ratio of the medians, and
# "paired", the median over rounds of the ratio within a round (steadier when
# the load changes between rounds); each for wall-clock time (ns/op, MB/s) and for
# the CPU time the process used (cpu-ns/op), which a busy machine disturbs
# less. Before each round the script waits (up to 2 minutes) while the 1-minute
# load average exceeds the number of CPUs, and it prints the load it ran at.
#
# BENCHTIME=2s sets -test.benchtime (default 1s).
# BENCH_OUT=file keeps the raw output there (default: a new temporary file).
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

go test -c -o "$work/noisetor.test" .

ncpu=$(nproc)
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
	(cd "$work" && ./noisetor.test -test.run '^$' \
		-test.bench '^(BenchmarkThroughput|BenchmarkHandshake|BenchmarkIdleConn)$' \
		-test.benchtime "${BENCHTIME:-1s}" -test.count 1) | tee -a "$out" | grep '^Benchmark' >&2
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
function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "" : a / b }
# pr: the median over rounds of the ratio within each round (a paired
# comparison: both sides measured minutes apart at most).
function pr(a, b, unit,    r, k) {
	k = "pr" SUBSEP a SUBSEP b SUBSEP unit
	cnt[k] = 0
	for (r = 1; r <= rounds; r++)
		if ((r, a, unit) in rv && (r, b, unit) in rv && rv[r, b, unit] != 0)
			val[k, ++cnt[k]] = rv[r, a, unit] / rv[r, b, unit]
	return median(k)
}
function check(label, r, p, op, target,    ok) {
	if (r == "") { printf "  %-40s   n/a\n", label; return }
	ok = (op == ">=") ? (r >= target) : (r <= target)
	printf "  %-40s %6.2f %8s   target %s %.2f  %s\n", label, r, (p == "" ? "" : sprintf("%.2f", p)), op, target, ok ? "ok" : "MISSED"
}
/^# round/ { rounds++ }
/^Benchmark/ {
	name = $1
	sub(/-[0-9]+$/, "", name)
	if (!(name in seen)) { seen[name] = 1; order[++names] = name }
	for (i = 3; i < NF; i += 2) {
		key = name SUBSEP $(i + 1)
		val[key, ++cnt[key]] = $i
		rv[rounds, name, $(i + 1)] = $i
	}
}
END {
	printf "medians of %d runs\n", cnt[order[1] SUBSEP "ns/op"]
	printf "%-34s %14s %12s %14s %12s\n", "benchmark", "ns/op", "MB/s", "cpu-ns/op", "B/conn"
	for (k = 1; k <= names; k++) {
		n = order[k]
		printf "%-34s %14s %12s %14s %12s\n", n, m(n, "ns/op"), m(n, "MB/s"), m(n, "cpu-ns/op"), m(n, "B/conn")
	}
	T = "BenchmarkThroughput/"; H = "BenchmarkHandshake/"
	print ""
	printf "  %-40s %6s %8s   (ok/MISSED judged on the first)\n", "ratio", "medians", "paired"
	check("throughput aesgcm / tls13 (MB/s)", ratio(m(T "aesgcm", "MB/s"), m(T "tls13", "MB/s")), pr(T "aesgcm", T "tls13", "MB/s"), ">=", 1.2)
	check("throughput chachapoly / tls13 (MB/s)", ratio(m(T "chachapoly", "MB/s"), m(T "tls13", "MB/s")), pr(T "chachapoly", T "tls13", "MB/s"), ">=", 0.9)
	check("handshake kk / tls13 (ns/op)", ratio(m(H "kk", "ns/op"), m(H "tls13", "ns/op")), pr(H "kk", H "tls13", "ns/op"), "<=", 0.5)
	check("handshake xk / tls13 (ns/op, kk target)", ratio(m(H "xk", "ns/op"), m(H "tls13", "ns/op")), pr(H "xk", H "tls13", "ns/op"), "<=", 0.5)
	check("idle conn heap (B/conn) / 4096", ratio(m("BenchmarkIdleConn", "B/conn"), 4096), "", "<=", 1)
	print "  by CPU time (cpu-ns/op; throughput as tls13 cpu / noisetor cpu)"
	check("throughput aesgcm / tls13", ratio(m(T "tls13", "cpu-ns/op"), m(T "aesgcm", "cpu-ns/op")), pr(T "tls13", T "aesgcm", "cpu-ns/op"), ">=", 1.2)
	check("throughput chachapoly / tls13", ratio(m(T "tls13", "cpu-ns/op"), m(T "chachapoly", "cpu-ns/op")), pr(T "tls13", T "chachapoly", "cpu-ns/op"), ">=", 0.9)
	check("handshake kk / tls13", ratio(m(H "kk", "cpu-ns/op"), m(H "tls13", "cpu-ns/op")), pr(H "kk", H "tls13", "cpu-ns/op"), "<=", 0.5)
	check("handshake xk / tls13 (kk target)", ratio(m(H "xk", "cpu-ns/op"), m(H "tls13", "cpu-ns/op")), pr(H "xk", H "tls13", "cpu-ns/op"), "<=", 0.5)
}' "$out"

bs=$(command -v benchstat || true)
if [ -z "$bs" ] && [ -x "$(go env GOPATH)/bin/benchstat" ]; then
	bs=$(go env GOPATH)/bin/benchstat
fi
if [ -n "$bs" ]; then
	echo
	"$bs" "$out" || true
else
	echo
	echo "(for benchstat's table: go install golang.org/x/perf/cmd/benchstat@latest)"
fi
echo
echo "raw results: $out"
