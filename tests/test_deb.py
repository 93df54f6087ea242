"""The Debian package: built from debian/ by dpkg-buildpackage, checked by lintian,
installed with apt into a fresh Debian 12 root, run there, removed and purged.

Once per session:
- `built`: the tracked (and new, unignored) files of this tree are copied to a
  temporary directory and `dpkg-buildpackage -us -uc -b` runs there with a
  clean environment (Debian's python3, no virtualenv), so the build outputs
  land beside the copy, never in the checkout's parent.
- `root`: mmdebstrap --variant=minbase makes a bookworm root from the Debian
  sources this machine's apt uses (nothing cached across runs); the package is
  installed with `apt-get install ./runqlat-core_<version>_amd64.deb`, which
  pulls Debian 12's own python3-typer 0.7, python3-prometheus-client 0.16,
  python3-cffi, python3-pyelftools, python3-numpy and libbpf1.

Commands run chrooted in their own mount namespace with /proc, /sys (BTF,
bpffs, tracefs, cgroups) and /dev: the root shares this kernel, so the
installed tracer loads and attaches for real. Its systemctl is a recorder,
with /run/systemd/system present, so the maintainer scripts act as on a
systemd host and the test sees what they asked systemd to do.

A second root, with systemd, boots as a podman container whose PID 1 is systemd: there
`systemctl` starts, reloads and stops the installed unit for real.

The last test removes and purges the package and checks what is left; this
machine's own packages are never touched. Needs root, network access to the
apt mirror and about five minutes; off CI a missing tool is a skip, with
CI=true a failure.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from helpers import unavailable
from runqlat import __version__, abi
from test_completion import DRIVER as COMPLETION_DRIVER
from unit_file import CAP_NUMBERS, capabilities, parse_unit

pytestmark = pytest.mark.bpf

PKG = "runqlat-core"
DEB = f"{PKG}_{__version__}_amd64.deb"
BIN = "/usr/bin/runqlat-core"
UNIT = "/lib/systemd/system/runqlat-core.service"  # Debian 12: units in /lib (merged with /usr/lib)
CONF = "/etc/runqlat-core/config.toml"
PYDIR = "/usr/lib/python3/dist-packages/runqlat"
COMPLETION = "/usr/share/bash-completion/completions/runqlat-core"
LOGDIR = "/var/log/runqlat-core"
# The package's whole dependency list: Debian packages only.
DEPENDS = {"python3:any", "libbpf1", "procps", "python3-cffi", "python3-pyelftools", "python3-typer",
           "python3-prometheus-client", "python3-numpy"}
# Which Debian package must provide each third-party module the installed code imports.
DEBIAN_MODULES = {"typer": "python3-typer", "click": "python3-click", "cffi": "python3-cffi",
                  "elftools": "python3-pyelftools", "prometheus_client": "python3-prometheus-client",
                  "numpy": "python3-numpy"}
COMPILERS = re.compile(r"^(gcc(-\d+)?|g\+\+(-\d+)?|cpp(-\d+)?|clang(-\d+)?|llvm(-\d+)?|make|binutils"
                       r"|libc6-dev|python3-pip|python3(\.\d+)?-dev|python3-setuptools)$")
# What every command sees: nothing of the test runner's environment or virtualenv.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
# Mounts a kernel-facing view into the root, then runs the command chrooted there. In a
# private mount namespace (unshare): the mounts end with the command, nothing leaks.
IN_ROOT = r"""
r=$1; shift
mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" || exit 125
exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root \
    DEBIAN_FRONTEND=noninteractive "$@"
