#!/usr/bin/env bash
# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# The performance benchmark of issue 5: scheduler hot-path cost of runqlat-core
# against an empty program and libbpf-tools runqlat, plus user-space figures.
# Needs no arguments (bench.py's options pass through: --rounds, --loops, --skip).
# Installs the Debian packages it needs, sets up the checkout if it is not yet,
# prints one report and keeps it in bench/out/. Run as root; takes 3-4 minutes
# on an idle 2-CPU machine (longer on a busy one).
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root (it loads BPF programs)" >&2; exit 1; }

PKGS=(linux-perf libbpf-tools stress-ng clang llvm bpftool gcc libc6-dev libbpf-dev util-linux)
. ./prepare.sh
exec ../.venv/bin/python bench.py "$@"
