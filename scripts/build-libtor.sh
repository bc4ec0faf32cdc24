#!/usr/bin/env bash
# build-libtor.sh - build the Tor that `go build -tags embedtor` links into
# noisetor: Debian's tor source package compiled into one static libtor.a.
#
#   scripts/build-libtor.sh && go build -tags embedtor ./cmd/noisetor
#
# The first run installs the -dev packages it needs (apt-get), fetches the
# tor source package through apt with a private deb-src list given on the
# command line (the system's apt configuration is not changed), and builds
# (about 1.5-2 minutes on 2 cores). Results are cached per Debian version,
# variant and build recipe; later runs take well under a second.
# Every run points internal/libtor at the cached build:
#
#   internal/libtor/dist           symlink to the cached build (lib/, include/)
#   internal/libtor/libtor_dist.h  identifies that build to the Go build cache
#
# Both are generated and must stay out of git.
#
# Options:
#   --client-only
#             leave out tor's relay and directory-authority modules: a
#             smaller binary that can only be a client and onion service.
#             The tortest fixture then cannot run its network on the
#             embedded tor (go test -tags embedtor needs the default build).
#   --gpl     also build tor's onion-service proof-of-work module. tor then
#             needs --enable-gpl and the resulting binary, noisetor included,
#             is covered by the GPL-3.0. The default build keeps tor's
#             3-clause BSD licence and has no PoW.
#   --update  ask the archive for a newer tor source package first (security
#             fixes); otherwise the source fetched on the first run is reused.
#   --force   rebuild even when a cached build exists.
#
# Environment:
#   NOISETOR_LIBTOR_CACHE  cache directory
#                          (default ${XDG_CACHE_HOME:-$HOME/.cache}/noisetor/libtor)
#   TOR_DEB_VERSION        pin a Debian source version, e.g. 0.4.9.11-0+deb12u1
#   JOBS                   parallel make jobs (default: nproc)
set -euo pipefail

gpl=0 update=0 force=0 relay=1
for arg in "$@"; do
  case $arg in
    --client-only) relay=0 ;;
    --gpl) gpl=1 ;;
    --update) update=1 ;;
    --force) force=1 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "build-libtor: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pkgdir=$root/internal/libtor
cache=${NOISETOR_LIBTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/noisetor/libtor}
jobs=${JOBS:-$(nproc)}
# The live Tor network refuses clients older than this (they lack FlowCtrl=1).
min_tor=0.4.8
# Part of the cache key: bump it whenever the configure or make steps change.
recipe=2
variant=bsd
[ "$gpl" = 1 ] && variant=gpl
[ "$relay" = 0 ] && variant=$variant-client

t0=$(date +%s)
log() { printf '[build-libtor %4ds] %s\n' "$(($(date +%s) - t0))" "$*"; }
die() { echo "build-libtor: $*" >&2; exit 1; }

[ -d "$pkgdir" ] || die "$pkgdir not found: run the script from a noisetor checkout"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one run at a time per cache

sudo=
[ "$(id -u)" = 0 ] || sudo=sudo

# ----------------------------------------------------------------- 1. packages
# Debian's -dev packages ship the static archives (libevent.a, libssl.a, ...)
# that the Go link needs too, so they are checked on every run.
pkgs=(build-essential dpkg-dev pkg-config
  libevent-dev libssl-dev zlib1g-dev liblzma-dev libzstd-dev libcap-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
libdir=/usr/lib/$(gcc -print-multiarch)
for l in event ssl crypto z lzma zstd cap; do
  [ -f "$libdir/lib$l.a" ] || die "$libdir/lib$l.a is missing"
done

# ------------------------------------------------------------------- 2. source
srcdir=$cache/src
aptdir=$cache/apt
mkdir -p "$srcdir"

# deb-src entries for the archives the system already uses for this release,
# so the source comes from the same mirror the binary packages come from.
write_src_lists() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] || die "no VERSION_CODENAME in /etc/os-release"
  local suites="^$codename(-updates|-security)?\$"
  rm -rf "$aptdir/parts"
  mkdir -p "$aptdir/parts" "$aptdir/lists/partial"
  chmod 755 "$aptdir" "$aptdir/lists" # readable by apt's _apt download user
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk -v re="$suites" 'BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; suites = ""; enabled = 1; body = ""
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^#/) continue
          if (tolower(line) ~ /^types:/) { types = substr(line, 7); continue }
          if (tolower(line) ~ /^enabled:/ && tolower(line) ~ /no/) enabled = 0
          if (tolower(line) ~ /^suites:/) {
            n = split(substr(line, 8), s, /[ \t]+/)
            for (j = 1; j <= n; j++) if (s[j] ~ re) suites = suites " " s[j]
            continue
          }
          body = body line "\n"
        }
        if (enabled && suites != "" && (" " types " ") ~ /[ \t]deb[ \t]/)
          printf "Types: deb-src\nSuites:%s\n%s\n", suites, body
      }' "$f"
  done > "$aptdir/parts/noisetor-src.sources"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] || continue
    # deb [options] uri suite component...
    awk -v re="$suites" '$1 == "deb" {
        i = 2
        if ($2 ~ /^\[/) while ($i !~ /\]$/ && i < NF) i++
        if ($2 ~ /^\[/) i++
        if ($(i + 1) ~ re) { sub(/^deb/, "deb-src"); print }
      }' "$f"
  done > "$aptdir/parts/noisetor-src.list"
  [ -s "$aptdir/parts/noisetor-src.sources" ] || [ -s "$aptdir/parts/noisetor-src.list" ] ||
    die "no Debian archive for $codename found in /etc/apt; cannot fetch the tor source package"
}

