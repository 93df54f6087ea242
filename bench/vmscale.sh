#!/usr/bin/env bash
# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# Issue 13, item 2: the CLI's CPU per interval in a Debian 6.1 guest with 64
# possible CPUs against the same guest with 2, interleaved (bench/vmscale.py;
# its options pass through: --processes, --pairs, --measure-s, --profile).
# Boots qemu guests under TCG one at a time; run as root, on an otherwise
# idle host (about 15 minutes for 3 pairs at 1,000 processes).
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "vmscale.sh: run as root (qemu exports / over 9p, the guest loads BPF)" >&2; exit 1; }

PKGS=(qemu-system-x86 clang llvm gcc libc6-dev libbpf-dev)
. ./prepare.sh
exec ../.venv/bin/python vmscale.py "$@"
