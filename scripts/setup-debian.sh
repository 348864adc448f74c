#!/usr/bin/env bash
# Installs, from Debian packages, everything lazysnap's build, tests, demo and benchmarks use.
# Idempotent: skips apt entirely when every package is already installed. Run as root.
set -euo pipefail
if [[ $(id -u) != 0 ]]; then
  echo "setup-debian: run as root (from a user's shell: sudo $0)" >&2
  exit 1
fi

PACKAGES=(
  # build: system zstd for the zstd crate, protoc and libclang for the gRPC and RocksDB bindings
  pkg-config libzstd-dev protobuf-compiler libclang-dev librocksdb-dev
  # the real parts tests start: registry, runtime, containerd, FUSE
  docker-registry runc containerd fuse3
  # image tools: realistic images and third-party lazy formats to read
  skopeo umoci debootstrap stargz-snapshotter busybox-static
  # independent oracles and test helpers
  zstd gzip tar attr apache2-utils curl jq ca-certificates python3
  # scripts/containerd-versions.sh: verifies the other suites' Release files (apt-get download)
  debian-archive-keyring
  # ss (free ports in the registry fixture), ip and tc (the cold-start benchmark's namespace)
  iproute2
  # tests/privilege.rs: setcap/getcap, and a static probe program built with cc -static
  libcap2-bin gcc libc6-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-debian: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if ! command -v cargo >/dev/null; then
  echo "setup-debian: cargo not found; install Rust 1.85 or newer with rustup (Debian's rustc is too old)" >&2
  exit 1
fi
