#!/usr/bin/env bash
# Fetches the containerd releases the snapshotter tests run against besides Debian 12's 1.6:
# Debian 13's containerd 1.7 (suite trixie) and Debian unstable's 2.x (suite unstable). Their
# binaries link only libc, so they run on Debian 12 unpacked anywhere.
#
# The .deb files come from `apt-get download` through an apt configuration of this script's own
# (sources list, lists and cache under the cache directory), with the mirror the system's sources
# use: the system's apt sources and package state are never touched. `dpkg-deb -x` unpacks each
# into CACHE/<package version>/, and CACHE/<suite> links to it.
#
# Idempotent: a suite whose unpacked binaries are in the cache and run is not fetched again (no
# network at all). `--refresh` fetches the suites' current versions anyway.
#
# Prints one line per suite: `SUITE BIN_DIR` (BIN_DIR holds containerd, ctr and
# containerd-shim-runc-v2). Fails loudly when a suite cannot be fetched (mirror unreachable,
# package missing): callers must not silently test fewer versions.
#
# Environment: LAZYSNAP_CONTAINERD_CACHE (default /var/cache/lazysnap/containerd),
# LAZYSNAP_DEBIAN_MIRROR (default: the first Debian mirror in the system's sources).
set -euo pipefail

SUITES=(trixie unstable)
CACHE=${LAZYSNAP_CONTAINERD_CACHE:-/var/cache/lazysnap/containerd}
refresh=0
[[ ${1:-} == --refresh ]] && refresh=1

die() { echo "containerd-versions: $*" >&2; exit 1; }

# The binaries of an unpacked package run (catches a truncated unpack or a missing libc symbol).
runs() {
  local bin=$1
  [[ -x $bin/containerd && -x $bin/ctr && -x $bin/containerd-shim-runc-v2 ]] &&
    "$bin/containerd" --version >/dev/null 2>&1 &&
    "$bin/ctr" --version >/dev/null 2>&1
}

# The system's Debian mirror: the first http(s) URI of a main-archive entry (not -security), in
# deb822 `.sources` files or one-line `sources.list` entries.
system_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e $f ]] || continue
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -e $f ]] || continue
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }' "$f"
  done
} 2>/dev/null

pending=()
for suite in "${SUITES[@]}"; do
  if ((refresh)) || ! runs "$CACHE/$suite/usr/bin"; then
    pending+=("$suite")
  fi
done

if ((${#pending[@]})); then
  mirror=${LAZYSNAP_DEBIAN_MIRROR:-$(system_mirror | grep -v -- '-security' | head -n 1 || true)}
  [[ -n $mirror ]] || die "no Debian mirror found in /etc/apt/sources*; set LAZYSNAP_DEBIAN_MIRROR"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -r $keyring ]] || die "$keyring missing: install debian-archive-keyring"
  apt_dir=$CACHE/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
  : >"$apt_dir/sources.list"
  for suite in "${pending[@]}"; do
    echo "deb [signed-by=$keyring] $mirror $suite main" >>"$apt_dir/sources.list"
  done
  # Everything apt reads or writes is under apt_dir, except the keyring and the system's apt.conf
  # (proxies), which are only read.
  apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::State::Status=$apt_dir/status"
    -o "Dir::Cache=$apt_dir/cache"
    -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
    -o Debug::NoLocking=1
    -o "APT::Architecture=$(dpkg --print-architecture)"
    -o Acquire::Languages=none
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
    -o APT::Sandbox::User=root
  )
  : >"$apt_dir/status"
  echo "containerd-versions: fetching containerd from $mirror (${pending[*]})" >&2
  apt-get "${apt_opts[@]}" -qq --error-on=any update >&2 ||
    die "apt-get update from $mirror failed for ${pending[*]} (mirror unreachable?)"
  for suite in "${pending[@]}"; do
    # madison: ` containerd | VERSION | MIRROR SUITE/main amd64 Packages`
    version=$(apt-cache "${apt_opts[@]}" madison containerd |
      awk -F'|' -v s=" $suite/" 'index($3, s) { gsub(/ /, "", $2); print $2; exit }')
    [[ -n $version ]] || die "no containerd package in $suite on $mirror"
    (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -qq download "containerd=$version" >&2) ||
      die "apt-get download containerd=$version ($suite) failed"
    deb=$(ls -t "$apt_dir/debs"/containerd_"${version//:/%3a}"_*.deb | head -n 1)
    target=$CACHE/$version
    rm -rf "$target.tmp"
    dpkg-deb -x "$deb" "$target.tmp"
    runs "$target.tmp/usr/bin" || die "containerd $version from $deb does not run here"
    rm -rf "$target"
    mv "$target.tmp" "$target"
    ln -sfn "$version" "$CACHE/$suite"
    rm -f "$deb"
  done
  # The package lists (~50 MB) are only needed to find the versions: drop them.
  rm -rf "$apt_dir/lists"
fi

for suite in "${SUITES[@]}"; do
  runs "$CACHE/$suite/usr/bin" || die "$CACHE/$suite/usr/bin does not run"
  echo "$suite $CACHE/$suite/usr/bin"
done
