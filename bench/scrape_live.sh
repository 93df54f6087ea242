#!/usr/bin/env bash
# SPDX-License-Identifier: (GPL-2.0 OR MIT)
# Real /metrics scrapes of a tracer following 10,000 sleepers under -P.
#
# Default: exporter only (-q: no printing shares the GIL), this checkout
# against the per-CPU-row tracer of bench/scale.py's OLD_COMMIT
# (prometheus_client's exposition), interleaved ROUNDS times: three plain
# scrapes and one as Prometheus asks (OpenMetrics, gzip) each. Run as root
# after bench/scale.sh has built out/old-percpu.
#
# --json [--base REF]: the tracer also prints JSON of every key each 1 s
# interval (to a file), as a user watching and exporting at once runs it; this
# checkout against REF (default f7d5edc, before the scrape shared the
# printer's reading), built into out/tree-<sha>. Five plain scrapes 1.3 s
# apart (so they fall at every point of the interval) and one OpenMetrics +
# gzip per tracer and round. --probe: both run under bench/scrape_probe.py,
# whose summary (where the scrape's time went: CPU, run-queue, monitor lock,
# GIL) is printed after each run.
#
# Usage: bash bench/scrape_live.sh [--json [--base REF] [--probe]] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scrape_live.sh: run as root (it loads BPF programs)" >&2; exit 1; }
JSON=0 PROBE=0 BASE=f7d5edc
while [ $# -gt 0 ]; do
    case "$1" in
        --json) JSON=1; shift ;;
        --probe) PROBE=1; shift ;;
        --base) BASE=$2; shift 2 ;;
        *) break ;;
    esac
done
ROUNDS=${1:-2}
OUT=bench/out/scrape-live
mkdir -p "$OUT"
make -s -C bench
if [ "$JSON" = 1 ]; then
    SHA=$(git rev-parse --short=10 "$BASE^{commit}")
    OLD=bench/out/tree-$SHA
    if [ ! -f "$OLD/python/runqlat/data/runqlat.bpf.o" ]; then
        mkdir -p "$OLD"
        git archive "$SHA" | tar -x -C "$OLD"
        make -s -C "$OLD/bpf"
    fi
    OLD_NAME=$SHA SCRAPES=5 GAP=1.3
else
    [ -d bench/out/old-percpu/python ] || { echo "scrape_live.sh: run bench/scale.sh first (builds out/old-percpu)" >&2; exit 1; }
    OLD=bench/out/old-percpu OLD_NAME=567f52f SCRAPES=3 GAP=1
fi
scrape() {  # label file url [curl options]: prints "label: S s"
    local label=$1 file=$2 url=$3; shift 3
    printf '%s: %s s\n' "$label" "$(curl -s -o "$file" -w '%{time_total}' "$@" "$url")"
}
one() {  # which: new | old
    local sl tr port args
    rm -f "$OUT/pids" "$OUT/$1.json"
    bench/out/procs sleepers 10000 500 1500 "$OUT/pids" & sl=$!
    while [ ! -s "$OUT/pids" ]; do sleep 0.2; done
    port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if [ "$JSON" = 1 ]; then
        args=(run 1 -P --pids-file "$OUT/pids" -o json --output-file "$OUT/$1.json" --metrics-addr "127.0.0.1:$port")
    else
        args=(run -P --pids-file "$OUT/pids" -q --metrics-addr "127.0.0.1:$port")
    fi
    if [ "$PROBE" = 1 ]; then
        local tree=python
        [ "$1" = old ] && tree=$OLD/python
        PROBE_PYTHON=$tree .venv/bin/python bench/scrape_probe.py "$OUT/probe-$1.jsonl" -- "${args[@]}" \
            2>"$OUT/$1.log" & tr=$!
    elif [ "$1" = new ]; then
        .venv/bin/runqlat-core "${args[@]}" 2>"$OUT/$1.log" & tr=$!
    else
        PYTHONPATH=$OLD/python .venv/bin/python -m runqlat "${args[@]}" 2>"$OUT/$1.log" & tr=$!
    fi
    sleep 12  # loaded, attached, every sleeper woken
    local name=$1
    [ "$1" = old ] && name="old ($OLD_NAME)"
    for i in $(seq "$SCRAPES"); do
        scrape "$name scrape $i" "$OUT/page" "http://127.0.0.1:$port/metrics"
        sleep "$GAP"
    done
    scrape "$name OpenMetrics+gzip scrape" "$OUT/page.gz" "http://127.0.0.1:$port/metrics" -H 'Accept-Encoding: gzip' \
        -H 'Accept: application/openmetrics-text;version=1.0.0'
    if [ "$JSON" = 1 ]; then
        echo "$name: $(wc -l <"$OUT/$1.json") JSON lines printed, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    fi
    kill -INT "$tr"; wait "$tr" || true
    kill -TERM "$sl"; wait "$sl" || true
    if [ "$PROBE" = 1 ]; then
        echo "$name, where the time went:"
        .venv/bin/python bench/scrape_probe.py --summary "$OUT/probe-$1.jsonl"
    fi
}
echo "scrape_live.sh $(date -u '+%Y-%m-%d %H:%M') UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do echo "round $r"; one new; one old; done
echo "series per page: $(grep -vc '^#' "$OUT/page")"
