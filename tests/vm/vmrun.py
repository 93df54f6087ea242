#!/usr/bin/env python3
"""Cross-kernel VM smoke-test harness for runqlat-core.

Boots a stock Debian kernel (generic ``-amd64`` flavour) under
``qemu-system-x86_64 -accel tcg`` with a tiny busybox initramfs.  The
initramfs loads the virtio/9p modules, mounts the *host's* root file system
read-only over 9p (virtfs), layers writable tmpfs on /tmp, /run, /var/tmp
(HOME=/tmp; /root stays the host's, read-only; a directory that holds the
command, its working directory or this checkout is left as the host's, so a
checkout under /tmp still works), mounts
proc/sysfs/devtmpfs/tracefs/debugfs/bpffs/cgroup2 and then chroots into the
host root to run the requested command as root.  The
command's exit status comes back on the serial console as a marker line
``RUNQLAT_VM_EXIT=<code>:<nonce>`` (qemu's own exit code does not carry it),
after which the guest powers off.

Kernels are fetched by package name from the host's configured apt sources
(``apt-get download`` + ``dpkg-deb -x``), never installed into the host's
/boot:

* series "6.1"  -> the ABI package the meta package ``linux-image-amd64``
  depends on (bookworm / bookworm-security);
* series "6.12" -> the ABI package ``linux-image-6.12-amd64`` depends on.
  On bookworm this meta package is published in bookworm-security (and in
  bookworm-backports).  If the configured sources lack it, the harness
  retries with a private apt configuration that adds
  ``deb <archive> <codename>-backports main``, where <archive> is the
  Debian archive the machine's own apt sources already use (one-line or
  deb822 format), so any mirror works (private lists directory under
  build/vm/apt, the host's apt configuration is not modified).

Everything is cached under ``<repo>/build/vm/`` (gitignored); a second
``fetch_kernel`` for the same package is a no-op.

Python API::

    fetch_kernel(series) -> Path          # dir with vmlinuz + initrd.img
    run_in_guest(series, argv, timeout=300) -> (exit_code, console_output)

CLI::

    python3 tests/vm/vmrun.py --kernel 6.1 -- uname -r

Needs root on the host (apt-get, and qemu's 9p export of / with
security_model=none needs to read every file).
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "vm"

SERIES_META = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12-amd64",
}
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_D = Path("/etc/apt/sources.list.d")

# Modules the initramfs needs (plus their dependencies from .modinfo).
WANTED_MODULES = ["virtio_pci", "9pnet_virtio", "9p"]

QEMU = "qemu-system-x86_64"
MARKER = "RUNQLAT_VM_EXIT"

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
fail() { echo "vmrun-init: $*"; echo "RUNQLAT_VM_EXIT=125:$(cat /nonce 2>/dev/null)"; sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }
for m in $(cat /modules.order); do
    insmod /modules/$m.ko || echo "vmrun-init: insmod $m failed"
done
R=/mnt/host
mkdir -p $R
i=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $R; do
    i=$((i+1)); [ $i -ge 20 ] && fail "cannot mount 9p hostroot"; sleep 0.2
done
mount -t proc proc $R/proc || fail "proc"
mount -t sysfs sysfs $R/sys || fail "sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
for d in $(cat /tmpfs_dirs); do
    [ -d $R/$d ] && { mount -t tmpfs -o mode=1777 tmpfs $R/$d || fail "tmpfs $d"; }
done
mount -t tracefs tracefs $R/sys/kernel/tracing || echo "vmrun-init: no tracefs"
mount -t debugfs debugfs $R/sys/kernel/debug || echo "vmrun-init: no debugfs"
mount -t bpf bpf $R/sys/fs/bpf || echo "vmrun-init: no bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || echo "vmrun-init: no cgroup2"
cp /cmd.sh $R/dev/shm/vmrun-cmd.sh || fail "cannot copy the command script"
echo; echo "RUNQLAT_VM_START:$(cat /nonce)"
TERM=dumb LANG=C.UTF-8 PATH=@GUEST_PATH@ chroot $R /bin/sh /dev/shm/vmrun-cmd.sh
rc=$?
echo; echo "RUNQLAT_VM_EXIT=$rc:$(cat /nonce)"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
""".replace("@GUEST_PATH@", GUEST_PATH)

HARNESS_VERSION = hashlib.sha256(
    (INIT_SCRIPT + repr(WANTED_MODULES) + "v3").encode()).hexdigest()[:16]

# Writable tmpfs layered over these host directories in the guest, unless
# the guest command needs something beneath one of them (see _tmpfs_dirs).
TMPFS_DIRS = ("tmp", "run", "var/tmp")


