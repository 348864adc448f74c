#!/usr/bin/env bash
# The test command: installs what the tests need, then formatting, lints and every test.
# Tests start real parts (docker-registry, containerd, FUSE mounts) on loopback, so run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test