pick_dsc() {
  if [ -n "${TOR_DEB_VERSION:-}" ]; then
    ls "$srcdir/tor_${TOR_DEB_VERSION#*:}.dsc" 2>/dev/null || true
  else
    { ls -1 "$srcdir"/tor_*.dsc 2>/dev/null || true; } | sort -V | tail -n1
  fi
}

dsc=$(pick_dsc)
if [ -z "$dsc" ] || [ "$update" = 1 ]; then
  log "fetching the tor source package"
  write_src_lists
  apto=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$aptdir/parts"
    -o "Dir::State::Lists=$aptdir/lists")
  [ "$(id -u)" = 0 ] && apto+=(-o APT::Sandbox::User=root)
  apt-get "${apto[@]}" -qq update
  spec=tor
  [ -n "${TOR_DEB_VERSION:-}" ] && spec=tor=$TOR_DEB_VERSION
  # apt checks the .dsc against the signed Sources index (debian-archive-
  # keyring); dpkg-source below checks the tarballs against the .dsc.
  (cd "$srcdir" && apt-get "${apto[@]}" -qq source --download-only "$spec" >/dev/null)
  rm -rf "$aptdir/lists" # 20 MB of package lists, fetched again by --update
  dsc=$(pick_dsc)
  [ -n "$dsc" ] || die "apt-get source $spec fetched no .dsc"