class VMError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[vmrun] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# host tools / apt
# --------------------------------------------------------------------------

def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


_apt_updated = False


def _apt_update(extra_opts=()) -> None:
    global _apt_updated
    if not extra_opts and _apt_updated:
        return
    log("apt-get update " + " ".join(extra_opts))
    subprocess.run(["apt-get", *extra_opts, "update", "-qq"], check=True,
                   stdout=subprocess.DEVNULL)
    if not extra_opts:
        _apt_updated = True


def _ensure_tool(binary: str, package: str) -> None:
    """apt-get install `package` when `binary` is not on PATH (needs root)."""
    if shutil.which(binary):
        return
    if os.geteuid() != 0:
        raise VMError(f"{binary} missing and not root: cannot apt-get install {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    log(" ".join(cmd))
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        _apt_update()  # a fresh machine may have no or stale package lists
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    if not shutil.which(binary):
        raise VMError(f"{binary} still missing after apt-get install {package}")


def ensure_host_tools() -> None:
    """Install what booting a guest needs on the host, when it is missing.

    Only qemu is installed (it pulls seabios).  Busybox-static is downloaded
    and unpacked under build/vm rather than installed, the initramfs cpio is
    written by this module, and modules are decompressed in Python (zstd is
    fetched on demand, see _ko_bytes), so no cpio or busybox package is needed.
    """
    for binary in ("apt-get", "apt-cache", "dpkg-deb"):
        if not shutil.which(binary):
            raise VMError(f"{binary} missing: the VM harness needs a Debian host")
    _ensure_tool(QEMU, "qemu-system-x86")


def _codename(os_release: Path = Path("/etc/os-release")) -> str:
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                name = line.split("=", 1)[1].strip().strip('"')
                if name:
                    return name
    except OSError:
        pass
    return "bookworm"


def _source_entries(sources: Path = APT_SOURCES, parts: Path = APT_SOURCES_D):
    """(uri, suite) of every enabled 'deb' entry of the apt sources, both formats."""
    files = [sources] if sources.exists() else []
    if parts.is_dir():
        files += sorted(f for f in parts.iterdir() if f.suffix in (".list", ".sources"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:  # continuation line
                        fields[key] += " " + line.strip()
                        continue
                    key, _, val = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = val.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        yield uri, suite
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    yield m.group(1), m.group(2)


def backports_line(codename: str | None = None, entries=None) -> str:
    """`deb <archive> <codename>-backports main`, the archive being the one the
    machine's apt sources use for the release itself (not -security, whose
    archive has no backports)."""
    codename = codename or _codename()
    entries = list(_source_entries() if entries is None else entries)
    for uri, suite in entries:
        if suite in (codename, f"{codename}-updates", f"{codename}-backports"):
            return f"deb {uri.rstrip('/')} {codename}-backports main"
    raise VMError(f"no apt source for {codename} is configured (looked at {APT_SOURCES} and "
                  f"{APT_SOURCES_D}); add the Debian archive you use, then retry")


def _backports_opts() -> list[str]:
    """apt options for a private config = host sources + <codename>-backports."""
    line = backports_line()
    d = BUILD / "apt"
    (d / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "sources.list.d").mkdir(parents=True, exist_ok=True)
    for f in (d / "sources.list.d").iterdir():
        f.unlink()
    if APT_SOURCES_D.is_dir():
        for f in APT_SOURCES_D.glob("*"):
            if f.suffix in (".list", ".sources"):
                shutil.copy(f, d / "sources.list.d" / f.name)
    text = APT_SOURCES.read_text() if APT_SOURCES.exists() else ""
    (d / "sources.list").write_text(text + "\n" + line + "\n")
    return ["-o", f"Dir::Etc::SourceList={d / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={d / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={d / 'lists'}"]


def _depends_of(meta: str, opts=()) -> str | None:
    p = subprocess.run(["apt-cache", *opts, "depends", meta], text=True,
                       capture_output=True)
    if p.returncode != 0:
        return None
    for line in p.stdout.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    return None


def resolve_package(series: str) -> tuple[str, list[str]]:
    """Return (ABI image package name, extra apt options) for a series."""
    if series not in SERIES_META:
        raise VMError(f"unknown series {series!r}; known: {list(SERIES_META)}")
    meta = SERIES_META[series]
    pkg = _depends_of(meta)
    if pkg is None:
        _apt_update()
        pkg = _depends_of(meta)
    if pkg is not None:
        return pkg, []
    # Not in the configured sources: try the release's backports privately.
    opts = _backports_opts()
    _apt_update(opts)
    pkg = _depends_of(meta, opts)
    if pkg is None:
        raise VMError(f"{meta} not found in apt sources, even with backports")
    return pkg, opts


def _apt_download(pkg: str, dest: Path, opts=()) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    log(f"apt-get download {pkg}")
    subprocess.run(["apt-get", *opts, "download", "-qq", pkg], cwd=dest,
                   check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    debs = sorted(dest.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise VMError(f"apt-get download {pkg} produced no .deb in {dest}")
    return debs[-1]


# --------------------------------------------------------------------------
# busybox
# --------------------------------------------------------------------------

def _is_static_elf(path: Path) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_static() -> Path:
    """Path of a static busybox: Debian busybox-static, extracted to build/vm."""
    cached = BUILD / "busybox" / "bin" / "busybox"
    if _is_static_elf(cached):
        return cached
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if _is_static_elf(Path(cand)):
            return Path(cand)
    dl = BUILD / "debs"
    try:
        deb = _apt_download("busybox-static", dl)
    except subprocess.CalledProcessError:
        _apt_update()
        deb = _apt_download("busybox-static", dl)
    x = BUILD / "busybox-x"
    shutil.rmtree(x, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
    src = next(p for p in (x / "bin/busybox", x / "usr/bin/busybox")
               if p.exists())
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, cached)
    shutil.rmtree(x, ignore_errors=True)
    return cached


# --------------------------------------------------------------------------
# kernel modules (no depmod on the host: read .modinfo ourselves)
# --------------------------------------------------------------------------

def _ko_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        _ensure_tool("zstd", "zstd")
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _modinfo(elf: bytes) -> dict[str, str]:
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def sh(i):
        base = shoff + i * shentsize
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", elf, base)
        return name, off, size

    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name, off, size = sh(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name:end] == b".modinfo":
            info = {}
            for kv in elf[off:off + size].split(b"\0"):
                if b"=" in kv:
                    k, v = kv.split(b"=", 1)
                    info.setdefault(k.decode(), v.decode(errors="replace"))
            return info
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def collect_modules(moddir: Path, wanted=WANTED_MODULES) -> list[tuple[str, bytes]]:
    """Return [(name, uncompressed .ko)] in load order (deps first)."""
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().split():
            builtin.add(_norm(Path(line).name.split(".ko")[0]))
    index = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index[_norm(p.name.split(".ko")[0])] = p
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, stack=()):
        name = _norm(name)
        if name in seen or name in builtin:
            return
        if name not in index:
            raise VMError(f"module {name} not found in {moddir}")
        seen.add(name)
        elf = _ko_bytes(index[name])
        deps = [d for d in _modinfo(elf).get("depends", "").split(",") if d]
        for d in deps:
            visit(d, stack + (name,))
        order.append((name, elf))

    for w in wanted:
        visit(w)
    return order


# --------------------------------------------------------------------------
# cpio (newc) writer
# --------------------------------------------------------------------------

class Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1000

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        nb = name.encode() + b"\0"
        self.ino += 1
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(nb), 0))
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, name):
        self._entry(name, 0o040755)

    def file(self, name, data: bytes, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name, major, minor, mode=0o600):
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * ((512 - len(data) % 512) % 512)


def build_initramfs(kdir: Path, moddir: Path) -> Path:
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys",
              "dev", "mnt", "mnt/host", "tmp", "modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox_static().read_bytes(), 0o755)
    c.file("init", INIT_SCRIPT.encode(), 0o755)
    mods = collect_modules(moddir)
    for name, elf in mods:
        c.file(f"modules/{name}.ko", elf)
    c.file("modules.order", ("\n".join(n for n, _ in mods) + "\n").encode())
    out = kdir / "initrd.img"
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.finish(), compresslevel=6))
    tmp.replace(out)
    log(f"initramfs {out} modules: {' '.join(n for n, _ in mods)}")
    return out


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------

