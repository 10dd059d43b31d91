#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the benchmarks use.
# qemu-system-x86 and qemu-utils come from the same release on purpose: mixing
# versions makes apt remove one of them. (A machine with a newer qemu-utils
# from backports gets Debian 12's pair, 7.2; every test passes with either.)
set -euo pipefail
# clang and libbpf-dev build the tunnel's kernel fast path (tunnel/bpf, by tunnel/build.rs); ethtool turns a veth's offloads off in its tests
pkgs=(qemu-utils qemu-system-x86 busybox-static cpio libnbd-bin iproute2 e2fsprogs bind9 bind9-dnsutils dnsperf clang libbpf-dev ethtool)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; run as root (sudo) so they can be installed" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian 12's qemu-system-x86 replaces a newer qemu-utils from backports
# (apt removes it): put qemu-img back, from the same release.
if ! command -v qemu-img >/dev/null 2>&1; then
  echo "installing: qemu-utils (to match qemu-system-x86)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi
