"""The files in deploy/ and the man page agree with the program they deploy.

No root, no BPF: the systemd unit, the example config, the Prometheus scrape
config, the Grafana dashboard, the Kubernetes DaemonSet, the Containerfile
and packaging/runqlat-core.1 are checked against the CLI's own parser, config
loader and metrics collector, so a renamed option, config key or metric
fails here rather than on a user's host.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent

from helpers import unavailable
from unit_file import DROPINS, allowed_syscalls, capabilities, parse_unit, syscall_groups
from runqlat import cli
from runqlat.metrics import Collector, parse_addr, parse_buckets
from runqlat.model import Mode, Snapshot, context_of, label_names

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "runqlat-core.service"
CONFIG = DEPLOY / "config.toml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "prometheus-rules.yml"
RULES_TEST = DEPLOY / "prometheus-rules.test.yml"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
MANPAGE = ROOT / "packaging" / "runqlat-core.1"

HIST = "runqlat_run_queue_latency_seconds"
# Capabilities the tracer cannot load its programs without.
NEEDED_CAPS = {"CAP_BPF", "CAP_PERFMON"}


# -- helpers -----------------------------------------------------------------------

def click_app():
    return typer.main.get_command(cli.app)


def parse_run_args(args: list[str]) -> dict:
    """Parse `run` arguments exactly as the CLI would, without running anything."""
    run = click_app().commands["run"]
    ctx = run.make_context("run", list(args))
    return ctx.params


def uncommented_config(text: str) -> str:
    """The example config with every commented-out `# key = value` line enabled
    (an alternative value for a key that is already set stays a comment)."""
    key_re = r"([a-z_]+)\s*=\s*.+"
    seen = {m.group(1) for m in re.finditer(rf"^{key_re}$", text, re.M)}
    out = []
    for line in text.splitlines():
        m = re.match(rf"^#\s?({key_re})$", line)
        if m and m.group(2) not in seen:
            seen.add(m.group(2))
            line = m.group(1)
        out.append(line)
    return "\n".join(out) + "\n"


def dashboard_targets(dash: dict):
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for t in sub.get("targets", []):
                yield sub, t


def exported_series_names() -> set[str]:
    """Every sample name the Prometheus collector can emit, from its families' types
    (in every mode: some families exist only for containers and pods)."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",),
                "gauge": ("",), "info": ("_info",)}
    names = set()
    for mode in Mode:
        snap = Snapshot(
            ts=0.0, mode=mode, hists={}, tracked_processes=0, tracked_containers=0,
            drops={}, maps={}, progs={}, features={})
        for family in Collector(lambda: snap, bpf_stats=lambda: True).collect():
            for suffix in suffixes[family.type]:
                names.add(family.name + suffix)
    return names


# -- systemd unit ------------------------------------------------------------------

def test_unit_runs_the_documented_command():
    unit = parse_unit(UNIT)
    svc = unit["Service"]
    assert svc["ExecStart"] == [
        "/usr/bin/runqlat-core run --config /etc/runqlat-core/config.toml --quiet"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # the command line parses with the real CLI
    argv = shlex.split(svc["ExecStart"][0])
    assert argv[:2] == ["/usr/bin/runqlat-core", "run"]
    params = parse_run_args(argv[2:])
    assert params["quiet"] is True
    assert str(params["config"]) == "/etc/runqlat-core/config.toml"


def test_unit_capabilities_allow_bpf_and_exist():
    svc = parse_unit(UNIT)["Service"]
    caps = capabilities(svc)
    assert NEEDED_CAPS <= caps
    # a transient user gets its capabilities as ambient ones: all of the bounding set
    assert svc["DynamicUser"] == ["yes"] and "User" not in svc
    assert capabilities(svc, "AmbientCapabilities") == caps
    # what kernels with CAP_BPF do not need stays out of the default unit
    assert not caps & {"CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_DAC_OVERRIDE"}
    if shutil.which("setpriv"):
        known = {"CAP_" + c.upper() for c in
                 subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True,
                                check=True).stdout.split()}
        assert caps <= known, f"unknown capabilities: {sorted(caps - known)}"
    # The tracer reads every process's /proc entries: hiding them breaks it.
    assert "ProtectProc" not in svc and "ProcSubset" not in svc
    # item 5 of issue 12: the exporter's connection cap needs a known descriptor limit
    assert int(svc["LimitNOFILE"][0]) >= 4096


def test_old_kernel_dropin_adds_only_cap_sys_admin():
    dropin = parse_unit(DROPINS / "old-kernel.conf")
    assert set(dropin) == {"Service"}
    svc = dropin["Service"]
    assert set(svc) == {"CapabilityBoundingSet", "AmbientCapabilities"}
    assert capabilities(svc) == capabilities(svc, "AmbientCapabilities") == {"CAP_SYS_ADMIN"}


