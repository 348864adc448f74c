#!/usr/bin/env bash
# The test command: installs what the tests need, then formatting, lints and every test.
# Tests start real parts (docker-registry, containerd, FUSE mounts) on loopback, so run as root.
# tests/snapshotter.rs runs once per containerd release: Debian 12's 1.6 (in `cargo test`), then
# Debian 13's 1.7 and unstable's 2.x, fetched (or found cached) by scripts/containerd-versions.sh.
# A fetch that fails (mirror unreachable) fails this script: fewer releases are never tested
# silently.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
releases=$(scripts/containerd-versions.sh)
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test
while read -r suite bin_dir; do
  echo "test.sh: tests/snapshotter.rs against $("$bin_dir/containerd" --version) ($suite)" >&2
  LAZYSNAP_CONTAINERD=$bin_dir cargo test --test snapshotter
done <<<"$releases"
