#!/usr/bin/env bash
# The main job end to end on a built-in default: start a registry on 127.0.0.1, build a real
# Debian 12 + python3 image from Debian packages (cached under $LAZYSNAP_CACHE, default
# /var/cache/lazysnap), push it as a plain image, convert it with `lazysnap convert` into
# zstd:chunked and eStargz, inspect the results (every TOC verified by range reads), and convert
# again to show that nothing is uploaded twice, then run python3 from the lazy image with
# `lazysnap run` next to a full pull of the plain image. Stops the registry on exit, even on
# failure.
#
# Usage (as root): scripts/demo.sh [--packages "python3"]
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
cleanup() {
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
# Start-up, side by side in one run: the lazy image (only what python3 reads is fetched) and the
# plain image (every layer fetched, verified and unpacked first: a full pull), each with a fresh
# state root so neither finds anything cached.
hello='import sys; print("hello from", sys.version.split()[0])'
for kind in zstd-chunked plain; do
  echo "demo: lazysnap run $addr/demo/app:$kind python3 -c ..." >&2
  "$bin" --root "$work/state-$kind" run --no-background-fetch --report "$work/$kind.json" \
    "$addr/demo/app:$kind" python3 -c "$hello"
done
summary() { jq -r '"\(.first_exec_seconds * 1000 | floor) ms to first exec, \(.total_seconds * 100 | floor / 100) s in all, \(.fetched_at_exit / 1e6 * 10 | floor / 10) MB fetched lazily of \(.image_bytes / 1e6 * 10 | floor / 10) MB"' "$1"; }
echo "demo: lazy image:  $(summary "$work/zstd-chunked.json")" >&2
echo "demo: full pull:   $(summary "$work/plain.json") (plain layers: downloaded and unpacked before the start)" >&2
echo "demo: done" >&2
