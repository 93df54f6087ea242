# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# Sourced by run.sh and soak.sh from bench/: install the Debian packages named
# in PKGS that are missing, set up the checkout if it is not yet (setup.sh does
# nothing that is done) and build the BPF object and the bench helpers.
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "$(basename "$0"): installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x ../.venv/bin/runqlat-core ] || [ ! -f ../python/runqlat/data/runqlat.bpf.o ]; then
    bash ../scripts/setup.sh
fi
make -s -C ../bpf
make -s
