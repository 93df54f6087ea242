"""The exporter against a real Prometheus, and its robustness (root, real BPF).

Installs Debian's `prometheus` when missing, runs a private instance on a free
loopback port that scrapes the tracer every second, makes three busy loops
share one CPU and asks Prometheus' HTTP API what it saw. Everything listens
on 127.0.0.1 only, and everything started here is stopped here.

Off CI a missing prerequisite is a skip; with CI=true it is a failure.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

ROOT = Path(__file__).resolve().parent.parent

from helpers import unavailable
from workload import BusyLoops, held_bpf_ids, loaded_programs, usable_cpu

pytestmark = pytest.mark.bpf

HIST = "runqlat_run_queue_latency_seconds"
CLI = [sys.executable, "-m", "runqlat"]


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


# -- helpers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_cpus(busy_cpu: int) -> set[int]:
    """CPUs for the tracer and Prometheus, so the workload's CPU has only the busy loops."""
    rest = set(os.sched_getaffinity(0)) - {busy_cpu}
    return rest or set(os.sched_getaffinity(0))


def http_get(url: str, accept: str | None = None, timeout: float = 10) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")


def parse_exposition(ctype: str, body: str) -> dict:
    parser = parse_openmetrics if ctype.startswith("application/openmetrics-text") else parse_text
    return {f.name: f for f in parser(body)}


def pid_series(fams: dict) -> set[str]:
    return {s.labels["pid"] for s in fams[HIST].samples if s.name == HIST + "_count"}


def schedstat(pid: int) -> tuple[int, int]:
    """(ns spent waiting on a run queue, number of times run) of a task, from the kernel."""
    fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(fields[1]), int(fields[2])


def count_of(fams: dict, pid: int) -> float:
    return next(s.value for s in fams[HIST].samples if s.name == HIST + "_count" and s.labels["pid"] == str(pid))


def check_metrics(url: str) -> None:
    """`promtool check metrics` on a real scrape (text format): no lint problem."""
    promtool = shutil.which("promtool")
    if promtool is None:
        _unavailable("promtool is not installed (apt-get install prometheus)")
    status, _, body = http_get(url)
    assert status == 200, body
    assert HIST + "_bucket" in body
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        f"promtool check metrics: rc={r.returncode}\n{r.stdout}{r.stderr}"


def our_programs() -> set[int]:
    return set(loaded_programs())


def programs_held_by_processes() -> set[int]:
    """IDs of BPF programs some live process holds."""
    held = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            held |= held_bpf_ids(pid)
    return held


@pytest.fixture(autouse=True)
def no_bpf_programs_left():
    """After each test, no program of ours is left behind (pinned or leaked).

    New programs with our names that a live process holds belong to someone
    else's tracer running at the same time; ours have all exited by now.
    """
    if os.geteuid() != 0 or shutil.which("bpftool") is None:
        yield
        return
    before = our_programs()
    yield
    deadline = time.monotonic() + 5  # programs are freed after an RCU grace period
    while True:
        leaked = (our_programs() - before) - programs_held_by_processes()
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not leaked, f"BPF programs left loaded after the test: ids {sorted(leaked)}"