def test_unit_system_call_filter_is_an_allow_list_with_bpf():
    tool = shutil.which("systemd-analyze")
    if not tool:
        unavailable("systemd-analyze is not installed (package systemd)")
    svc = parse_unit(UNIT)["Service"]
    allowed = allowed_syscalls(svc, syscall_groups(tool))
    assert "bpf" in allowed
    # the calls a tracer has no business making
    for name in ("setuid", "chown", "mount", "init_module", "reboot", "ptrace", "kexec_load", "swapon"):
        assert name not in allowed, name
    assert svc["SystemCallErrorNumber"] == ["EPERM"]
    assert svc["SystemCallArchitectures"] == ["native"]


def _exposure(tool: str, root: Path) -> float:
    """`systemd-analyze security --offline=true`'s overall figure for the unit (and the
    drop-ins) installed under `root` as /etc/systemd/system."""
    r = subprocess.run([tool, "security", "--offline=true", f"--root={root}", "--no-pager",
                        UNIT.name], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, f"no overall exposure level in:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1))


def test_unit_security_exposure_below_3(tmp_path):
    """CI prints the unit's `systemd-analyze security` figure and fails above 3.0."""
    tool = shutil.which("systemd-analyze")
    if not tool:
        unavailable("systemd-analyze is not installed (package systemd)")
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units)
    figure = _exposure(tool, tmp_path)
    (units / f"{UNIT.name}.d").mkdir()
    shutil.copy(DROPINS / "old-kernel.conf", units / f"{UNIT.name}.d")
    old_kernel = _exposure(tool, tmp_path)
    print(f"\nsystemd-analyze security --offline=true {UNIT.name}: {figure} "
          f"(with old-kernel.conf: {old_kernel})")
    assert figure <= 3.0, f"the unit's exposure is {figure}, above 3.0"
    assert old_kernel <= 3.0, f"with old-kernel.conf the exposure is {old_kernel}, above 3.0"


def test_unit_verifies():
    tool = shutil.which("systemd-analyze")
    if not tool:
        unavailable("systemd-analyze is not installed (package systemd)")
    r = subprocess.run([tool, "verify", "--man=no", str(UNIT)], capture_output=True, text=True)
    problems = []
    for line in (r.stdout + r.stderr).splitlines():
        # before the package is installed the binary is legitimately missing
        if "Command /usr/bin/runqlat-core is not executable" in line and \
                not Path("/usr/bin/runqlat-core").exists():
            continue
        problems.append(line)
    assert not problems, "\n".join(problems)


# -- config ------------------------------------------------------------------------

def test_config_keys_are_cli_config_keys():
    data = tomllib.loads(CONFIG.read_text())
    assert set(data) <= cli.CONFIG_KEYS
    assert data["metrics_addr"] == "127.0.0.1:9435"  # loopback unless the admin says otherwise
    cli.load_config(CONFIG)  # the loader's own type checks


def test_config_commented_examples_are_valid(tmp_path):
    text = uncommented_config(CONFIG.read_text())
    data = tomllib.loads(text)
    unknown = set(data) - cli.CONFIG_KEYS
    assert not unknown, f"example config documents keys the CLI rejects: {sorted(unknown)}"
    for key in ("pids_file", "metrics_addr", "all_containers", "per_container", "interval",
                "per_process", "buckets", "containers", "cgroups", "pids", "output_file"):
        assert key in data, f"{key} is not documented in {CONFIG.name}"
    f = tmp_path / "all.toml"
    f.write_text(text)
    loaded = cli.load_config(f)
    parse_buckets(loaded["buckets"])
    parse_addr(loaded["metrics_addr"])
    # what the unit's hardening allows it to write
    assert loaded["output_file"].startswith("/var/log/runqlat-core/")
    assert "LogsDirectory" in parse_unit(UNIT)["Service"]


def test_config_reload_keys_are_documented():
    text = CONFIG.read_text()
    for key in cli.RELOADABLE:
        assert re.search(rf"^#?\s?{key}\s*=", text, re.M), f"{key} (SIGHUP-reloadable) is not in the example"


# -- Grafana -----------------------------------------------------------------------

RECORDED_RE = r"\b[a-z]+:runqlat_[a-z_]+:[a-z0-9_]+"


def recorded_names() -> set[str]:
    return set(re.findall(r"^\s+- record: (\S+)$", RULES.read_text(), re.M))