"""
# Stands in for systemd's systemctl in the root: logs each call; a unit is enabled when a
# *.wants/ link names it (what deb-systemd-helper makes) and never active.
FAKE_SYSTEMCTL = r"""#!/bin/sh
echo "$*" >> /root/systemctl.log
for a in "$@"; do
    case $a in
    is-enabled) for u in "$@"; do :; done
                if ls /etc/systemd/system/*.wants/"$u" >/dev/null 2>&1; then echo enabled; exit 0; fi
                echo disabled; exit 1 ;;
    is-active) exit 3 ;;
    esac
done
exit 0
"""
# The root is thrown away after the session: dpkg need not fsync every file (force-unsafe-io).
APT_OPTS = ["-y", "-q", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
            "-o", "Dpkg::Options::=--force-unsafe-io"]


def _sh(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _need(tool: str, package: str) -> None:
    if not shutil.which(tool):
        unavailable(f"{tool} is not installed (apt-get install {package})")


# -- the build ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """The directory holding what `dpkg-buildpackage -us -uc -b` produced from this tree."""
    if os.geteuid() != 0:
        unavailable("building, installing and running the package needs root")
    for tool, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"), ("git", "git")):
        _need(tool, package)
    out = tmp_path_factory.mktemp("deb")
    src = out / PKG
    src.mkdir()
    files = _sh(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    if files.returncode != 0:
        unavailable(f"{ROOT} is not a git checkout: {files.stderr.strip()}")
    for name in filter(None, files.stdout.split("\0")):
        path = ROOT / name
        if path.is_symlink() or path.exists():  # a file deleted but not yet committed is skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name, follow_symlinks=False)
    env = {**CLEAN_ENV}
    deps = _sh(["dpkg-checkbuilddeps"], cwd=src, env=env)
    if deps.returncode != 0:
        unavailable(f"the package's Build-Depends are not installed: {deps.stderr.strip()}")
    r = _sh(["dpkg-buildpackage", "-us", "-uc", "-b"], timeout=1200, cwd=src, env=env)
    (out / "build.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"dpkg-buildpackage failed:\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    assert (out / DEB).is_file(), sorted(p.name for p in out.iterdir())
    return out


def test_build_outputs_beside_the_copy_only(built):
    names = {p.name for p in built.iterdir()}
    assert {DEB, f"{PKG}_{__version__}_amd64.changes", f"{PKG}_{__version__}_amd64.buildinfo"} <= names
    # the object was compiled by the build (bpf/Makefile), from the copy's sources
    log = (built / "build.log").read_text()
    assert re.search(r"^clang .*-target bpf .*runqlat\.bpf\.c", log, re.M), "the build compiled no BPF object"
    assert re.search(r"^\d+ passed", log, re.M), "dh_auto_test ran no tests"


def test_lintian_clean(built):
    _need("lintian", "lintian")
    changes = built / f"{PKG}_{__version__}_amd64.changes"
    r = _sh(["lintian", "--fail-on", "error,warning", str(changes)], timeout=600)
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert r.returncode == 0 and not tags, r.stdout + r.stderr
    # the one override is the one that applied, shown with its reason (lintian's exit
    # status is 2 whenever it shows overridden tags)
    r = _sh(["lintian", "--show-overrides", str(changes)], timeout=600)
    assert "O: runqlat-core: binary-from-other-architecture [usr/lib/python3/dist-packages/runqlat/data/" \
           "runqlat.bpf.o]" in r.stdout, r.stdout
    assert "N: The BPF object is bytecode" in r.stdout, r.stdout


def test_control_fields(built):
    deb = built / DEB
    fields = {k: _sh(["dpkg-deb", "-f", str(deb), k]).stdout.strip()
              for k in ("Package", "Version", "Architecture", "Depends")}
    assert fields["Package"] == PKG
    assert fields["Version"] == __version__
    assert fields["Architecture"] == "amd64"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert {re.sub(r"\s*\(.*\)", "", d) for d in depends} == DEPENDS, fields["Depends"]
    for pinned in ("python3:any (>= 3.11~)", "python3-typer (>= 0.7)", "python3-typer (<< 0.29)",
                   "python3-prometheus-client (>= 0.16)", "libbpf1 (>= 1:1.1)"):
        assert pinned in depends, fields["Depends"]


def test_maintainer_scripts_are_debhelpers(built, tmp_path):
    """Every call to systemd or its helpers is in a section debhelper generated."""
    _sh(["dpkg-deb", "-e", str(built / DEB), str(tmp_path)])
    scripts = {p.name: p.read_text() for p in tmp_path.iterdir() if p.name in ("preinst", "postinst",
                                                                              "prerm", "postrm")}
    assert "dh_installsystemd" in scripts["postinst"] and "dh_python3" in scripts["prerm"]
    for name, text in scripts.items():
        outside = re.sub(r"(?ms)^# Automatically added by dh_.*?^# End automatically added section$", "", text)
        assert not re.search(r"systemctl|deb-systemd|py3compile|py3clean", outside), f"{name}:\n{outside}"


# -- the root ---------------------------------------------------------------------------

def _debian_sources() -> tuple[list[str], list[str]]:
    """(sources.list lines, apt options) for this machine's Debian archives of its release:
    the mirror apt here is configured with, whatever it is."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip('"')
    policy = _sh(["apt-cache", "policy"]).stdout.splitlines()
    suites: dict[tuple[str, str], list[str]] = {}
    for line, release in zip(policy, policy[1:]):
        m = re.match(r"^\s*\d+ (\S+) (\S+)/(\S+) amd64 Packages$", line)
        if not m or "o=Debian," not in release:
            continue
        uri, suite, component = m.groups()
        if suite == codename or suite.startswith(codename + "-"):
            suites.setdefault((uri, suite), []).append(component)
    lines = [f"deb {uri} {suite} {' '.join(sorted(set(c)))}" for (uri, suite), c in sorted(suites.items())]
    options = []
    for key in ("Acquire::Check-Valid-Until", "Acquire::http::Proxy", "Acquire::https::Proxy"):
        value = _sh(["apt-config", "shell", "V", key]).stdout.strip()
        if value:
            options.append(f'{key} "{shlex.split(value.split("=", 1)[1])[0]}"')
    return lines, options


def in_root(root: Path, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return _sh(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", IN_ROOT, "sh",
                str(root), *argv], timeout=timeout, **kw)


def _mounts_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path) + "/")]


def _our_loaded_programs() -> dict[int, str]:
    ours = {p[:15] for p in abi.PROGRAMS}  # the kernel keeps 15 characters of a name
    r = _sh(["bpftool", "-j", "prog", "show"])
    assert r.returncode == 0, r.stderr
    return {p["id"]: p["name"] for p in json.loads(r.stdout or "[]") if p.get("name") in ours}


@pytest.fixture(scope="session")
def programs_before() -> set[int]:
    """Our programs loaded before the installed tracer first ran (other runs on this machine)."""
    _need("bpftool", "bpftool")
    return set(_our_loaded_programs())


@contextlib.contextmanager
def _bookworm_root(tmp_path_factory, name: str, include: tuple[str, ...] = ()):
    """A fresh bookworm root (mmdebstrap minbase, plus include) from this machine's apt
    sources; deleted in the end."""
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("unshare", "util-linux"), ("chroot", "coreutils")):
        _need(tool, package)
    if not Path("/sys/kernel/btf/vmlinux").exists():
        unavailable("the kernel has no BTF (/sys/kernel/btf/vmlinux)")
    sources, options = _debian_sources()
    if not sources:
        unavailable("this machine's apt has no Debian archive of its release configured (apt-cache policy)")
    base = tmp_path_factory.mktemp(name)
    (base / "sources.list").write_text("\n".join(sources) + "\n")
    path = base / "root"
    path.mkdir()
    try:
        r = _sh(["unshare", "--mount", "--propagation", "private", "--", "mmdebstrap", "--variant=minbase",
                 "--mode=root", "--skip=cleanup/apt/lists", "--dpkgopt=force-unsafe-io",
                 '--aptopt=Acquire::Languages "none"', *(f"--aptopt={o}" for o in options),
                 *([f"--include={','.join(include)}"] if include else []),
                 "bookworm", str(path), str(base / "sources.list")], timeout=1200)
        assert r.returncode == 0, f"mmdebstrap failed:\n{r.stderr[-3000:]}"
        yield path
    finally:
        # The mounts lived in the commands' own namespaces; refuse to delete through one anyway.
        assert not _mounts_under(path), _mounts_under(path)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def _install(path: Path, built: Path) -> None:
    """apt-get install the package into the root, as an admin would."""
    shutil.copy(built / DEB, path / "root" / DEB)
    r = in_root(path, ["apt-get", "install", *APT_OPTS, f"/root/{DEB}"], timeout=1200)
    assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (path / "root" / DEB).unlink()


@pytest.fixture(scope="session")
def root(built, programs_before, tmp_path_factory):
    """A fresh bookworm root with the package installed by apt; deleted in the end."""
    with _bookworm_root(tmp_path_factory, "root") as path:
        # systemd "running" for the maintainer scripts, with a recorder as its systemctl
        (path / "run/systemd/system").mkdir(parents=True)
        # where systemd's own would be (maintainer scripts run with apt's PATH, no /usr/local)
        fake = path / "usr/bin/systemctl"
        fake.write_text(FAKE_SYSTEMCTL)
        fake.chmod(0o755)
        _install(path, built)
        yield path


def systemctl_calls(root: Path) -> list[str]:
    log = root / "root/systemctl.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


@pytest.fixture(scope="session")
def installed(root):
    """The root right after installation, with what the postinst asked of systemd."""
    return root, systemctl_calls(root)


def installed_run(root: Path, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """An installed command run the way an admin would: clean env, Debian's python3."""
    return in_root(root, argv, timeout=timeout)


# -- what the package installed ------------------------------------------------------

def test_installed_files(installed):
    root, _ = installed
    r = in_root(root, ["dpkg", "-L", PKG])
    files = set(r.stdout.split())
    for f in (BIN, UNIT, CONF, COMPLETION, f"{PYDIR}/cli.py", f"{PYDIR}/libbpf.cdef",
              f"{PYDIR}/data/runqlat.bpf.o", "/usr/share/man/man1/runqlat-core.1.gz",
              "/usr/share/doc/runqlat-core/copyright",
              "/usr/share/doc/runqlat-core/examples/grafana-dashboard.json",
              "/usr/share/doc/runqlat-core/examples/kubernetes/daemonset.yaml"):
        assert f in files, f"{f} is not in the package"
    for src in (ROOT / "python/runqlat").rglob("*.py"):
        if "__pycache__" not in src.parts:
            assert f"{PYDIR}/{src.relative_to(ROOT / 'python/runqlat')}" in files, f"{src.name} not packaged"
    assert (root / BIN.lstrip("/")).read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert os.access(root / BIN.lstrip("/"), os.X_OK)
    assert (root / CONF.lstrip("/")).read_bytes() == (ROOT / "deploy/config.toml").read_bytes()
    assert (root / UNIT.lstrip("/")).read_bytes() == (ROOT / "deploy/runqlat-core.service").read_bytes()
    conffiles = in_root(root, ["dpkg-query", "-W", "-f", "${Conffiles}", PKG]).stdout
    assert CONF in conffiles
    # byte-compiled by the postinst with Debian's own tool
    assert list((root / PYDIR.lstrip("/") / "__pycache__").glob("cli.cpython-*.pyc"))


def test_only_debian_packages_and_no_toolchain(installed):
    root, _ = installed
    packages = in_root(root, ["dpkg-query", "-W", "-f", "${Package}\n"]).stdout.split()
    assert "python3-typer" in packages and "libbpf1" in packages
    toolchain = sorted(p for p in packages if COMPILERS.match(p))
    assert not toolchain, f"installing {PKG} pulled a toolchain: {toolchain}"
    local = root / "usr/local/lib"
    assert not [p for p in local.rglob("*") if p.is_file()], "something was installed under /usr/local"


def test_unit_installed_but_not_enabled_nor_started(installed):
    root, calls = installed
    assert "--system daemon-reload" in calls, calls
    # the postinst asked systemd for nothing but a reload and state queries
    actions = {c for call in calls for c in call.split() if not c.startswith("-")} - {"runqlat-core.service"}
    assert actions <= {"daemon-reload", "is-enabled", "is-active"}, calls
    assert not list((root / "etc/systemd/system").glob("*.wants/runqlat-core.service"))
    # every command the unit runs exists in the installed system
    for line in (root / UNIT.lstrip("/")).read_text().splitlines():
        m = re.match(r"^Exec\w+=[-@+!:]*(\S+)", line)
        if m:
            assert os.access(root / m.group(1).lstrip("/"), os.X_OK), f"{line}: not in the installed system"


def test_man_page_installed(installed):
    root, _ = installed
    page = root / "usr/share/man/man1/runqlat-core.1.gz"
    source = gzip.decompress(page.read_bytes()).decode()
    assert f'.TH RUNQLAT-CORE 1 "" "runqlat-core {__version__}"' in source
    if shutil.which("man"):  # the root has no man-db; this machine's renders the installed page
        r = _sh(["man", "-l", "-P", "cat", str(page)], env={**CLEAN_ENV, "MANWIDTH": "80"})
        assert r.returncode == 0, r.stderr
        assert "--metrics-addr" in r.stdout and "runqlat_run_queue_latency_seconds" in r.stdout


def test_bash_completion_installed(installed):
    root, _ = installed

    def complete(*words):
        r = in_root(root, ["bash", "--norc", "--noprofile", "-c", COMPLETION_DRIVER, "bash", COMPLETION,
                           "runqlat-core", *words])
        assert r.returncode == 0, r.stderr
        return sorted(w for w in r.stdout.splitlines() if w)

    assert complete("") == ["--help", "containers", "doctor", "run", "version"]
    assert complete("run", "--met") == ["--metrics-addr", "--metrics-exclude", "--metrics-include",
                                         "--metrics-top"]
    assert complete("run", "-o", "") == ["json", "text"]
    assert complete("doctor", "--") == ["--help", "--json"]


# -- running the installed files on Debian's libraries ------------------------------

def test_runs_on_debian_libraries(installed):
    root, _ = installed
    probe = (
        "import importlib, json, sys\n"
        "import runqlat.cli\n"
        f"mods = {sorted(['runqlat', *DEBIAN_MODULES])!r}\n"
        "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))\n")
    r = installed_run(root, ["python3", "-c", probe])
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["runqlat"] == f"{PYDIR}/__init__.py"
    for mod, pkg in DEBIAN_MODULES.items():
        owner = in_root(root, ["dpkg", "-S", found[mod]]).stdout.split(":")[0]
        assert owner == pkg, f"{mod} comes from {found[mod]} ({owner or 'no Debian package'}), not {pkg}"


def test_version_and_help(installed):
    root, _ = installed
    r = installed_run(root, [BIN, "version"])
    assert r.returncode == 0 and r.stdout.strip() == f"{PKG} {__version__}", r.stdout + r.stderr
    r = installed_run(root, [BIN, "run", "--help"])
    assert r.returncode == 0, r.stderr
    assert "--metrics-addr" in r.stdout and "--pids-file" in r.stdout
    r = installed_run(root, [BIN, "run", "--no-such-flag"])
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_doctor(installed):
    root, _ = installed
    r = installed_run(root, [BIN, "doctor"])
    assert r.returncode == 0, f"doctor says the tracer cannot run here:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    rows = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert "BTF" in rows and "libbpf" in rows
    r = installed_run(root, [BIN, "doctor", "--json"])
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout)
    assert checks and not [c for c in checks if c["status"] == "FAIL"]
    assert {c["name"]: c["status"] for c in checks}["load + attach"] == "ok", checks


def test_containers_lists(installed):
    root, _ = installed
    r = installed_run(root, [BIN, "containers", "--json"])
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)


@pytest.fixture
def busy_shell():
    """A process that wakes up about a hundred times a second, then is reaped."""
    p = subprocess.Popen(["/bin/sh", "-c", "while :; do sleep 0.01; done"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _histograms(text: str) -> list[int]:
    """Total count of each runqlat-style histogram in the text output."""
    totals = []
    for line in text.splitlines():
        if re.match(r"^\s*[um]secs\s+: count\s+distribution", line):
            totals.append(0)
        m = re.match(r"^\s*\d+ -> \d+\s+: (\d+)\s+\|", line)
        if m:
            assert totals, f"histogram row before a header: {line!r}"
            totals[-1] += int(m.group(1))
    return totals


def test_run_text(installed, busy_shell):
    root, _ = installed
    r = installed_run(root, [BIN, "run", "1", "2"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    totals = _histograms(r.stdout)
    assert len(totals) == 2, r.stdout
    assert all(t > 0 for t in totals), r.stdout


def test_run_json_per_process(installed, busy_shell):
    root, _ = installed
    r = installed_run(root, [BIN, "run", "-P", "-p", str(busy_shell), "-o", "json", "1", "2"])
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert records, r.stderr
    assert {rec["mode"] for rec in records} == {"pid"}
    assert {rec["pid"] for rec in records} == {busy_shell}
    assert sum(rec["count"] for rec in records) > 0
    for rec in records:
        assert rec["count"] == sum(b["count"] for b in rec["buckets"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the service exited with {proc.returncode}:\n{out}\n{err}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_service_command_with_unit_capabilities(installed, busy_shell):
    """The unit's ExecStart with the installed conffile, under the unit's capability
    bounding set: serves metrics, survives SIGHUP (ExecReload), stops cleanly on SIGTERM."""
    root, _ = installed
    svc = parse_unit(root / UNIT.lstrip("/"))["Service"]
    caps = " ".join(svc["CapabilityBoundingSet"]).split()
    bounding = "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    port = _free_port()
    argv = shlex.split(svc["ExecStart"][0]) + ["--metrics-addr", f"127.0.0.1:{port}"]
    # unshare, sh and chroot exec in turn: the process started here is the tracer itself
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", IN_ROOT, "sh", str(root),
         "setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from prometheus_client.parser import text_string_to_metric_families
        deadline = time.monotonic() + 10
        while True:  # the first scrape can come right after attach, before any wake-up
            families = {f.name: f for f in text_string_to_metric_families(_scrape(port, proc))}
            hist = families["runqlat_run_queue_latency_seconds"]
            counts = [s.value for s in hist.samples if s.name.endswith("_count")]
            if counts and counts[0] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert counts and counts[0] > 0, "no run-queue latency counted in 10 s"
        assert "runqlat_build" in families or "runqlat_build_info" in families

        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert proc.poll() is None, "SIGHUP (ExecReload) stopped the service"
        assert "runqlat_run_queue_latency_seconds_count" in _scrape(port, proc)

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert out == "", "--quiet printed histograms"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_no_bpf_programs_left_loaded(installed, programs_before):
    """Every run above has ended: none of the programs it loaded stays loaded (pinned, or
    held by nobody). Other tracers' programs loaded meanwhile are held by their processes."""
    deadline = time.monotonic() + 10
    while True:  # a closed program is freed after an RCU grace period
        new = {i: n for i, n in _our_loaded_programs().items() if i not in programs_before}
        held = set()
        for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
            try:
                held.update(int(m) for m in re.findall(r"^prog_id:\s+(\d+)$", fdinfo.read_text(), re.M))
            except OSError:
                continue
        leaked = {i: n for i, n in new.items() if i not in held}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not leaked, f"BPF programs left loaded after the installed tracer exited: {leaked}"


# -- the unit under a real systemd ---------------------------------------------------
# The tests above run the unit's command by hand. Here systemd itself starts it: a second
# fresh bookworm root with systemd, the package installed by apt, booted as a podman
# container (privileged, host network, this kernel) with systemd as its PID 1; the unit's
# DynamicUser, capabilities, system call filter and W^X memory are systemd's doing.

@pytest.fixture(scope="module")
def booted(built, tmp_path_factory):
    """(in_box, port, root): the package installed in a systemd-booted container;
    in_box(*argv) runs a command in it."""
    from runtime_env import PodmanEnv, RuntimeUnavailable
    with _bookworm_root(tmp_path_factory, "sdroot", include=("systemd", "dbus")) as path:
        _install(path, built)
        port = _free_port()
        conf = path / CONF.lstrip("/")
        text = conf.read_text()
        assert re.search(r'^metrics_addr = "127\.0\.0\.1:\d+"$', text, re.M), "the conffile's metrics_addr moved"
        conf.write_text(re.sub(r'^metrics_addr = .*$', f'metrics_addr = "127.0.0.1:{port}"', text, flags=re.M))
        try:
            env = PodmanEnv()
            env.__enter__()
        except RuntimeUnavailable as exc:
            unavailable(str(exc))
        try:
            name = env.name("systemd")
            # runc: crun refuses this machine's v1/v2 hybrid cgroups
            env.ids[name] = env._cmd("run", "-d", "--name", name, "--privileged", "--systemd=always",
                                     "--network", "host", "--ulimit", "nofile=1024:1024",
                                     "--ulimit", "nproc=1024:1024", "--rootfs", str(path),
                                     "/lib/systemd/systemd").stdout.strip()

            def in_box(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
                return env._cmd("exec", name, *argv, check=False, timeout=timeout)

            deadline = time.monotonic() + 90
            while (state := in_box("systemctl", "is-system-running").stdout.strip()) not in (
                    "running", "degraded"):
                assert time.monotonic() < deadline, f"systemd did not finish booting: {state!r}"
                time.sleep(0.5)
            yield in_box, port, path
        finally:
            env.close()


def _unit(in_box, *props: str) -> dict[str, str]:
    r = in_box("systemctl", "show", "runqlat-core", *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def _journal(in_box) -> str:
    """What the unit's last run wrote (its invocation's lines only)."""
    run = _unit(in_box, "InvocationID")["InvocationID"]
    return in_box("journalctl", f"_SYSTEMD_INVOCATION_ID={run}", "--no-pager", "-o", "cat").stdout


def _programs_gone(before: set[int]) -> dict[int, str]:
    deadline = time.monotonic() + 10
    while (left := {i: n for i, n in _our_loaded_programs().items() if i not in before}) \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


def test_unit_started_by_systemd_serves_reloads_and_stops(booted):
    """systemctl start / reload / stop: the tracer runs as a dynamic user with exactly the
    unit's four capabilities, no new privileges and a system call filter; it serves /metrics,
    survives a reload and, stopped, exits 0 and leaves no program loaded."""
    in_box, port, root = booted
    before = set(_our_loaded_programs())
    r = in_box("systemctl", "start", "runqlat-core")
    try:
        assert r.returncode == 0, f"{r.stderr}\n{_journal(in_box)}"
        time.sleep(1)  # past the load and attach: a tracer that cannot load exits by then
        unit = _unit(in_box, "MainPID", "ActiveState")
        pid = unit["MainPID"]
        status = dict(line.split(":", 1) for line in
                      in_box("cat", f"/proc/{pid}/status").stdout.splitlines() if ":" in line)
        assert unit["ActiveState"] == "active" and "Uid" in status, f"{unit}\n{_journal(in_box)}"
        assert int(status["Uid"].split()[0]) != 0, "DynamicUser: the tracer ran as root"
        want = sum(1 << CAP_NUMBERS[c] for c in capabilities(parse_unit(root / UNIT.lstrip("/"))["Service"]))
        assert int(status["CapEff"], 16) == want and int(status["CapBnd"], 16) == want, status
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    body = resp.read().decode()
                if "runqlat_run_queue_latency_seconds_count" in body:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /metrics on port {port}:\n{_journal(in_box)}"
            time.sleep(0.3)
        assert set(_our_loaded_programs()) - before, "the unit runs but no program of ours is loaded"

        assert in_box("systemctl", "reload", "runqlat-core").returncode == 0
        deadline = time.monotonic() + 10
        while "SIGHUP: reloaded" not in _journal(in_box):
            assert time.monotonic() < deadline, _journal(in_box)
            time.sleep(0.3)
        assert _unit(in_box, "MainPID")["MainPID"] == pid, "a reload restarted the tracer"
    finally:
        stop = in_box("systemctl", "stop", "runqlat-core")
    assert stop.returncode == 0, stop.stderr
    unit = _unit(in_box, "Result", "ExecMainStatus", "ActiveState")
    assert unit == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}, unit
    assert "Traceback" not in _journal(in_box)
    assert not _programs_gone(before), "programs left loaded after systemctl stop"


def test_unit_that_cannot_start_fails_with_one_line(booted):
    """Its metrics port taken: systemd sees the unit fail, the journal has the tracer's
    one-line error (no traceback) and no program stays loaded."""
    in_box, port, root = booted
    before = set(_our_loaded_programs())
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        r = in_box("systemctl", "start", "runqlat-core")
        try:
            deadline = time.monotonic() + 20
            while (unit := _unit(in_box, "ActiveState", "Result"))["ActiveState"] not in ("failed",
                                                                                              "activating"):
                assert time.monotonic() < deadline, unit
                time.sleep(0.3)
            journal = _journal(in_box)
        finally:
            in_box("systemctl", "stop", "runqlat-core")
            in_box("systemctl", "reset-failed", "runqlat-core")
    assert unit["Result"] == "exit-code", (r.stderr, unit)
    errors = [line for line in journal.splitlines() if line.startswith("runqlat-core: error:")]
    assert len(errors) == 1 and f":{port}" in errors[0], journal
    assert "Traceback" not in journal
    assert not _programs_gone(before), "a unit that failed to start left programs loaded"


# -- removal and purge: keep this test last in the file ------------------------------

def _names_with(root: Path, word: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{word}*"))


def test_remove_then_purge_leaves_nothing(installed):
    root, _ = installed
    conf = root / CONF.lstrip("/")
    conf.write_text(conf.read_text() + "\n# changed by the administrator\n")
    # what systemd would have made when the service ran (LogsDirectory=)
    (root / LOGDIR.lstrip("/")).mkdir(parents=True)
    (root / LOGDIR.lstrip("/") / "runqlat.log").write_text("x\n")

    r = in_root(root, ["apt-get", "remove", *APT_OPTS, PKG], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = systemctl_calls(root)
    assert "stop runqlat-core.service" in calls, f"the prerm did not stop the service: {calls}"
    # a remove keeps the configuration, the administrator's change included
    assert conf.read_text().endswith("# changed by the administrator\n")
    for path in (BIN, UNIT, PYDIR, COMPLETION):
        assert not (root / path.lstrip("/")).exists(), f"{path} is left after remove"
    assert in_root(root, ["dpkg-query", "-W", "-f", "${db:Status-Status}", PKG]).stdout == "config-files"

    r = in_root(root, ["apt-get", "purge", *APT_OPTS, PKG], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert in_root(root, ["dpkg-query", "-W", PKG]).returncode != 0, "dpkg still knows the package"
    shutil.rmtree(root / "run/systemd")
    (root / "usr/bin/systemctl").unlink()
    (root / "root/systemctl.log").unlink(missing_ok=True)
    # nothing named after the package anywhere: config, logs, unit, its enablement state
    # (/etc/systemd, /var/lib/systemd/deb-systemd-helper-*), byte-compiled files, docs
    assert _names_with(root, "runqlat") == []
    # and no byte-compiled file whose source has gone
    orphans = [str(pyc) for pyc in (root / "usr/lib/python3/dist-packages").rglob("__pycache__/*.pyc")
               if not (pyc.parent.parent / (pyc.name.split(".")[0] + ".py")).exists()]
    assert not orphans, orphans
