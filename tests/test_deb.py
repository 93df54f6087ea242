"""The Debian package, built, installed with apt, run from the installed files, purged.

Builds runqlat-core_<version>_amd64.deb with packaging/build-deb.sh, installs
it with `apt-get install ./runqlat-core_*.deb` (which pulls Debian 12's own
python3-typer 0.7, python3-prometheus-client 0.16, python3-cffi 1.15,
python3-pyelftools 0.29, python3-numpy, libbpf1), runs /usr/bin/runqlat-core
with /usr/bin/python3 from a clean environment in /, and purges the package
in the end. Needs root and loads real BPF programs; off CI a missing
prerequisite is a skip, with CI=true a failure.

Warning for a developer's machine: an installed runqlat-core package (and
its /etc/runqlat-core) is purged, before and after.
"""
from __future__ import annotations

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
from runqlat import __version__
from runqlat.elf import inspect

pytestmark = pytest.mark.bpf

PKG = "runqlat-core"
BIN = "/usr/bin/runqlat-core"
UNIT = "/usr/lib/systemd/system/runqlat-core.service"
CONF = "/etc/runqlat-core/config.toml"
PYDIR = Path("/usr/lib/python3/dist-packages/runqlat")
# The package's whole dependency list: Debian packages only.
DEPENDS = {"python3", "python3:any", "libbpf1", "python3-cffi", "python3-pyelftools", "python3-typer",
           "python3-prometheus-client", "python3-numpy"}
# Which Debian package must provide each third-party module the installed code imports.
DEBIAN_MODULES = {"typer": "python3-typer", "click": "python3-click", "cffi": "python3-cffi",
                  "elftools": "python3-pyelftools", "prometheus_client": "python3-prometheus-client",
                  "numpy": "python3-numpy"}
COMPILERS = re.compile(r"^(gcc(-\d+)?|g\+\+(-\d+)?|cpp(-\d+)?|clang(-\d+)?|llvm(-\d+)?|make|binutils"
                       r"|libc6-dev|python3-pip|python3(\.\d+)?-dev|python3-setuptools)$")
# A clean environment: nothing from the test runner's virtualenv.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
APT_OPTS = ["-y", "-q", "-o", "DPkg::Lock::Timeout=300",
            "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confnew"]


def _apt_env() -> dict:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _sh(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _installed(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run an installed command the way an admin would: clean env, cwd /, Debian's python3."""
    return _sh(cmd, timeout=timeout, env=CLEAN_ENV, cwd="/")


def _package_state() -> str:
    r = _sh(["dpkg-query", "-W", "-f", "${db:Status-Status}", PKG])
    return r.stdout.strip() if r.returncode == 0 else ""


def _purge() -> subprocess.CompletedProcess:
    return _sh(["apt-get", "purge", *APT_OPTS, PKG], timeout=600, env=_apt_env())


# -- BPF programs left behind ------------------------------------------------------

def _loaded_programs() -> dict[int, str]:
    r = _sh(["bpftool", "-j", "prog", "show"])
    assert r.returncode == 0, r.stderr
    return {p["id"]: p.get("name", "") for p in json.loads(r.stdout or "[]")}


def _held_program_ids() -> set[int]:
    """Programs some process still holds an fd (program or link) to."""
    held = set()
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        held.update(int(m) for m in re.findall(r"^prog_id:\s+(\d+)$", text, re.M))
    return held


def _leaked(before: set[int], names: set[str]) -> dict[int, str]:
    """Our programs loaded since `before` that no process holds: pinned or stuck in the kernel.
    Programs of other tracers running meanwhile on the machine are held, so they do not count."""
    deadline = time.monotonic() + 10
    while True:  # a closed program is freed after an RCU grace period
        new = {i: n for i, n in _loaded_programs().items() if i not in before and n in names}
        leaked = {i: n for i, n in new.items() if i not in _held_program_ids()}
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.5)


# -- the package, built and installed once for the module ---------------------------

@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    if os.geteuid() != 0:
        unavailable("installing the .deb needs root")
    for tool, package in (("dpkg-deb", "dpkg"), ("apt-get", "apt"), ("bpftool", "bpftool"),
                          ("setpriv", "util-linux")):
        if not shutil.which(tool):
            unavailable(f"{tool} is not installed (apt-get install {package})")
    if not Path("/usr/bin/python3").exists():
        unavailable("/usr/bin/python3 is missing")

    out = tmp_path_factory.mktemp("deb")
    r = _sh(["bash", str(ROOT / "packaging" / "build-deb.sh"), str(out)], timeout=600)
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stdout}\n{r.stderr}"
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == out / f"{PKG}_{__version__}_amd64.deb" and path.is_file()

    our_names = {name[:15] for name in inspect(ROOT / "python/runqlat/data/runqlat.bpf.o").programs}
    before = set(_loaded_programs())
    if _package_state():
        _purge()
    try:
        # A machine whose apt lists were never fetched cannot resolve the dependencies.
        if "Candidate: (none)" in _sh(["apt-cache", "policy", "python3-typer"]).stdout or \
                not _sh(["apt-cache", "policy", "python3-typer"]).stdout.strip():
            _sh(["apt-get", "update", "-q"], timeout=600, env=_apt_env())
        r = _sh(["apt-get", "install", *APT_OPTS, f"./{path.name}"], timeout=900, cwd=out, env=_apt_env())
        assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert _package_state() == "installed"
        yield path
    finally:
        r = _purge()
        assert r.returncode == 0, r.stderr
        assert _package_state() == "", "runqlat-core is still known to dpkg after purge"
        assert not PYDIR.exists() and not Path(BIN).exists() and not Path(CONF).exists()
        leaked = _leaked(before, our_names)
        assert not leaked, f"BPF programs left loaded after the installed tracer exited: {leaked}"


