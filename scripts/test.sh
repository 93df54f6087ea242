#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the whole test suite, as root:
# unit and contract tests, BPF integration tests, containerd, docker, podman,
# Prometheus (and promtool) and
# .deb end-to-end tests, and the cross-kernel VM smoke tests (6.1, 6.12).
# Extra pytest arguments are passed on, e.g. `scripts/test.sh -m 'not vm'`.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the end-to-end tests run, installed in one go (the tests install any
# that are still missing themselves, so a single test can run on its own);
# the second line: debian/control's Build-Depends, lintian and mmdebstrap
# for tests/test_deb.py
EXTRA_PKGS="containerd runc busybox-static docker.io podman prometheus qemu-system-x86 systemd groff-base strace
    build-essential debhelper dh-python pybuild-plugin-pyproject python3-setuptools python3-wheel
    python3-typer python3-cffi python3-numpy python3-pyelftools python3-pytest bash-completion
    lintian mmdebstrap" \
    bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@" tests
