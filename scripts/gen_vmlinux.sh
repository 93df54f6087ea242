#!/bin/sh
# Regenerate bpf/vmlinux.h from the running kernel's BTF (or a BTF file given as $1).
# The header is committed: CO-RE relocations make one build load on other kernels,
# so this only needs rerunning to pick up types that did not exist before.
set -eu
btf=${1:-/sys/kernel/btf/vmlinux}
out=$(dirname "$0")/../bpf/vmlinux.h
if [ ! -r "$btf" ]; then
    echo "gen_vmlinux.sh: cannot read BTF at $btf (kernel built without CONFIG_DEBUG_INFO_BTF?)" >&2
    exit 1
fi
command -v bpftool >/dev/null || { echo "gen_vmlinux.sh: bpftool not found (apt-get install bpftool)" >&2; exit 1; }
tmp=$(mktemp)
bpftool btf dump file "$btf" format c > "$tmp"
mv "$tmp" "$out"
echo "wrote $out from $btf"
