"""CPU throttling and pressure readers: fake files (pure) and a real cgroup
with a CPU quota and a hog (root)."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from helpers import unavailable
from runqlat.cpuctx import CpuContextReader, parse_cpu_stat, parse_pressure

V2_STAT = ("usage_usec 5000000\nuser_usec 4000000\nsystem_usec 1000000\n"
           "nr_periods 120\nnr_throttled 30\nthrottled_usec 2500000\nnr_bursts 0\nburst_usec 0\n")
V1_STAT = "nr_periods 50\nnr_throttled 10\nthrottled_time 1500000000\nnr_bursts 0\nburst_time 0\n"
PSI = ("some avg10=1.00 avg60=0.50 avg300=0.10 total=3000000\n"
       "full avg10=0.00 avg60=0.00 avg300=0.00 total=250000\n")


def test_parse_cpu_stat_v2_and_v1():
    assert parse_cpu_stat(V2_STAT) == (120, 30, 2.5)
    assert parse_cpu_stat(V1_STAT) == (50, 10, 1.5)
    # v2 without the cpu controller: usage only, no throttling figures
    assert parse_cpu_stat("usage_usec 1\nuser_usec 1\nsystem_usec 0\n") is None
    assert parse_cpu_stat("nr_periods x\nnr_throttled -1\n\x00garbage") is None


def test_parse_pressure():
    assert parse_pressure(PSI) == (3.0, 0.25)
    assert parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n") == (42e-6, None)
    assert parse_pressure("garbage\nsome total=\n") == (None, None)


class Fake:
    def __init__(self, root: Path, v2_cpu: bool, psi: bool = True, v1: bool = True):
        self.root = root
        self.proc = root / "proc"
        self.unified = root / "cg/unified"
        self.v1 = root / "cg/cpu" if v1 else None
        (self.proc / "100").mkdir(parents=True)
        (self.proc / "100" / "cgroup").write_text(
            "3:memory:/pod/x\n2:cpu,cpuacct:/pod/x\n1:name=systemd:/pod/x\n0::/pod/x\n")
        if psi:
            (self.proc / "pressure").mkdir()
            (self.proc / "pressure" / "cpu").write_text(PSI)
        d = self.unified / "pod/x"
        d.mkdir(parents=True)
        (d / "cpu.stat").write_text(V2_STAT if v2_cpu else "usage_usec 1\nuser_usec 1\nsystem_usec 0\n")
        if psi:
            (d / "cpu.pressure").write_text(PSI)
        if v1:
            (self.v1 / "pod/x").mkdir(parents=True)
            (self.v1 / "pod/x" / "cpu.stat").write_text(V1_STAT)

    def reader(self) -> CpuContextReader:
        return CpuContextReader(str(self.proc), str(self.root / "none"), unified=self.unified,
                                v1_cpu=self.v1)


def test_pure_v2(tmp_path):
    ctx = Fake(tmp_path, v2_cpu=True, v1=False).reader().for_cgroup("/pod/x", 100)
    assert (ctx.periods, ctx.throttled_periods, ctx.throttled_seconds) == (120, 30, 2.5)
    assert (ctx.pressure_some_seconds, ctx.pressure_full_seconds) == (3.0, 0.25)
    assert ctx.throttling_from == "cgroup2" and ctx.notes == ()


def test_hybrid_throttling_from_v1(tmp_path):
    ctx = Fake(tmp_path, v2_cpu=False).reader().for_cgroup("/pod/x", 100)
    assert (ctx.periods, ctx.throttled_periods, ctx.throttled_seconds) == (50, 10, 1.5)
    assert ctx.throttling_from == "cgroup1"
    assert ctx.pressure_some_seconds == 3.0  # PSI lives in the cgroup2 tree, controllers or not


def test_hybrid_without_psi_says_so(tmp_path):
    r = Fake(tmp_path, v2_cpu=False, psi=False).reader()
    assert not r.psi_available
    ctx = r.for_cgroup("/pod/x", 100)
    assert ctx.throttled_seconds == 1.5
    assert ctx.pressure_some_seconds is None and ctx.pressure_full_seconds is None
    assert any("no PSI" in n for n in ctx.notes), ctx.notes


def test_gone_cgroup_and_no_cpu_controller(tmp_path):
    f = Fake(tmp_path, v2_cpu=False, v1=False)
    ctx = f.reader().for_cgroup("/pod/gone", 999)
    assert ctx.throttled_seconds is None and ctx.pressure_some_seconds is None
    assert len(ctx.notes) == 2
    # outside our cgroup namespace: nothing is read through '..'
    ctx = f.reader().for_cgroup("/../../etc", 100)
    assert ctx.pressure_some_seconds is None


def test_mountinfo_finds_unified_and_v1_cpu(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "33 31 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
        "40 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    r = CpuContextReader(str(tmp_path), str(mi))
    assert r.unified == Path("/sys/fs/cgroup/unified")
    assert r.v1_cpu == Path("/sys/fs/cgroup/cpu,cpuacct")


# -- a real cgroup with a quota and a hog ---------------------------------------------

def _real_reader() -> CpuContextReader:
    if os.geteuid() != 0:
        unavailable("making cgroups needs root")
    return CpuContextReader()


def _mkcg(mount: Path, name: str) -> Path:
    d = mount / name
    d.mkdir()
    return d


def test_real_cgroup_with_quota_and_hogs():
    r = _real_reader()
    name = f"runqlat-test-cpuctx-{secrets.token_hex(3)}"
    made: list[Path] = []
    hogs: list[subprocess.Popen] = []
    try:
        cpu_v2 = r.unified is not None and "cpu" in (r.unified / "cgroup.subtree_control").read_text().split()
        v2 = _mkcg(r.unified, name) if r.unified is not None else None
        if v2 is not None:
            made.append(v2)
        if cpu_v2:
            (v2 / "cpu.max").write_text("5000 100000")  # 5% of a CPU
            quota_dir = v2
        else:
            if r.v1_cpu is None:
                unavailable("no cpu controller on cgroup v1 or v2")
            quota_dir = _mkcg(r.v1_cpu, name)
            made.append(quota_dir)
            (quota_dir / "cpu.cfs_period_us").write_text("100000")
            (quota_dir / "cpu.cfs_quota_us").write_text("5000")
        cpu = sorted(os.sched_getaffinity(0))[0]
        for _ in range(2):  # two hogs on one CPU: they also wait for each other
            p = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"],
                                 preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
            hogs.append(p)
            for d in {quota_dir, v2} - {None}:
                (d / "cgroup.procs").write_text(str(p.pid))
        # on a loaded machine the hogs may take a while to use up even 5 ms a period
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.5)
            ctx = r.for_cgroup("/" + name, hogs[0].pid)
            raw = (quota_dir / "cpu.stat").read_text()
            if (ctx.throttled_periods or 0) >= 5 or time.monotonic() > deadline:
                break
    finally:
        for p in hogs:
            p.kill()
            p.wait()
        time.sleep(0.1)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
    print(ctx, raw.replace("\n", " "))
    assert ctx.throttling_from == ("cgroup2" if cpu_v2 else "cgroup1")
    vals = dict(line.split() for line in raw.splitlines())
    # what the reader gave is what the kernel's file said (it was read just before)
    assert 5 <= ctx.periods <= int(vals["nr_periods"])
    assert 5 <= ctx.throttled_periods <= int(vals["nr_throttled"])
    key, scale = ("throttled_usec", 1e6) if cpu_v2 else ("throttled_time", 1e9)
    # seconds, from the file's own unit (not ns or us: 1000 times off)
    assert 0.001 * ctx.throttled_periods < ctx.throttled_seconds <= int(vals[key]) / scale
    if r.psi_available:
        assert ctx.pressure_some_seconds is not None and ctx.pressure_some_seconds > 0
        assert ctx.pressure_full_seconds is not None
    else:
        assert any("PSI" in n for n in ctx.notes)


def test_pod_is_its_parent_cgroup(tmp_path):
    f = Fake(tmp_path, v2_cpu=False)
    # the pod cgroup /pod with its own figures; two containers below it
    (f.v1 / "pod" / "cpu.stat").write_text("nr_periods 7\nnr_throttled 3\nthrottled_time 2000000000\n")
    (f.unified / "pod" / "cpu.pressure").write_text("some total=9000000\nfull total=1000000\n")
    (f.unified / "pod/y").mkdir()
    ctx = f.reader().for_group([("/pod/x", 100), ("/pod/y", 100)], parent=True)
    assert (ctx.periods, ctx.throttled_periods, ctx.throttled_seconds) == (7, 3, 2.0)
    assert (ctx.pressure_some_seconds, ctx.pressure_full_seconds) == (9.0, 1.0)
    # one container left: still the pod's cgroup (its counters must not jump)
    assert f.reader().for_group([("/pod/x", 100)], parent=True).periods == 7
    # not a pod: its own cgroup
    assert f.reader().for_group([("/pod/x", 100)]).periods == 50


def test_group_without_a_common_parent_is_summed(tmp_path):
    f = Fake(tmp_path, v2_cpu=True, v1=False)
    (f.unified / "other").mkdir()
    (f.unified / "other" / "cpu.stat").write_text(V2_STAT)
    (f.unified / "other" / "cpu.pressure").write_text(PSI)
    ctx = f.reader().for_group([("/pod/x", 100), ("/other", 100)])
    assert (ctx.periods, ctx.throttled_periods, ctx.throttled_seconds) == (240, 60, 5.0)
    assert ctx.pressure_some_seconds == 6.0


def test_host_notes(tmp_path):
    r = Fake(tmp_path, v2_cpu=False, psi=False, v1=False).reader()
    notes = r.host_notes()
    assert any("no PSI" in n for n in notes) and any("cpu controller" in n for n in notes)