@pytest.fixture
def busy_shell():
    """A process that wakes up about a hundred times a second, then is reaped."""
    p = subprocess.Popen(["/bin/sh", "-c", "while :; do sleep 0.01; done"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unit_service_section() -> dict[str, list[str]]:
    svc: dict[str, list[str]] = {}
    section = None
    for line in Path(UNIT).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            svc.setdefault(k, []).append(v)
    return svc


# -- what the package is ------------------------------------------------------------

def test_control_fields(deb):
    fields = {}
    for key in ("Package", "Version", "Architecture", "Depends"):
        fields[key] = _sh(["dpkg-deb", "-f", str(deb), key]).stdout.strip()
    assert fields["Package"] == PKG
    assert fields["Version"] == __version__
    assert fields["Architecture"] == "amd64"
    names = {re.sub(r"\s*\(.*\)", "", d).strip() for d in fields["Depends"].split(",")}
    assert names == DEPENDS
    assert "python3 (>= 3.11)" in fields["Depends"]


def test_nothing_to_compile_and_nothing_from_pypi(deb):
    # Everything apt installs for us, Recommends included as apt does by default.
    r = _sh(["apt-cache", "depends", "--recurse", "--no-suggests", "--no-conflicts", "--no-breaks",
             "--no-replaces", "--no-enhances", PKG])
    assert r.returncode == 0, r.stderr
    closure = {line.strip() for line in r.stdout.splitlines() if not line.startswith(" ")}
    assert "python3-typer" in closure and "libbpf1" in closure
    toolchain = sorted(p for p in closure if COMPILERS.match(p))
    assert not toolchain, f"installing {PKG} pulls a toolchain: {toolchain}"


def test_installed_files(deb):
    files = set(_sh(["dpkg", "-L", PKG]).stdout.split())
    for f in (BIN, UNIT, CONF, str(PYDIR / "cli.py"), str(PYDIR / "libbpf.cdef"),
              str(PYDIR / "data/runqlat.bpf.o"), "/usr/share/man/man1/runqlat-core.1.gz",
              "/usr/share/doc/runqlat-core/copyright",
              "/usr/share/doc/runqlat-core/examples/grafana-dashboard.json"):
        assert f in files, f"{f} is not in the package"
    for src in (ROOT / "python/runqlat").rglob("*.py"):
        if "__pycache__" not in src.parts:
            assert str(PYDIR / src.relative_to(ROOT / "python/runqlat")) in files, f"{src.name} not packaged"
    assert Path(BIN).read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert os.access(BIN, os.X_OK)
    conffiles = _sh(["dpkg-query", "-W", "-f", "${Conffiles}", PKG]).stdout
    assert CONF in conffiles
    # byte-compiled by postinst with Debian's own tool
    assert list((PYDIR / "__pycache__").glob("cli.cpython-*.pyc"))


def test_unit_installed_but_not_enabled(deb):
    assert not Path("/etc/systemd/system/multi-user.target.wants/runqlat-core.service").exists()
    if shutil.which("systemctl"):
        r = _sh(["systemctl", "is-enabled", "runqlat-core.service"])
        assert r.stdout.strip() == "disabled", r.stdout + r.stderr
    if shutil.which("systemd-analyze"):
        man = [] if shutil.which("man") else ["--man=no"]
        r = _sh(["systemd-analyze", "verify", *man, UNIT])
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_man_page_installed(deb):
    page = Path("/usr/share/man/man1/runqlat-core.1.gz")
    source = gzip.decompress(page.read_bytes()).decode()
    assert f'.TH RUNQLAT-CORE 1 "" "runqlat-core {__version__}"' in source
    if shutil.which("man"):  # man-db is optional on a minimal system
        r = _sh(["man", "-P", "cat", PKG], env={**CLEAN_ENV, "MANWIDTH": "80"})
        assert r.returncode == 0, r.stderr
        assert "--metrics-addr" in r.stdout and "runqlat_run_queue_latency_seconds" in r.stdout


# -- running the installed files on Debian's libraries ------------------------------

def test_runs_on_debian_libraries(deb):
    probe = (
        "import importlib, json, sys\n"
        "import runqlat.cli\n"
        f"mods = {sorted(['runqlat', *DEBIAN_MODULES])!r}\n"
        "print(json.dumps({'exe': sys.executable, 'mods': {m: (importlib.import_module(m).__file__,"
        " getattr(importlib.import_module(m), '__version__', None)) for m in mods}}))\n")
    r = _installed(["/usr/bin/python3", "-c", probe])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["mods"]["runqlat"][0] == str(PYDIR / "__init__.py")
    for mod, pkg in DEBIAN_MODULES.items():
        path = info["mods"][mod][0]
        owner = _sh(["dpkg", "-S", path]).stdout.split(":")[0]
        assert owner == pkg, f"{mod} comes from {path} ({owner or 'no Debian package'}), not {pkg}"


def test_version_and_help(deb):
    r = _installed([BIN, "version"])
    assert r.returncode == 0 and r.stdout.strip() == f"{PKG} {__version__}", r.stdout + r.stderr
    r = _installed([BIN, "run", "--help"])
    assert r.returncode == 0, r.stderr
    assert "--metrics-addr" in r.stdout and "--pids-file" in r.stdout
    r = _installed([BIN, "run", "--no-such-flag"])
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_doctor(deb):
    r = _installed([BIN, "doctor"])
    assert r.returncode == 0, f"doctor says the tracer cannot run here:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    rows = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert "BTF" in rows and "libbpf" in rows
    r = _installed([BIN, "doctor", "--json"])
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout)
    assert checks and not [c for c in checks if c["status"] == "FAIL"]


def test_containers_lists(deb):
    r = _installed([BIN, "containers", "--json"])
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)


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


def test_run_text(deb, busy_shell):
    r = _installed([BIN, "run", "1", "2"], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    totals = _histograms(r.stdout)
    assert len(totals) == 2, r.stdout
    assert all(t > 0 for t in totals), r.stdout


def test_run_json_per_process(deb, busy_shell):
    r = _installed([BIN, "run", "-P", "-p", str(busy_shell), "-o", "json", "1", "2"], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert records, r.stderr
    assert {rec["mode"] for rec in records} == {"pid"}
    assert {rec["pid"] for rec in records} == {busy_shell}
    assert sum(rec["count"] for rec in records) > 0
    for rec in records:
        assert rec["count"] == sum(b["count"] for b in rec["buckets"])


def test_service_command_with_unit_capabilities(deb, busy_shell):
    """The unit's ExecStart with the installed conffile, under the unit's capability
    bounding set: serves metrics, survives SIGHUP (ExecReload), stops cleanly on SIGTERM."""
    svc = _unit_service_section()
    caps = " ".join(svc["CapabilityBoundingSet"]).split()
    bounding = "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    port = _free_port()
    argv = shlex.split(svc["ExecStart"][0]) + ["--metrics-addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all", *argv],
        env=CLEAN_ENV, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