_fetched: dict[str, Path] = {}


def fetch_kernel(series: str) -> Path:
    """Fetch + extract the kernel for `series`, build its base initramfs.

    Returns the directory build/vm/<series>/ which contains ``vmlinuz``,
    ``initrd.img`` (busybox + modules), ``config`` and ``package`` (the
    Debian package name_version).  Cached: nothing is redone when the stamp
    matches the package resolved from apt and the harness version.  Without
    apt (offline) the package of the last fetch is used, rebuilt from its
    cached .deb if the harness changed since.
    """
    if series in _fetched:
        return _fetched[series]
    kdir = BUILD / series
    kdir.mkdir(parents=True, exist_ok=True)
    # Two test runs on one machine must not extract into the same tree.
    with open(BUILD / f"{series}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _fetched[series] = _fetch_locked(series, kdir)
    return kdir


def _fetch_locked(series: str, kdir: Path) -> Path:
    stamp = kdir / "stamp"
    try:
        pkg, opts = resolve_package(series)
    except (VMError, OSError, subprocess.CalledProcessError) as e:
        if not stamp.exists():
            raise
        pkg, opts = stamp.read_text().split()[0], []
        log(f"cannot resolve {series} via apt ({e}); using {pkg} from the last fetch")
    want = f"{pkg} {HARNESS_VERSION}"
    if (stamp.exists() and stamp.read_text().strip() == want
            and (kdir / "vmlinuz").exists() and (kdir / "initrd.img").exists()):
        return kdir
    t0 = time.monotonic()
    stamp.unlink(missing_ok=True)
    debdir = BUILD / "debs"
    debs = sorted(debdir.glob(f"{pkg}_*.deb")) if debdir.exists() else []
    if debs:
        deb = debs[-1]
    else:
        try:
            deb = _apt_download(pkg, debdir, opts)
        except subprocess.CalledProcessError:
            # Package lists older than the mirror: the version they name is gone.
            _apt_update(opts)
            pkg, opts = resolve_package(series)
            deb = _apt_download(pkg, debdir, opts)
        want = f"{pkg} {HARNESS_VERSION}"
    # Debs of this series' earlier ABIs are dead weight (~100 MB each).  The
    # glob of "6.1" does not match "6.12.*": the character after "6.1" differs.
    for stale in debdir.glob(f"linux-image-{series}.*.deb"):
        if stale != deb:
            log(f"removing superseded {stale.name}")
            stale.unlink()
    root = kdir / "root"
    shutil.rmtree(root, ignore_errors=True)
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise VMError(f"no /boot/vmlinuz-* in {deb}")
        kver = vmlinuz[0].name[len("vmlinuz-"):]
        shutil.copy2(vmlinuz[0], kdir / "vmlinuz")
        cfg = root / "boot" / f"config-{kver}"
        if cfg.exists():
            shutil.copy2(cfg, kdir / "config")
        build_initramfs(kdir, root / "lib" / "modules" / kver)
    finally:
        # The extracted tree (mostly modules) is large and no longer needed.
        shutil.rmtree(root, ignore_errors=True)
    (kdir / "package").write_text(deb.name + "\n")
    (kdir / "kver").write_text(kver + "\n")
    stamp.write_text(want + "\n")
    log(f"kernel {series}: {deb.name} ready in {time.monotonic() - t0:.1f}s")
    return kdir


def _tmpfs_dirs(keep: list[str]) -> list[str]:
    """TMPFS_DIRS minus those that would hide one of the `keep` paths."""
    out = []
    for d in TMPFS_DIRS:
        top = Path("/", d)
        hidden = [k for k in keep if Path(k) == top or top in Path(k).parents]
        if hidden:
            log(f"not layering tmpfs over /{d}: the guest needs {hidden[0]}")
        else:
            out.append(d)
    return out


def _cmd_script(argv: list[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["set +e"]
    for k, v in env.items():
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 127")
    lines.append(" ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """In the qemu child: get SIGKILL when the harness dies.

    The finally clause in run_in_guest covers exceptions, but a SIGTERM
    (a CI time limit, `kill`) ends Python without running it.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# SysRq from the serial console whatever the guest's kernel.sysrq default (_sysrq_dump)
SYSRQ_CMDLINE = "sysrq_always_enabled"


def _sysrq_dump(proc: subprocess.Popen, keys: str = "8lw", wait_s: float = 8.0) -> None:
    """Ask the kernel of a guest that ran out of time where it is, before it is
    killed: a break on the serial console (qemu's -nographic escape, Ctrl-A b)
    followed by a key is a magic SysRq (the kernel runs with
    sysrq_always_enabled): 8, console log level 8 (the dumps print below the
    loglevel=4 the guest boots with); l, a backtrace of every CPU; w, the
    blocked tasks. Their output ends up in the console log. A guest stalled
    under TCG otherwise leaves only its last line behind."""
    for k in keys:
        try:
            proc.stdin.write(b"\x01b")
            proc.stdin.flush()
            time.sleep(0.5)
            proc.stdin.write(k.encode())
            proc.stdin.flush()
        except OSError:  # qemu is gone
            return
        if k.isdigit():  # a log level: nothing to wait for
            continue
        try:
            proc.wait(timeout=wait_s)
            return  # the guest ended meanwhile
        except subprocess.TimeoutExpired:
            pass  # the usual case: it is still there, printing


def _remove_stale_initrds(kdir: Path) -> None:
    """Per-run initrds of harness processes that died before cleaning up."""
    for f in kdir.glob("initrd-*-*.img"):
        pid = f.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)


def run_in_guest(series: str, argv: list[str], timeout: float = 300,
                 cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None,
                 memory_mb: int = 1024, smp: int | str = 2,
                 echo=None) -> tuple[int, str]:
    """Boot `series` and run argv (as root, chrooted into the host root).

    smp: qemu's -smp value; "2,maxcpus=64" gives a guest with 64 possible CPUs
    and 2 online, what per-CPU maps see on a 64-CPU host (the 6.1 kernel
    counts the hot-pluggable ones as possible; 6.12 does not).

    Returns (exit_code, console_output).  exit_code is the guest command's
    status taken from the RUNQLAT_VM_EXIT marker; 124 if the VM timed out,
    125 if the guest never printed the marker (boot/init failure).
    `echo`, if given, is called with each console line as it arrives.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    ensure_host_tools()
    kdir = fetch_kernel(series)
    nonce = secrets.token_hex(8)
    argv = list(map(str, argv))
    cwd = str(cwd or REPO)
    keep = [os.path.realpath(p) for p in (cwd, REPO, sys.prefix,
                                          shutil.which(argv[0]) or argv[0])]
    tmpfs = _tmpfs_dirs(keep)
    scratch = "/tmp" if "tmp" in tmpfs else "/dev/shm"
    genv = {"HOME": scratch, "TMPDIR": scratch,
            "PYTHONDONTWRITEBYTECODE": "1", "RUNQLAT_IN_VM": series}
    genv.update(env or {})
    c = Cpio()
    c.file("cmd.sh", _cmd_script(argv, cwd, genv).encode(), 0o755)
    c.file("nonce", nonce.encode() + b"\n")
    c.file("tmpfs_dirs", ("\n".join(tmpfs) + "\n").encode())
    extra = gzip.compress(c.finish())
    _remove_stale_initrds(kdir)
    fd, initrd = tempfile.mkstemp(prefix=f"initrd-{os.getpid()}-",
                                  suffix=".img", dir=kdir)
    with os.fdopen(fd, "wb") as f:
        f.write((kdir / "initrd.img").read_bytes())
        f.write(extra)
    cmd = [QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb),
           "-smp", str(smp), "-nographic", "-no-reboot", "-nic", "none",
           "-kernel", str(kdir / "vmlinuz"), "-initrd", initrd,
           "-append", "console=ttyS0 panic=-1 quiet loglevel=4 "
                      "mitigations=off tsc=unstable " + SYSRQ_CMDLINE,
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                      "readonly=on,multidevs=remap"]
    lines: list[str] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)

    def reader():
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
            # strip terminal escape sequences seabios/qemu emit
            line = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", line)
            lines.append(line)
            if echo:
                echo(line)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _sysrq_dump(proc)
    finally:
        # Also on KeyboardInterrupt or a failing echo: never leave qemu behind.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        th.join(5)
        try:
            os.unlink(initrd)
        except OSError:
            pass
    elapsed = time.monotonic() - t0
    out = "\n".join(lines)
    m = None
    for m in re.finditer(rf"{MARKER}=(\d+):{nonce}", out):
        pass
    if m is not None:
        code = int(m.group(1))
    elif timed_out:
        code = 124
        out += f"\n[vmrun] timeout after {timeout}s"
    else:
        code = 125
        out += f"\n[vmrun] no {MARKER} marker (qemu rc={proc.returncode})"
    out += f"\n[vmrun] kernel {series} wall time {elapsed:.1f}s"
    return code, out


def guest_output(console: str) -> str:
    """The part of the console log between the start and exit markers."""
    s = console.find("RUNQLAT_VM_START:")
    e = console.rfind(MARKER + "=")
    if s < 0:
        return console
    s = console.find("\n", s) + 1
    return console[s:e if e > s else len(console)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", "-k", default="6.1", choices=list(SERIES_META))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--cwd", default=str(REPO))
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--smp", default="2", help="qemu -smp, e.g. 2,maxcpus=64")
    ap.add_argument("--fetch-only", action="store_true",
                    help="only fetch the kernel / build the initramfs")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if a.fetch_only:
        print(fetch_kernel(a.kernel))
        return 0
    if not cmd:
        ap.error("no command given (use: -- cmd args...)")
    code, _out = run_in_guest(a.kernel, cmd, timeout=a.timeout, cwd=a.cwd,
                              memory_mb=a.memory, smp=a.smp,
                              echo=lambda l: print(l, flush=True))
    print(f"[vmrun] guest exit status {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
