#!/usr/bin/env bash
# The main job end to end on a built-in default: start a registry on 127.0.0.1, build a real
# Debian 12 + python3 image from Debian packages (cached under $LAZYSNAP_CACHE, default
# /var/cache/lazysnap), push it as a plain image, convert it with `lazysnap convert` into
# zstd:chunked and eStargz, inspect the results (every TOC verified by range reads), and convert
# again to show that nothing is uploaded twice. Stops the registry on exit, even on failure.
#
# Usage: sudo scripts/demo.sh [--packages "python3"]
set -euo pipefail
cd "$(dirname "$0")/.."
packages="python3"
if [[ "${1:-}" == "--packages" ]]; then packages="$2"; fi

scripts/setup-debian.sh
echo "demo: building lazysnap (release)" >&2
cargo build --release --quiet --bin lazysnap
bin="$PWD/target/release/lazysnap"
[[ -n "${CARGO_TARGET_DIR:-}" ]] && bin="$CARGO_TARGET_DIR/release/lazysnap"

work=$(mktemp -d /tmp/lazysnap-demo.XXXXXX)
registry_pid=""
mount_pid=""
cleanup() {
  if [[ -n "$mount_pid" ]]; then kill -TERM "$mount_pid" 2>/dev/null; wait "$mount_pid" 2>/dev/null || true; fi
  umount -l "$work/rootfs" 2>/dev/null || true
  [[ -n "$registry_pid" ]] && tests/fixtures/stop-registry.sh "$registry_pid" || true
  rm -rf "$work"
}
trap cleanup EXIT

read -r addr registry_pid < <(tests/fixtures/start-registry.sh "$work/registry")
echo "demo: registry at $addr" >&2

echo "demo: building the Debian image with: $packages (cached after the first run)" >&2
layout=$(tests/fixtures/debian-image.sh --packages "$packages" "$work/layout" demo)
plain=$(tests/fixtures/push-layout.sh "$layout" "$addr/demo/app:plain")
echo "demo: pushed plain image $plain" >&2

for format in zstd-chunked estargz; do
  start=$(date +%s%3N)
  digest=$("$bin" convert --format "$format" "$addr/demo/app:plain" "$addr/demo/app:$format" | tail -n 1)
  ms=$(($(date +%s%3N) - start))
  echo "demo: $format: $digest in $((ms / 1000)).$((ms % 1000 / 100)) s" >&2
  "$bin" inspect "$addr/demo/app:$format"
  echo
done

echo "demo: converting again (reproducible: every blob already in the registry)" >&2
again=$("$bin" convert "$addr/demo/app:plain" "$addr/demo/app:zstd-chunked" 2>&1 >/dev/null | tail -n 1)
echo "demo: $again" >&2
echo "demo: mounting the lazy image and running its python3 before it is downloaded" >&2
mkdir -p "$work/rootfs"
start=$(date +%s%3N)
"$bin" --root "$work/state" mount --no-background-fetch "$addr/demo/app:zstd-chunked" "$work/rootfs" 2>"$work/mount.log" &
mount_pid=$!
for _ in $(seq 1 300); do
  grep -q "^mounted " "$work/mount.log" 2>/dev/null && break
  kill -0 "$mount_pid" 2>/dev/null || { cat "$work/mount.log" >&2; exit 1; }
  sleep 0.05
done
chroot "$work/rootfs" /usr/bin/python3 -c 'print("hello from a lazily mounted image")'
ms=$(($(date +%s%3N) - start))
kill -TERM "$mount_pid"; wait "$mount_pid" || true; mount_pid=""
fetched=$(grep "^unmounted" "$work/mount.log" | sed 's/.*fetched //')
echo "demo: mount + python3 hello in $((ms / 1000)).$((ms % 1000 / 100)) s, fetching $fetched of a 70 MB image" >&2
echo "demo: done. (the launcher, lazysnap run, comes with the next issue.)" >&2
