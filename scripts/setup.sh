#!/usr/bin/env bash
# Installs what building lmskv needs and is missing: libclang (for RocksDB's
# bindings), a C++ compiler, protoc (for the etcd client the benchmarks use),
# for the benchmarks etcd itself and a font for the charts, libfaketime
# (the chaos runs' clock-skew nemesis) and, for root, nftables (the chaos
# runs' random packet loss between network namespaces).
# Run as root to install; otherwise it only checks.
set -euo pipefail

missing=()
# libclang itself (libclang.so / libclang-N.so), not libclang-cpp, which
# other packages bring along and bindgen cannot use.
have_libclang=no
for d in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
  if compgen -G "$d/libclang.so*" >/dev/null || compgen -G "$d/libclang-[0-9]*.so*" >/dev/null; then
    have_libclang=yes
  fi
done
[ "$have_libclang" = yes ] || missing+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
# libfaketime, for the chaos runs' clock-skew nemesis.
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || compgen -G "/usr/lib/faketime/libfaketime.so.1" >/dev/null || missing+=(faketime)
# nft, for packet loss between the network namespaces chaos runs use as root
# (without root they run on TCP proxies and need no nft).
if [ "$(id -u)" = "0" ]; then
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs)" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      rustup component add "$comp" || { echo "setup: cannot add $comp" >&2; exit 1; }
    else
      echo "setup: cargo $comp is missing" >&2
      exit 1
    fi
  fi
done
