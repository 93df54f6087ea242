#!/usr/bin/env bash
# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# One real /metrics scrape of a tracer following 10,000 sleepers under -P,
# exporter only (-q: no printing shares the GIL), this checkout against the
# per-CPU-row tracer of bench/scale.py's OLD_COMMIT (prometheus_client's
# exposition), interleaved ROUNDS times: three plain scrapes and one as
# Prometheus asks (OpenMetrics, gzip) each. Run as root after bench/scale.sh
# has built out/old-percpu.  Usage: bash bench/scrape_live.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scrape_live.sh: run as root (it loads BPF programs)" >&2; exit 1; }
[ -d bench/out/old-percpu/python ] || { echo "scrape_live.sh: run bench/scale.sh first (builds out/old-percpu)" >&2; exit 1; }
make -s -C bench
ROUNDS=${1:-2}
OUT=bench/out/scrape-live
mkdir -p "$OUT"
one() {  # which: new | old
    local sl tr port
    rm -f "$OUT/pids"
    bench/out/procs sleepers 10000 500 1500 "$OUT/pids" & sl=$!
    while [ ! -s "$OUT/pids" ]; do sleep 0.2; done
    port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if [ "$1" = new ]; then
        .venv/bin/runqlat-core run -P --pids-file "$OUT/pids" -q --metrics-addr "127.0.0.1:$port" 2>"$OUT/$1.log" & tr=$!
    else
        PYTHONPATH=bench/out/old-percpu/python .venv/bin/python -m runqlat run -P --pids-file "$OUT/pids" -q \
            --metrics-addr "127.0.0.1:$port" 2>"$OUT/$1.log" & tr=$!
    fi
    sleep 12  # loaded, attached, every sleeper woken
    for i in 1 2 3; do
        /usr/bin/time -f "$1 scrape $i: %e s" curl -s -o "$OUT/page" "http://127.0.0.1:$port/metrics"
        sleep 1
    done
    /usr/bin/time -f "$1 OpenMetrics+gzip scrape: %e s" curl -s -H 'Accept-Encoding: gzip' \
        -H 'Accept: application/openmetrics-text;version=1.0.0' -o "$OUT/page.gz" "http://127.0.0.1:$port/metrics"
    kill -INT "$tr"; wait "$tr" || true
    kill -TERM "$sl"; wait "$sl" || true
}
for r in $(seq "$ROUNDS"); do one new; one old; done
echo "series per page: $(grep -vc '^#' "$OUT/page")"