def test_dashboard_queries_use_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exported = exported_series_names()
    exprs = [t["expr"] for _, t in dashboard_targets(dash)]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    assert exprs
    used, recorded = set(), set()
    for expr in exprs:
        rec = set(re.findall(RECORDED_RE, expr))
        names = set(re.findall(r"\brunqlat_[a-z_]+", re.sub(RECORDED_RE, "", expr)))
        assert names or rec, f"query uses no runqlat metric: {expr}"
        used |= names
        recorded |= rec
    assert used <= exported, f"dashboard queries metrics that are not exported: {sorted(used - exported)}"
    # series of recording rules: ones deploy/prometheus-rules.yml records
    assert recorded <= recorded_names(), sorted(recorded - recorded_names())
    assert any(HIST in e for e in exprs)


def test_dashboard_queries_parse(tmp_path):
    """Every query is valid PromQL (promtool parses it as a rule), variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for _, t in dashboard_targets(dash)]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m")
        e = re.sub(r"\$\{?\w+\}?", ".*", e)
        lines += [f"      - record: dashboard:query:{i}", f"        expr: {json.dumps(e)}"]
    f = tmp_path / "dashboard-rules.yml"
    f.write_text("\n".join(lines) + "\n")
    r = subprocess.run([_promtool(), "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_has_the_promised_panels():
    dash = json.loads(DASHBOARD.read_text())
    targets = list(dashboard_targets(dash))
    heat = [(p, t) for p, t in targets if p["type"] == "heatmap"]
    assert heat and all(f"{HIST}_bucket" in t["expr"] and t.get("format") == "heatmap" for _, t in heat)

    # p50 and p99 per process, container and pod come from the recording rules
    exprs = [t["expr"] for _, t in targets]
    for level in ("process", "container", "pod"):
        for q in ("p50", "p99"):
            assert any(e.startswith(f"{level}:{HIST}:{q}_") for e in exprs), f"no {q} per {level}"
    assert any("runqlat_cpu_throttled_periods" in e for e in exprs)
    assert any("runqlat_cpu_pressure_some_seconds_total" in e for e in exprs)
    exprs = " ".join(t["expr"] for _, t in targets)
    assert "runqlat_tracked_processes" in exprs
    assert "runqlat_dropped_events_total" in exprs


def test_dashboard_layout_and_variables():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"namespace", "pod"} <= variables
    text = DASHBOARD.read_text()
    grafana_builtin = {"__rate_interval", "__interval", "__range"}
    for ref in set(re.findall(r"\$\{?(\w+)", text)):
        assert ref in variables | grafana_builtin, f"${ref} is not a dashboard variable"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


# -- Prometheus and Kubernetes -----------------------------------------------------

def _yaml():
    try:
        import yaml
    except ImportError:  # PyYAML is not a dependency: fall back to text checks
        return None
    return yaml


def test_prometheus_scrape_config():
    text = PROMETHEUS.read_text()
    yaml = _yaml()
    if yaml:
        jobs = {j["job_name"]: j for j in yaml.safe_load(text)["scrape_configs"]}
        static = jobs["runqlat-core"]["static_configs"][0]["targets"]
        assert "127.0.0.1:9435" in static
        assert jobs["runqlat-core-pods"]["kubernetes_sd_configs"] == [{"role": "pod"}]
    else:
        assert re.search(r"^scrape_configs:$", text, re.M)
        assert re.search(r"job_name: runqlat-core$", text, re.M)
        assert '"127.0.0.1:9435"' in text
        assert "kubernetes_sd_configs" in text
    assert "\t" not in text


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool is not installed (apt-get install prometheus)")
    return found


def test_rules_pass_promtool_check():
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_unit_tests_pass():
    """Recording rules give the quantiles the synthetic series imply; the alerts fire
    (and stay quiet) as the test file says: deploy/prometheus-rules.test.yml."""
    r = subprocess.run([_promtool(), "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                       timeout=120, cwd=DEPLOY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_use_exported_metrics_and_labels():
    text = RULES.read_text()
    used = set(re.findall(r"\brunqlat_[a-z_]+", text)) - set(re.findall(r"(?<=:)runqlat_[a-z_]+(?=:)", text))
    exported = exported_series_names()
    assert used and used <= exported, sorted(used - exported)
    # label names the rules group by are ones the exporter uses
    known = {n for m in Mode for n in label_names(m, context_of(m))} | {"instance", "job", "le", "reason"}
    for group in re.findall(r"by \(([^)]*)\)", text):
        labels = {x.strip() for x in group.split(",")}
        assert labels <= known, labels - known


def test_rules_cover_every_level_and_window():
    text = RULES.read_text()
    recorded = set(re.findall(r"^\s+- record: (\S+)$", text, re.M))
    for level in ("container", "pod", "process"):
        for q in ("p50", "p99"):
            for w in ("1m", "5m"):
                assert f"{level}:{HIST}:{q}_{w}" in recorded
    alerts = set(re.findall(r"^\s+- alert: (\S+)$", text, re.M))
    assert {"RunqlatPodRunQueueLatencyHigh", "RunqlatPodLatencyWithThrottling", "RunqlatDroppingEvents",
            "RunqlatExporterDown"} <= alerts
    # every alert has a unit test
    tested = set(re.findall(r"alertname: (\S+)", RULES_TEST.read_text()))
    assert alerts <= tested, alerts - tested


def test_daemonset_mounts_and_args():
    text = DAEMONSET.read_text()
    assert "\t" not in text
    yaml = _yaml()
    if yaml:
        ds = [d for d in yaml.safe_load_all(text) if d["kind"] == "DaemonSet"][0]
        pod = ds["spec"]["template"]
        spec = pod["spec"]
        annotations = pod["metadata"]["annotations"]
        (ctr,) = spec["containers"]
        assert spec["hostPID"] is True
        assert ctr["securityContext"]["privileged"] is True
        mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
        vols = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
        for path in ("/sys/fs/cgroup", "/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/bpf",
                     "/run/containerd", "/run/containers/storage"):
            assert path in mounts, f"{path} is not mounted"
            assert vols[mounts[path]["name"]] == path
        # the runtimes' state (pod names come from it) is only read
        for path in ("/run/containerd", "/run/containers/storage"):
            assert mounts[path]["readOnly"] is True
        args = ctr["args"]
        assert ctr["command"] == ["/usr/bin/runqlat-core"]
        port = ctr["ports"][0]["containerPort"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
    else:
        assert re.search(r"^\s+hostPID: true$", text, re.M)
        assert re.search(r"^\s+privileged: true$", text, re.M)
        for path in ("/sys/fs/cgroup", "/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/bpf",
                     "/run/containerd", "/run/containers/storage"):
            assert re.search(rf"^\s+mountPath: {path}$", text, re.M), f"{path} is not mounted"
            assert re.search(rf"^\s+path: {path}$", text, re.M), f"{path} is not a hostPath volume"
        m = re.search(r"^\s+args:\n((?:\s+- .+\n)+)", text, re.M)
        args = [a.strip()[2:] for a in m.group(1).splitlines()]
        port = int(re.search(r"containerPort: (\d+)", text).group(1))
        assert 'prometheus.io/scrape: "true"' in text
        assert f'prometheus.io/port: "{port}"' in text
    assert args[0] == "run"
    params = parse_run_args(args[1:])
    assert params["all_containers"] and params["per_container"]
    assert params["metrics_addr"] == f"0.0.0.0:{port}"
    parse_addr(params["metrics_addr"])


def test_containerfile_command_parses():
    text = CONTAINERFILE.read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)) == ["/usr/bin/runqlat-core"]
    assert cmd[0] == "run"
    parse_run_args(cmd[1:])


# -- man page ----------------------------------------------------------------------

def _man_long_options(text: str) -> set[str]:
    """Long options as roff writes them: \\-\\-pids\\-file -> pids-file."""
    return {o.replace("\\-", "-") for o in re.findall(r"\\-\\-([a-z](?:[a-z]|\\-)*[a-z])", text)}


def test_man_page_documents_every_option():
    text = MANPAGE.read_text()
    documented = _man_long_options(text)
    group = click_app()
    real = {"help"}
    foreign = {"now"}  # systemctl enable --now
    for name, cmd in group.commands.items():
        assert re.search(rf"^\.B(?:R)? runqlat-core {name}\b", text, re.M) or \
            re.search(rf"^\.B {name}$", text, re.M), f"command {name} is not in the man page"
        for param in cmd.params:
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    real.add(opt[2:])
                    assert opt[2:] in documented, f"{name} {opt} is not in the man page"
    stale = documented - real - foreign
    assert not stale, f"the man page documents options that do not exist: {sorted(stale)}"


def test_man_page_renders_cleanly():
    groff = shutil.which("groff")
    if not groff:
        unavailable("groff is not installed (package groff-base)")
    r = subprocess.run([groff, "-man", "-ww", "-z", str(MANPAGE)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_libbpf_callback_works_under_memory_deny_write_execute():
    """The unit sets MemoryDenyWriteExecute=yes: libbpf's message callback must not need
    write+execute memory (cffi's ffi.callback would: MemoryError at import)."""
    assert parse_unit(UNIT)["Service"]["MemoryDenyWriteExecute"] == ["yes"]
    try:
        import ctypes
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        unavailable("libseccomp.so.2 is missing (apt-get install libseccomp2)")
    code = ("from runqlat import _ffi, bpf, errors\n"
            "try:\n    bpf.BpfObject('/nonexistent/runqlat.bpf.o')\n"
            "except errors.RunqlatError as exc:\n    print(exc)\n")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "seccomp_exec.py"), "--mdwe", "--",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "python")})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # libbpf's own message came through the callback
    assert "libbpf: elf: failed to open /nonexistent/runqlat.bpf.o" in r.stdout, r.stdout
