#!/usr/bin/env bash
# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# Issue 13's benchmark: shared per-key rows against the per-CPU rows they
# replaced, side by side (bench/scale.py; its options pass through). Run as
# root; about 3 minutes on an idle 2-CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "scale.sh: run as root (it loads BPF programs)" >&2; exit 1; }

PKGS=(linux-perf stress-ng clang llvm bpftool gcc libc6-dev libbpf-dev util-linux git)
. ./prepare.sh
exec ../.venv/bin/python scale.py "$@"
