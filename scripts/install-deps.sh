#!/bin/sh
# install-deps.sh: install the system packages that noisetor's tests use,
# when they are missing: tor and tor-gencert (Debian package "tor") for the
# private Tor network of package tortest, and SoftHSM2 (package "softhsm2")
# for the PKCS#11 tests, and NSS's softokn (package "libnss3") for the tests
# against a second PKCS#11 module. Debian and Ubuntu (apt-get) only. Idempotent and
# quiet: it prints nothing when everything is already installed, and runs
# apt-get update only if the packages cannot be found without it.
set -eu

need=""
command -v tor >/dev/null 2>&1 && command -v tor-gencert >/dev/null 2>&1 || need="$need tor"
if ! command -v softhsm2-util >/dev/null 2>&1 ||
	! ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so >/dev/null 2>&1; then
	need="$need softhsm2"
fi
softokn=""
for f in /usr/lib/*/libsoftokn3.so /usr/lib/*/nss/libsoftokn3.so; do [ -e "$f" ] && softokn=$f; done
[ -n "$softokn" ] || need="$need libnss3"
[ -z "$need" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
	echo "install-deps.sh: missing:$need; install them with your package manager" >&2
	exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null 2>&1 || { echo "install-deps.sh: need root (or sudo) to install:$need" >&2; exit 1; }
	sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
install() {
	# shellcheck disable=SC2086 # $need is a list of package names
	$sudo apt-get install -y -q --no-install-recommends $need >"$log" 2>&1
}
echo "install-deps.sh: installing$need" >&2
if ! install; then
	# Usually: no package lists yet (a fresh container), or stale ones.
	$sudo apt-get update -q >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
	install || { cat "$log" >&2; exit 1; }
fi

# On a systemd host the Debian package starts a system tor (tor@default)
# that tries to reach the public network. Tests never use it; stop it,
# but only if this script just installed tor.
case "$need" in *tor*)
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		$sudo systemctl disable --now tor.service >/dev/null 2>&1 || true
	fi
esac
exit 0
