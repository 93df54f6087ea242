#!/usr/bin/env bash
# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# Soak of issue 3 (not in CI): `bench/soak.sh [MINUTES]` (default 3) runs the
# tracer with --pids-file and --follow-children under thousands of short-lived
# processes a second and a churning pids file, samples its RSS and map fill
# every 10 s and says whether they stay flat (exit 1 if not). Run as root.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "soak.sh: run as root (it loads BPF programs)" >&2; exit 1; }
PKGS=(clang llvm bpftool gcc libc6-dev libbpf-dev)
. ./prepare.sh
exec ../.venv/bin/python soak.py "$@"