fi
debver=$(basename "$dsc" .dsc)
debver=${debver#tor_}
torver=${debver%%-*}
dpkg --compare-versions "$torver" ge "$min_tor" ||
  die "tor $torver is too old: the Tor network needs >= $min_tor"

# ---------------------------------------------------------------- 3. cached?
key=$debver-$variant-r$recipe
out=$cache/out/$key

install_into_tree() {
  if [ -e "$pkgdir/dist" ] && [ ! -L "$pkgdir/dist" ]; then
    die "$pkgdir/dist exists and is not a symlink; remove it"
  fi
  ln -sfn "$out" "$pkgdir/dist"
  # The Go build cache does not hash libtor.a (it is only named in #cgo
  # LDFLAGS) but does hash .h files in the package directory: this header
  # makes a rebuilt libtor.a relink every binary.
  local hdr
  hdr=$(printf '%s\n' \
    '/* Generated by scripts/build-libtor.sh; not committed. */' \
    "#define NOISETOR_LIBTOR_ID \"$(cut -d' ' -f1 "$out/libtor.a.sha256")\"" \
    "#define NOISETOR_LIBTOR_DEB_VERSION \"$debver\"" \
    "#define NOISETOR_LIBTOR_GPL $gpl")
  if [ ! -f "$pkgdir/libtor_dist.h" ] || [ "$(cat "$pkgdir/libtor_dist.h")" != "$hdr" ]; then
    printf '%s\n' "$hdr" > "$pkgdir/libtor_dist.h"
  fi
}

summary() {
  local lic="3-clause BSD, no onion-service PoW"
  [ "$gpl" = 1 ] && lic="GPL-3.0 (--enable-gpl), with onion-service PoW"
  local mods="relay and directory-authority modules"
  [ "$relay" = 0 ] && mods="client only"
  echo "libtor: tor $torver from Debian source $debver; $lic; $mods"
  echo "libtor: $(du -h "$out/lib/libtor.a" | cut -f1) $out/lib/libtor.a"
}

if [ -f "$out/BUILDINFO" ] && [ "$force" = 0 ]; then
  install_into_tree
  summary
  log "cached build (built in $(sed -n 's/^BUILD_SECONDS=//p' "$out/BUILDINFO") s)"
  exit 0
fi

# ------------------------------------------------------------------ 4. build
work=$cache/work
rm -rf "$work" "$out.tmp"
mkdir -p "$work" "$out.tmp/lib" "$out.tmp/include"
log "unpacking $(basename "$dsc")"
# The .dsc signature needs debian-keyring to check; its checksums are checked.
(cd "$work" && dpkg-source -q -x "$dsc" src 2>&1 | grep -v '^gpgv:\|verify inline signature\|OpenPGP signature' || true)
[ -f "$work/src/configure" ] || die "unpacking $dsc failed"
cd "$work/src"
[ -f debian/micro-revision.i ] && cp debian/micro-revision.i micro-revision.i

# internal/libtor relies on these hidden options of tor_run_main.
for opt in __OwningControllerFD __DisableSignalHandlers; do
  grep -q "\"$opt\"" src/app/config/config.c || die "tor $torver has no $opt option"
done

modflags=()
[ "$relay" = 0 ] && modflags=(--disable-module-relay --disable-module-dirauth)
licflags=(--disable-module-pow)
[ "$gpl" = 1 ] && licflags=(--enable-gpl)
log "configure ($variant)"
t1=$(date +%s)
# The relay and dirauth modules are what tortest's private network (a
#   directory authority and relays) runs on; a client or onion service never
#   turns them on. --client-only drops them.
# --disable-seccomp: Sandbox 1 would filter the whole Go process.
# --enable-pic: -fPIC, so -buildmode=pie and c-shared also link.
# ac_cv_header_execinfo_h=no compiles out tor's crash handler, which would
#   replace the Go runtime's SIGSEGV/SIGBUS/SIGFPE handlers: a recoverable
#   Go nil-pointer panic would abort the process while tor runs, and kill
#   it with a bare SIGSEGV after tor exits.
# --prefix=/usr etc. only set compiled-in defaults such as the GeoIP path.
./configure \
  --prefix=/usr --sysconfdir=/etc --localstatedir=/var \
  --disable-dependency-tracking --disable-silent-rules \
  --disable-asciidoc --disable-manpage --disable-html-manual \
  --disable-unittests --disable-system-torrc --disable-systemd \
  --disable-seccomp --disable-libscrypt \
  --enable-pic --enable-lzma --enable-zstd \
  "${modflags[@]}" "${licflags[@]}" \
  ac_cv_header_execinfo_h=no \
  > "$work/configure.log" 2>&1 || { tail -40 "$work/configure.log"; die "configure failed"; }
grep -q 'define HAVE_EXECINFO_H 1' orconfig.h && die "tor's crash handler is still compiled in"
t2=$(date +%s)
log "make -j$jobs libtor.a"
make -j"$jobs" libtor.a > "$work/make.log" 2>&1 || { tail -40 "$work/make.log"; die "make failed"; }
t3=$(date +%s)

cp libtor.a "$out.tmp/lib/"
cp src/feature/api/tor_api.h "$out.tmp/include/"
cp LICENSE "$out.tmp/LICENSE.tor"
(cd "$out.tmp/lib" && sha256sum libtor.a) > "$out.tmp/libtor.a.sha256"
sed -n '/^Tor Version:/,$p' "$work/configure.log" > "$out.tmp/configure-summary.txt"
cat > "$out.tmp/BUILDINFO" <<EOF
TOR_VERSION=$torver
DEB_VERSION=$debver
VARIANT=$variant
BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CONFIGURE_SECONDS=$((t2 - t1))
MAKE_SECONDS=$((t3 - t2))
BUILD_SECONDS=$((t3 - t0))
EOF
rm -rf "$out"
mv "$out.tmp" "$out"
cd "$root"
rm -rf "$work"
install_into_tree
summary
log "built in $((t3 - t0)) s (configure $((t2 - t1)) s, make $((t3 - t2)) s)"