@pytest.fixture(scope="module")
def prerequisites():
    if os.geteuid() != 0:
        unavailable("the exporter end-to-end tests load BPF and need root")
    if shutil.which("bpftool") is None:
        unavailable("bpftool is not installed (run scripts/setup.sh)")
    env = cli_env()
    r = subprocess.run(CLI + ["version"], capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        unavailable(f"the CLI does not start ({' '.join(CLI)} version: {r.stderr.strip()[-300:]})")
    obj = ROOT / "python" / "runqlat" / "data" / "runqlat.bpf.o"
    if "RUNQLAT_BPF_OBJECT" not in os.environ and not obj.exists():
        unavailable(f"{obj} is not built (run scripts/setup.sh)")


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("RUNQLAT_FORCE_HASH", None)
    env.pop("RUNQLAT_FORCE_RAW_TP", None)
    return env


class Tracer:
    """`runqlat-core run ...` in the background; stdout lines arrive in `.lines`."""

    def __init__(self, args: list[str], metrics_port: int, cpus: set[int], stderr_path: Path):
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen(
            CLI + ["run", *args, "--metrics-addr", f"127.0.0.1:{metrics_port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=cli_env(), preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.lines: queue.Queue = queue.Queue()
        self.prog_ids: set[int] = set()  # what it loaded, once it serves
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text()

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the tracer exited with {self.proc.returncode} before serving metrics:\n"
                            f"{self.stderr()}")
            try:
                if http_get(self.metrics_url, timeout=5)[0] == 200:
                    self.prog_ids = held_bpf_ids(self.proc.pid) & our_programs()
                    assert self.prog_ids, "the tracer serves metrics but holds none of our BPF programs"
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"no /metrics at {self.metrics_url} after {timeout} s:\n{self.stderr()}")

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output line from the tracer within {timeout:.1f} s (exit status "
                        f"{self.proc.poll()}):\n{self.stderr()}")

    def terminate(self) -> int:
        """SIGTERM and the exit status (the tracer is killed if it does not stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)  # generous: a loaded CI machine is slow, a hang is not
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return -signal.SIGKILL
        return self.proc.returncode

    def close(self) -> None:
        """Stop it; then none of the programs it loaded may still be loaded."""
        self.terminate()
        self._reader.join(timeout=5)
        self.proc.stdout.close()
        self._stderr.close()
        deadline = time.monotonic() + 5  # freeing waits for an RCU grace period
        while self.prog_ids & our_programs() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.prog_ids & our_programs()
        assert not left, f"BPF programs {sorted(left)} of the tracer outlived it"


# -- Prometheus ------------------------------------------------------------------------

def _start_ticks_to_unix(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _stop_packaged_service(binary: str, installed_at: float) -> None:
    """Debian's postinst may start its own prometheus on :9090; we only want ours."""
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        subprocess.run(["systemctl", "stop", "prometheus"], capture_output=True, timeout=60)
        subprocess.run(["systemctl", "disable", "prometheus"], capture_output=True, timeout=60)
        return
    real = os.path.realpath(binary)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{d}/exe")
        except OSError:
            continue
        started = _start_ticks_to_unix(int(d))
        # only what the install we just ran started
        if exe == real and started is not None and started >= installed_at - 1:
            try:
                os.kill(int(d), signal.SIGTERM)
            except ProcessLookupError:
                pass


def ensure_prometheus() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK)
                                           else None)
    if found:
        return found
    if shutil.which("apt-get") is None:
        unavailable("prometheus is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    installed_at = time.time()
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    if r.returncode != 0 or not os.access(found, os.X_OK):
        unavailable(f"apt-get install prometheus failed: {(r.stderr or r.stdout).strip()[-500:]}")
    _stop_packaged_service(found, installed_at)
    return found


class Prometheus:
    """A private Prometheus on a free loopback port, scraping `target` every second."""

    def __init__(self, binary: str, workdir: Path, target: str, cpus: set[int]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: runqlat\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if http_get(self.url + "/-/ready", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def query(self, promql: str) -> list:
        status, _, body = http_get(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert status == 200, body
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element instant vector, None when there is none (or NaN)."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        v = float(result[0]["value"][1])
        return None if v != v else v

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


# -- the tests ---------------------------------------------------------------------------

def test_prometheus_sees_run_queue_latency_of_the_tracked_process(prerequisites, tmp_path):
    binary = ensure_prometheus()
    with BusyLoops(3, usable_cpu()) as busy:
        tracked, untracked = busy.pids[0], busy.pids[1]
        cpus = other_cpus(busy.cpu)
        metrics_port = free_port()
        tracer = Tracer(["-P", "-p", str(tracked), "--quiet"], metrics_port, cpus, tmp_path / "tracer.err")
        prom = None
        try:
            tracer.wait_serving()
            prom = Prometheus(binary, tmp_path / "prometheus", f"127.0.0.1:{metrics_port}", cpus)
            prom.wait_ready()
            sel = f'{HIST}_count{{pid="{tracked}"}}'
            # two scrapes that carried the tracked process' histogram
            deadline = time.monotonic() + 40
            while (prom.scalar(f"count_over_time({sel}[1m])") or 0) < 2:
                if time.monotonic() > deadline:
                    up = prom.query('up{job="runqlat"}')
                    pytest.fail(f"Prometheus did not scrape the tracked process twice; up={up}\n"
                                f"prometheus log:\n{prom.log()}\ntracer stderr:\n{tracer.stderr()}")
                assert tracer.proc.poll() is None, tracer.stderr()
                time.sleep(0.5)

            # What the workload implies, from the kernel's own account of the same
            # waits (/proc/PID/schedstat: run-queue delay and number of runs) over
            # the 5 s the rate window covers. 3 CPU hogs on one CPU alone wait a
            # few to a few tens of ms each turn; other load on that CPU (a busy
            # developer machine) makes it longer, and the kernel shows by how much.
            # On a loaded machine the counts may not move within 5 s: try again.
            for _attempt in range(4):
                k0, t0 = schedstat(tracked), time.monotonic()
                time.sleep(5)
                k1, t1 = schedstat(tracked), time.monotonic()
                p99 = prom.scalar("histogram_quantile(0.99, sum by (le) "
                                  f'(rate({HIST}_bucket{{pid="{tracked}"}}[5s])))')
                rate = prom.scalar(f"rate({sel}[5s])")
                mean = prom.scalar(f'rate({HIST}_sum{{pid="{tracked}"}}[5s]) / rate({sel}[5s])')
                if p99 is not None and rate and k1[1] > k0[1]:
                    break
            kernel_rate = (k1[1] - k0[1]) / (t1 - t0)
            kernel_mean = (k1[0] - k0[0]) / max(1, k1[1] - k0[1]) / 1e9
            print(f"prometheus: p99 {p99} s, mean {mean} s, {rate} events/s; "
                  f"kernel: mean {kernel_mean} s, {kernel_rate} runs/s")
            assert p99 is not None, prom.query(f'{HIST}_bucket{{pid="{tracked}"}}')
            assert rate is not None and rate > 0
            # every wait is counted once: as many as the kernel's runs
            assert 0.5 < rate / kernel_rate < 2, (rate, kernel_rate)
            # the exact sum in seconds: the same mean wait as the kernel's
            assert mean is not None and 0.5 < mean / kernel_mean < 2, (mean, kernel_mean)
            # the buckets in seconds: p99 at or above the typical wait and within a couple
            # of orders of it (one long wait among a hundred, when other load comes and
            # goes on that CPU, is p99); wrong units or bounds would be off by 1000 or more
            assert 0.0005 < p99 and kernel_mean / 4 < p99 < 250 * kernel_mean, (p99, kernel_mean)
            # only the tracked process has a series
            assert not prom.query(f'{HIST}_count{{pid="{untracked}"}}')
            pids = {r["metric"]["pid"] for r in prom.query(f"{HIST}_count")}
            assert pids == {str(tracked)}
            comm = prom.query(f"{HIST}_count")[0]["metric"].get("comm")
            assert comm == Path(f"/proc/{tracked}/comm").read_text().strip()
            # the health metrics reach Prometheus too
            assert prom.scalar('runqlat_tracked_processes{job="runqlat"}') == 1
            assert prom.query('runqlat_build_info{job="runqlat"}')
            # and the exposition itself passes Prometheus' own linter
            check_metrics(tracer.metrics_url)
            assert tracer.proc.poll() is None, tracer.stderr()
        finally:
            if prom is not None:
                prom.close()
            code = tracer.terminate()
            tracer.close()
        assert code == 0, tracer.stderr()


def test_port_in_use_is_one_clear_line(prerequisites):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(CLI + ["run", "--quiet", "--metrics-addr", f"127.0.0.1:{port}"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("runqlat-core: error: ")
    assert "already in use" in lines[0] and str(port) in lines[0]
    assert r.stdout == ""


def test_scrapes_while_the_pids_file_changes(prerequisites, tmp_path):
    pids_file = tmp_path / "pids"
    with BusyLoops(3, usable_cpu()) as busy:
        a, b = busy.pids[0], busy.pids[1]
        pids_file.write_text(f"{a}\n")
        metrics_port = free_port()
        tracer = Tracer(["-P", "--pids-file", str(pids_file), "--quiet"], metrics_port,
                        other_cpus(busy.cpu), tmp_path / "tracer.err")
        stop = threading.Event()
        rewrites = [0]

        def rewrite():
            # whole-file replacement, as config management tools do
            i = 0
            while not stop.is_set():
                tmp = tmp_path / "pids.new"
                tmp.write_text(f"# rewrite {i}\n{a}\n" + (f"{b}\n" if i % 2 else ""))
                os.rename(tmp, pids_file)
                i += 1
                rewrites[0] = i
                time.sleep(0.01)

        writer = threading.Thread(target=rewrite, daemon=True)
        try:
            tracer.wait_serving()
            deadline = time.monotonic() + 20
            while str(a) not in pid_series(parse_exposition(*http_get(tracer.metrics_url)[1:])):
                assert time.monotonic() < deadline, f"no series for pid {a}:\n{tracer.stderr()}"
                time.sleep(0.2)
            writer.start()
            for i in range(20):
                status, ctype, body = http_get(tracer.metrics_url, OPENMETRICS if i % 2 else None)
                assert status == 200, body
                fams = parse_exposition(ctype, body)
                assert fams[HIST].type == "histogram"
                assert str(a) in pid_series(fams), f"scrape {i}: a is in every version of the file"
                time.sleep(0.1)
            stop.set()
            writer.join(timeout=5)
            assert rewrites[0] > 20
            # the last word wins: b is tracked within the file watch interval. A series
            # of b retired by an earlier rewrite shows once only, so wait until b has been
            # in every scrape for a while (also past the monitor's 1 s window for late
            # re-creations of a retired key, see monitor.snapshot)
            tmp = tmp_path / "pids.new"
            tmp.write_text(f"{a}\n{b}\n")
            os.rename(tmp, pids_file)
            deadline = time.monotonic() + 40
            since = None
            while since is None or time.monotonic() - since < 1.5:
                time.sleep(0.3)
                status, ctype, body = http_get(tracer.metrics_url)
                assert status == 200
                both = {str(a), str(b)} <= pid_series(parse_exposition(ctype, body))
                since = (since or time.monotonic()) if both else None
                assert time.monotonic() < deadline, f"b={b} not tracked after the change:\n{body[-2000:]}"
            # b exits: its series is scraped once more (count never lower), then dropped
            before = count_of(parse_exposition(ctype, body), b)
            victim = next(p for p in busy.procs if p.pid == b)
            victim.kill()
            victim.wait(timeout=10)  # reaped: /proc/<b> is gone
            fams = parse_exposition(*http_get(tracer.metrics_url)[1:])
            assert str(b) in pid_series(fams), "the exited process' final value was not scraped"
            assert count_of(fams, b) >= before
            assert str(b) not in pid_series(parse_exposition(*http_get(tracer.metrics_url)[1:]))
            assert tracer.proc.poll() is None, tracer.stderr()
        finally:
            stop.set()
            code = tracer.terminate()
            tracer.close()
        assert code == 0, tracer.stderr()
        assert "Traceback" not in tracer.stderr()


def test_fifty_concurrent_scrapes_do_not_disturb_the_tracer(prerequisites, tmp_path):
    with BusyLoops(3, usable_cpu()) as busy:
        tracked = busy.pids[0]
        metrics_port = free_port()
        tracer = Tracer(["-P", "-p", str(tracked), "-o", "json", "1"], metrics_port,
                        other_cpus(busy.cpu), tmp_path / "tracer.err")
        try:
            tracer.wait_serving()
            first = json.loads(tracer.next_line(timeout=30))
            assert first["pid"] == tracked

            results: list = []
            lock = threading.Lock()
            go = threading.Barrier(50)

            def scrape(i: int):
                try:
                    go.wait(timeout=30)
                    status, ctype, body = http_get(tracer.metrics_url, OPENMETRICS if i % 2 else None, timeout=30)
                    fams = parse_exposition(ctype, body)
                    ok = status == 200 and str(tracked) in pid_series(fams) or (status, body[-500:])
                except Exception as exc:  # noqa: BLE001 - reported in the assertion
                    ok = repr(exc)
                with lock:
                    results.append(ok)

            threads = [threading.Thread(target=scrape, args=(i,)) for i in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            burst_end = time.time()
            assert [r for r in results if r is not True] == []
            assert len(results) == 50

            assert tracer.proc.poll() is None, tracer.stderr()
            # the interval output goes on: a line stamped after the burst arrives
            deadline = time.monotonic() + 30
            while True:
                obj = json.loads(tracer.next_line(timeout=max(0.1, deadline - time.monotonic())))
                assert obj["mode"] == "pid" and obj["pid"] == tracked
                if obj["ts"] >= burst_end:
                    break
            assert obj["count"] > 0
        finally:
            code = tracer.terminate()
            tracer.close()
        assert code == 0, tracer.stderr()
        assert "Traceback" not in tracer.stderr()
