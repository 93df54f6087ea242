#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine to build, run and test runqlat-core:
# Debian packages (compiler for the BPF object, libbpf, bpftool, reference tools),
# a virtualenv with the Python package installed editable, and the built BPF object.
# Safe to run twice; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() { [ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs Debian packages)" >&2; exit 1; }; }

PKGS=(clang llvm make libbpf-dev libbpf1 bpftool python3-venv python3-dev
      libbpf-tools linux-perf stress-ng util-linux procps ${EXTRA_PKGS:-})
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_root
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
make -s -C bpf
# bpffs is where libbpf expects to pin; mount it if the distro did not
mountpoint -q /sys/fs/bpf 2>/dev/null || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
echo "setup: ok ($(.venv/bin/python -c 'import runqlat; print(runqlat.__version__)'))"
