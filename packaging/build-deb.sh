#!/usr/bin/env bash
# Builds runqlat-core_<version>_amd64.deb with dpkg-deb: the prebuilt BPF
# object, the Python package in /usr/lib/python3/dist-packages, a
# /usr/bin/python3 launcher, the systemd unit (installed, not enabled), the
# config as a conffile, the man page and the deploy/ examples.
#
#   bash packaging/build-deb.sh [OUTDIR]        (default OUTDIR: dist/)
#
# Needs only dpkg-deb, plus clang/llvm-strip when the BPF object is missing
# or older than its sources (make -C bpf). Installing the result pulls
# Debian's own python3-* packages and libbpf1, nothing else.
# Prints the path of the .deb on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)
cd "$ROOT"

PKG=runqlat-core
ARCH=amd64
# The object is compiled for one architecture (bpf/Makefile: ARCH=x86).
host_arch=$(dpkg --print-architecture)
[ "$host_arch" = "$ARCH" ] || { echo "build-deb.sh: only $ARCH is supported (this is $host_arch)" >&2; exit 1; }

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' python/runqlat/__init__.py)
[ -n "$VERSION" ] || { echo "build-deb.sh: no __version__ in python/runqlat/__init__.py" >&2; exit 1; }
grep -q "^version = \"$VERSION\"$" pyproject.toml \
    || { echo "build-deb.sh: pyproject.toml and runqlat/__init__.py disagree on the version" >&2; exit 1; }

make -s -C bpf
OBJ=python/runqlat/data/runqlat.bpf.o
[ -s "$OBJ" ] || { echo "build-deb.sh: $OBJ was not built" >&2; exit 1; }

# File times in the package: the last commit, so a rebuild of one commit is
# byte-identical.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH

STAGE=$ROOT/build/deb/${PKG}_${VERSION}_${ARCH}
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN"

PYDIR=$STAGE/usr/lib/python3/dist-packages/runqlat
DOC=$STAGE/usr/share/doc/$PKG

# Python package: every module (subpackages included), the cdef, the object.
(cd python/runqlat && find . -name '*.py' -not -path '*/__pycache__/*') | sort | while read -r f; do
    install -D -m 0644 "python/runqlat/$f" "$PYDIR/$f"
done
install -D -m 0644 python/runqlat/libbpf.cdef "$PYDIR/libbpf.cdef"
install -D -m 0644 "$OBJ" "$PYDIR/data/runqlat.bpf.o"

# The launcher: Debian's interpreter, never a virtualenv's.
install -d "$STAGE/usr/bin"
cat > "$STAGE/usr/bin/$PKG" <<'EOF'
#!/usr/bin/python3
import sys

from runqlat.cli import main

sys.exit(main())
EOF
chmod 0755 "$STAGE/usr/bin/$PKG"

install -D -m 0644 deploy/runqlat-core.service "$STAGE/usr/lib/systemd/system/$PKG.service"
install -D -m 0644 deploy/config.toml "$STAGE/etc/$PKG/config.toml"

install -d "$STAGE/usr/share/man/man1"
sed "s/^\.TH RUNQLAT-CORE 1 \"\" \"runqlat-core\"/.TH RUNQLAT-CORE 1 \"\" \"runqlat-core $VERSION\"/" \
    packaging/runqlat-core.1 | gzip -9n > "$STAGE/usr/share/man/man1/$PKG.1.gz"

install -d "$DOC/examples/kubernetes"
install -m 0644 deploy/prometheus.yml deploy/grafana-dashboard.json deploy/config.toml \
    deploy/Containerfile "$DOC/examples/"
install -m 0644 deploy/kubernetes/daemonset.yaml "$DOC/examples/kubernetes/"
{
    cat packaging/deb/copyright
    echo
    echo "License: MIT"
    sed -e '1,/^Copyright/d' -e 's/^$/./' -e 's/^/ /' LICENSE-MIT | sed -e '1{/^ \.$/d}'
} > "$DOC/copyright"
{
    echo "$PKG ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built from $(git rev-parse --short HEAD 2>/dev/null || echo 'an unversioned tree')."
    echo
    echo " -- runqlat-core developers <maintainers@runqlat-core.invalid>  $(date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$DOC/changelog.gz"

install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$STAGE/DEBIAN/"
echo "/etc/$PKG/config.toml" > "$STAGE/DEBIAN/conffiles"

INSTALLED_KB=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: runqlat-core developers <maintainers@runqlat-core.invalid>
Installed-Size: $INSTALLED_KB
Depends: python3 (>= 3.11), python3:any, libbpf1 (>= 1:1.1), python3-cffi, python3-pyelftools, python3-typer, python3-prometheus-client, python3-numpy
Section: admin
Priority: optional
Description: run-queue latency of chosen processes and containers, with eBPF
 Measures how long tasks wait on a CPU run queue before they run, like
 runqlat, for the processes, cgroups and containers you choose, as
 runqlat-style histograms, a JSON stream and Prometheus metrics (with a
 systemd unit, installed but not enabled).
 .
 Ships a prebuilt BPF CO-RE object loaded through libbpf from Python;
 nothing is compiled on the host. Needs a kernel with BTF.
EOF

(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +

DEB=$OUTDIR/${PKG}_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
