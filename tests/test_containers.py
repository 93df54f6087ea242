"""Unit tests for runqlat.containers on fake /proc and state trees."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest

from runqlat import containers as ct
from runqlat.containers import Container, ContainerError, discover, resolve
from runqlat.errors import RunqlatError
from runqlat.policy import STATE_ENV, LoadPolicy

HOST_NS = 4026531836
IDS = {k: (k * 64)[:64] for k in "abcdef"}  # 64-hex ids: "aaaa...", "bbbb..."


class FakeHost:
    """A fake host: proc root, a containerd state dir, docker and
    containers/storage roots, all under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        self.state = root / "run/containerd/io.containerd.runtime.v2.task"
        self.docker = root / "var/lib/docker"
        self.storage = root / "var/lib/containers/storage"
        self.proc.mkdir(parents=True)
        self.state.mkdir(parents=True)
        # PID 1 and the scanner itself live in the host PID namespace.
        self.add_proc(1, ppid=0, pidns=HOST_NS, cgroup="/init.scope", comm="systemd")
        self.add_proc("self", ppid=1, pidns=HOST_NS, cgroup="/user.slice")

    def add_proc(
        self,
        pid,
        *,
        ppid: int = 1,
        pidns: int | None = None,
        cgroup: str | None = "/",
        v1: dict[str, str] | None = None,
        comm: str = "sh",
    ) -> Path:
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True, exist_ok=True)
        if pidns is not None:
            # Real ns links are magic; a dangling symlink reads the same.
            os.symlink(f"pid:[{pidns}]", d / "ns" / "pid")
        lines = [f"{i + 1}:{ctrl}:{path}" for i, (ctrl, path) in enumerate((v1 or {}).items())]
        if cgroup is not None:
            lines.append(f"0::{cgroup}")
        (d / "cgroup").write_text("\n".join(lines) + "\n")
        (d / "status").write_text(f"Name:\t{comm}\nPid:\t{pid}\nPPid:\t{ppid}\n")
        (d / "comm").write_text(comm + "\n")
        return d

    def add_task(
        self,
        ns: str,
        cid: str,
        pid,
        annotations: dict | None = None,
        state: Path | None = None,
        config: str | None = None,
    ) -> Path:
        d = (state or self.state) / ns / cid
        d.mkdir(parents=True)
        (d / "init.pid").write_text(str(pid))
        spec = {"ociVersion": "1.0.2-dev", "root": {"path": "rootfs"}}
        if annotations is not None:
            spec["annotations"] = annotations
        (d / "config.json").write_text(config if config is not None else json.dumps(spec))
        (d / "address").write_text("unix:///run/containerd/s/x")
        return d

    def add_docker_name(self, cid: str, name: str) -> None:
        d = self.docker / "containers" / cid
        d.mkdir(parents=True)
        (d / "config.v2.json").write_text(json.dumps({"ID": cid, "Name": "/" + name}))

    def discover(self, **kw) -> list[Container]:
        kw.setdefault("containerd_state_dirs", [str(self.state)])
        kw.setdefault("docker_roots", [str(self.docker)])
        kw.setdefault("storage_roots", [str(self.storage)])
        return discover(str(self.proc), **kw)

    def by_id(self, **kw) -> dict[str, Container]:
        return {c.id: c for c in self.discover(**kw)}


@pytest.fixture
def host(tmp_path, monkeypatch) -> FakeHost:
    # Keep defaults hermetic even if a test passes containerd_state_dirs=None.
    monkeypatch.setattr(ct, "DEFAULT_CONTAINERD_STATE_DIRS", (str(tmp_path / "nodefault"),))
    return FakeHost(tmp_path)


# ---------------------------------------------------------------- containerd


def test_plain_containerd(host):
    host.add_proc(100, pidns=4026532001, cgroup="/default/web")
    host.add_task("default", "web", 100)
    (c,) = host.discover()
    assert c == Container(
        id="web", name="web", runtime="containerd", namespace="default",
        init_pid=100, pidns=4026532001, cgroup="/default/web",
    )


def test_plain_containerd_name_annotation(host):
    host.add_proc(100, pidns=4026532001)
    host.add_task("default", IDS["a"], 100, annotations={"nerdctl/name": "nginx"})
    (c,) = host.discover()
    assert c.name == "nginx" and c.runtime == "containerd"


def test_docker_moby_namespace(host):
    cid = IDS["a"]
    host.add_proc(200, pidns=4026532002, cgroup=f"/system.slice/docker-{cid}.scope")
    host.add_task("moby", cid, 200)
    host.add_docker_name(cid, "redis")
    (c,) = host.discover()
    # Found both in the state dir and via the docker-<id>.scope cgroup:
    # reported once, from the state dir (it knows the namespace).
    assert (c.id, c.name, c.runtime, c.namespace) == (cid, "redis", "docker", "moby")
    assert c.cgroup == f"/system.slice/docker-{cid}.scope"


def test_docker_name_unreadable(host):
    cid = IDS["b"]
    host.add_proc(200, pidns=4026532002)
    host.add_task("moby", cid, 200)
    d = host.docker / "containers" / cid
    d.mkdir(parents=True)
    (d / "config.v2.json").write_text("{not json")
    (c,) = host.discover()
    assert c.runtime == "docker" and c.name is None


def test_cri_k8s_namespace_and_sandbox_skipped(host):
    sandbox, app = IDS["a"], IDS["b"]
    pod_slice = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice"
    host.add_proc(300, pidns=4026532003, cgroup=f"{pod_slice}/cri-containerd-{sandbox}.scope", comm="init")
    host.add_proc(310, pidns=4026532003, cgroup=f"{pod_slice}/cri-containerd-{app}.scope", comm="nginx")
    host.add_task("k8s.io", sandbox, 300, annotations={
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-name": "web-0",
    })
    host.add_task("k8s.io", app, 310, annotations={
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "nginx",
        "io.kubernetes.pod.name": "web-0",
    })
    cs = host.discover()
    # The pause container must not come back through the cgroup scan either.
    assert [c.id for c in cs] == [app]
    (c,) = cs
    assert (c.name, c.pod, c.runtime, c.namespace) == ("nginx", "web-0", "cri", "k8s.io")
    assert c.cgroup.endswith(f"cri-containerd-{app}.scope")


def test_state_dir_with_legacy_sandbox_name(host):
    host.add_proc(310, pidns=4026532003)
    host.add_task("k8s.io", IDS["c"], 310, annotations={
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "pod-x",
    })
    (c,) = host.discover()
    assert (c.name, c.pod) == ("app", "pod-x")


def test_dead_task_is_skipped(host):
    # Task killed but not deleted: state dir and init.pid remain.
    host.add_task("default", "dead", 999)
    host.add_proc(100, pidns=4026532001)
    host.add_task("default", "live", 100)
    assert list(host.by_id()) == ["live"]


def test_garbage_in_state_dir(host):
    host.add_proc(100, pidns=4026532001)
    host.add_task("default", "badpid", "not-a-pid")
    host.add_task("default", "badjson", 100, config="{oops")
    t = host.add_task("default", "annlist", 100)
    (t / "config.json").write_text(json.dumps({"annotations": ["x"]}))
    (host.state / "default" / "notatask").mkdir()  # no init.pid yet
    (host.state / "stray-file").write_text("x")  # a file where a namespace dir is expected
    found = host.by_id()
    assert set(found) == {"badjson", "annlist"}
    assert found["badjson"].name == "badjson"


def test_missing_state_dirs_are_fine(host, tmp_path):
    host.add_proc(100, pidns=4026532001)
    assert host.discover(containerd_state_dirs=[str(tmp_path / "nope"), "/nonexistent/x"]) == []


def test_several_state_dirs_and_dedupe(host, tmp_path):
    other = tmp_path / "run/docker/containerd/daemon/io.containerd.runtime.v2.task"
    host.add_proc(100, pidns=4026532001)
    host.add_proc(101, pidns=4026532011)
    host.add_task("default", "one", 100)
    host.add_task("moby", "two", 101, state=other)
    host.add_task("default", "one", 100, state=other)  # same id seen twice
    cs = host.discover(containerd_state_dirs=[str(host.state), str(other), str(host.state)])
    assert [(c.id, c.runtime) for c in cs] == [("one", "containerd"), ("two", "docker")]


def test_env_var_adds_state_dirs_to_defaults(host, tmp_path, monkeypatch):
    extra = tmp_path / "private/state/io.containerd.runtime.v2.task"
    host.add_proc(100, pidns=4026532001)
    host.add_proc(101, pidns=4026532011)
    host.add_task("default", "in-default", 100)
    host.add_task("test", "in-extra", 101, state=extra)
    monkeypatch.setattr(ct, "DEFAULT_CONTAINERD_STATE_DIRS", (str(host.state),))
    assert list(host.by_id(containerd_state_dirs=None)) == ["in-default"]
    defaults = ct.DEFAULT_CONTAINERD_STATE_DIRS
    assert LoadPolicy.from_env({}).containerd_state_dirs == defaults
    dirs = LoadPolicy.from_env({STATE_ENV: f"::/nonexistent:{extra}"}).containerd_state_dirs
    assert dirs == defaults + ("/nonexistent", str(extra))
    assert list(host.by_id(containerd_state_dirs=dirs)) == ["in-default", "in-extra"]


# ------------------------------------------------------- pidns and cgroup


def test_host_pidns_is_none(host):
    host.add_proc(100, pidns=HOST_NS)  # e.g. a container run with --pid=host
    host.add_task("default", "hostpid", 100)
    (c,) = host.discover()
    assert c.pidns is None


def test_host_pidns_from_self_when_pid1_unreadable(host):
    os.unlink(host.proc / "1" / "ns" / "pid")
    host.add_proc(100, pidns=HOST_NS)
    host.add_proc(101, pidns=4026532001)
    host.add_task("default", "shared", 100)
    host.add_task("default", "private", 101)
    found = host.by_id()
    assert found["shared"].pidns is None
    assert found["private"].pidns == 4026532001


def test_pid1_and_self_namespaces_both_count_as_host(host):
    # Tracer in its own pidns but with hostPID-like view: either inode is
    # "the host" from the tracer's point of view.
    os.unlink(host.proc / "self" / "ns" / "pid")
    os.symlink("pid:[4026599999]", host.proc / "self" / "ns" / "pid")
    host.add_proc(100, pidns=4026599999)
    host.add_task("default", "x", 100)
    assert host.discover()[0].pidns is None


def test_unreadable_ns_link(host):
    host.add_proc(100, pidns=None)
    host.add_task("default", "x", 100)
    assert host.discover()[0].pidns is None


@pytest.mark.parametrize(
    "lines, want",
    [
        (None, None),  # no cgroup file at all
        ({"v1": {"memory": "/default/x"}, "cgroup": None}, None),  # v1 only
        ({"cgroup": "/"}, None),  # root would mean the whole host
        ({"cgroup": "/default/x (deleted)"}, "/default/x"),
        ({"cgroup": "/../../kubepods.slice/x.scope"}, None),  # foreign cgroupns
        ({"cgroup": "/a/..b/c"}, "/a/..b/c"),  # '..' only as a whole segment
        ({"v1": {"cpu": "/default/x", "name=systemd": "/default/x"}, "cgroup": "/default/x"}, "/default/x"),
    ],
)
def test_cgroup_field(host, lines, want):
    if lines is None:
        d = host.add_proc(100, pidns=4026532001)
        (d / "cgroup").unlink()
    else:
        host.add_proc(100, pidns=4026532001, **lines)
    host.add_task("default", "x", 100)
    (c,) = host.discover()
    assert c.cgroup == want


# ----------------------------------------------------- cgroup-scan source


@pytest.mark.parametrize(
    "cgroup, runtime",
    [
        ("/machine.slice/crio-{id}.scope", "crio"),
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/crio-{id}.scope", "crio"),
        ("/machine.slice/libpod-{id}.scope/container", "podman"),
        ("/libpod_parent/libpod-{id}", "podman"),
        ("/system.slice/docker-{id}.scope", "docker"),
        ("/docker/{id}", "docker"),
        ("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope", "cri"),
        ("/kubepods/besteffort/pod0f1e2d3c-aaaa-bbbb-cccc-000000000000/{id}", "cri"),
        ("/kubepods/pod0f1e2d3c-aaaa-bbbb-cccc-000000000000/{id}", "cri"),
    ],
)
def test_cgroup_patterns(host, cgroup, runtime):
    cid = IDS["d"]
    path = cgroup.format(id=cid)
    host.add_proc(500, pidns=4026532005, cgroup=path)
    (c,) = host.discover()
    assert (c.id, c.runtime, c.init_pid, c.namespace) == (cid, runtime, 500, None)
    assert c.cgroup == path
    assert c.pidns == 4026532005


@pytest.mark.parametrize(
    "cgroup",
    [
        "/machine.slice/crio-conmon-{id}.scope",
        "/machine.slice/libpod-conmon-{id}.scope",
        "/system.slice/docker.service",
        "/user.slice/user-0.slice/session-1.scope",
        "/docker/{short}",  # not a full 64-hex id
        "/system.slice/notdocker-{id}.scope",
    ],
)
def test_cgroup_non_containers(host, cgroup):
    host.add_proc(500, cgroup=cgroup.format(id=IDS["d"], short=IDS["d"][:12]))
    assert host.discover() == []


def test_cgroup_v1_only_host(host):
    cid = IDS["e"]
    host.add_proc(500, pidns=4026532005, cgroup=None,
                  v1={"memory": f"/docker/{cid}", "cpu": f"/docker/{cid}"})
    (c,) = host.discover()
    assert (c.id, c.runtime, c.cgroup) == (cid, "docker", None)


def test_cgroup_scan_groups_pids_and_picks_init(host):
    cid = IDS["a"]
    path = f"/machine.slice/libpod-{cid}.scope"
    host.add_proc(90, ppid=1, cgroup="/machine.slice/libpod-conmon-x.scope", comm="conmon")
    # 150 is a low PID after wrap-around, but its parent is in the group;
    # 200 is the one whose parent (conmon) is outside.
    host.add_proc(200, ppid=90, pidns=4026532010, cgroup=path)
    host.add_proc(300, ppid=200, pidns=4026532010, cgroup=path)
    host.add_proc(150, ppid=300, pidns=4026532010, cgroup=path)
    (c,) = host.discover()
    assert (c.id, c.init_pid, c.runtime) == (cid, 200, "podman")


def test_cgroup_scan_init_falls_back_to_lowest_pid(host):
    cid = IDS["a"]
    path = f"/docker/{cid}"
    host.add_proc(400, ppid=1, pidns=4026532010, cgroup=path)
    host.add_proc(300, ppid=1, pidns=4026532010, cgroup=path)
    (host.proc / "300" / "status").unlink()  # unreadable PPid: still a root
    (c,) = host.discover()
    assert c.init_pid == 300


def test_cgroup_scan_names(host):
    docker_id, podman_id, crio_id = IDS["a"], IDS["b"], IDS["c"]
    host.add_proc(500, pidns=4026532005, cgroup=f"/system.slice/docker-{docker_id}.scope")
    host.add_docker_name(docker_id, "db")
    host.add_proc(600, pidns=4026532006, cgroup=f"/machine.slice/libpod-{podman_id}.scope")
    oc = host.storage / "overlay-containers"
    oc.mkdir(parents=True)
    (oc / "containers.json").write_text(json.dumps([
        {"id": IDS["f"], "names": ["other"]},
        {"id": podman_id, "names": ["cache"]},
    ]))
    host.add_proc(700, pidns=4026532007, cgroup=f"/kubepods.slice/crio-{crio_id}.scope")
    ud = oc / crio_id / "userdata"
    ud.mkdir(parents=True)
    (ud / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.container.name": "api",
        "io.kubernetes.pod.name": "api-7d9",
    }}))
    found = host.by_id()
    assert found[docker_id].name == "db"
    assert found[podman_id].name == "cache"
    assert (found[crio_id].name, found[crio_id].pod) == ("api", "api-7d9")


def test_crio_pod_namespace(host):
    cid = IDS["c"]
    host.add_proc(700, pidns=4026532007, cgroup=f"/kubepods.slice/crio-{cid}.scope")
    ud = host.storage / "overlay-containers" / cid / "userdata"
    ud.mkdir(parents=True)
    (ud / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.container.name": "api",
        "io.kubernetes.pod.name": "api-7d9",
        "io.kubernetes.pod.namespace": "shop",
    }}))
    (c,) = host.discover()
    assert (c.runtime, c.pod_namespace, c.pod, c.name) == ("crio", "shop", "api-7d9", "api")
    assert [x.id for x in resolve([c], ["shop/api-7d9/api"])] == [cid]


def test_storage_and_docker_roots_given(host, tmp_path):
    podman_id, docker_id = IDS["b"], IDS["a"]
    other = tmp_path / "private/storage"
    (other / "overlay-containers").mkdir(parents=True)
    (other / "overlay-containers" / "containers.json").write_text(
        json.dumps([{"id": podman_id, "names": ["pm"]}]))
    host.add_proc(600, pidns=4026532006, cgroup=f"/libpod_parent/libpod-{podman_id}")
    dk = tmp_path / "private/docker"
    (dk / "containers" / docker_id).mkdir(parents=True)
    (dk / "containers" / docker_id / "config.v2.json").write_text(json.dumps({"Name": "/dk"}))
    host.add_proc(500, pidns=4026532005, cgroup=f"/docker/{docker_id}")
    assert host.by_id()[podman_id].name is None
    found = host.by_id(storage_roots=["/nonexistent", str(other)], docker_roots=[str(host.docker), str(dk)])
    assert (found[podman_id].name, found[docker_id].name) == ("pm", "dk")


def test_roots_from_env():
    from runqlat.policy import DOCKER_ROOT_ENV, STORAGE_ENV
    policy = LoadPolicy.from_env({DOCKER_ROOT_ENV: "/a::/b", STORAGE_ENV: "/s"})
    assert policy.docker_roots == (ct.DEFAULT_DOCKER_ROOT, "/a", "/b")
    assert policy.storage_roots == ct.DEFAULT_STORAGE_ROOTS + ("/s",)
    empty = LoadPolicy.from_env({})
    assert (empty.docker_roots, empty.storage_roots) == ((ct.DEFAULT_DOCKER_ROOT,), ct.DEFAULT_STORAGE_ROOTS)


def test_docker_data_root_from_the_hostname_mount(host, tmp_path):
    # dockerd --data-root elsewhere: its spec bind-mounts <root>/containers/<id>/hostname
    cid = IDS["e"]
    root = tmp_path / "elsewhere/docker"
    (root / "containers" / cid).mkdir(parents=True)
    (root / "containers" / cid / "config.v2.json").write_text(json.dumps({"Name": "/web"}))
    host.add_proc(200, pidns=4026532002, cgroup=f"/docker/{cid}")
    spec = {"mounts": [{"destination": "/etc/resolv.conf", "source": "/x/resolv.conf"},
                       {"destination": "/etc/hostname",
                        "source": f"{root}/containers/{cid}/hostname"}]}
    host.add_task("moby", cid, 200, config=json.dumps(spec))
    (c,) = host.discover()
    assert (c.runtime, c.name) == ("docker", "web")
    # a mount that does not name this container's own dir is not taken
    spec["mounts"][1]["source"] = f"{root}/containers/{IDS['f']}/hostname"
    (host.state / "moby" / cid / "config.json").write_text(json.dumps(spec))
    assert host.discover()[0].name is None


# ------------------------------------------------------- hostile metadata


def test_label_values_are_cleaned_and_bounded():
    assert ct.clean_label("web-0") == "web-0"
    assert ct.clean_label("") is None and ct.clean_label(None) is None and ct.clean_label(7) is None
    assert ct.clean_label("a\nb\x1b[31mc\u2028") == "a\ufffdb\ufffd[31mc\ufffd"
    assert ct.clean_label("x\ud800y") == "x\ufffdy"  # a lone surrogate
    long = ct.clean_label("n" * 100_000)
    assert len(long) == ct.MAX_LABEL_LEN and long.endswith("\u2026")
    assert ct.clean_label("é" * 300).encode()  # still encodable


def test_hostile_annotations_become_clean_fields(host):
    host.add_proc(310, pidns=4026532003)
    # JSON escapes can carry lone surrogates and control characters
    config = ('{"annotations": {"io.kubernetes.cri.container-type": "container", '
              '"io.kubernetes.cri.container-name": "app\\ud800\\n\\u001b[2J", '
              '"io.kubernetes.cri.sandbox-name": "' + "p" * 5000 + '", '
              '"io.kubernetes.cri.sandbox-namespace": ["not", "a", "string"]}}')
    host.add_task("k8s.io", IDS["c"], 310, config=config)
    problems = []
    (c,) = host.discover(problems=problems)
    assert c.name == "app\ufffd\ufffd\ufffd[2J"
    assert len(c.pod) == ct.MAX_LABEL_LEN
    assert c.pod_namespace is None
    json.dumps(c.__dict__).encode("utf-8")
    (c.name + c.pod).encode("utf-8")  # no lone surrogate left


def test_malformed_state_is_reported_not_raised(host):
    host.add_proc(100, pidns=4026532001)
    host.add_task("default", "badpid", "12\x00garbage")
    host.add_task("default", "badjson", 100, config="{oops")
    host.add_task("default", "deep", 100, config="[" * 100_000 + "]" * 100_000)
    host.add_task("default", "annlist", 100, config=json.dumps({"annotations": ["x"]}))
    big = host.add_task("default", "huge", 100)
    with open(big / "config.json", "w") as f:
        f.write('{"annotations": {"nerdctl/name": "')
        f.write("x" * (ct.MAX_FILE_BYTES + 10))
        f.write('"}}')
    host.add_task("moby", IDS["a"], 100)
    d = host.docker / "containers" / IDS["a"]
    d.mkdir(parents=True)
    (d / "config.v2.json").write_bytes(b'{"Name": 5}')
    oc = host.storage / "overlay-containers"
    oc.mkdir(parents=True)
    (oc / "containers.json").write_bytes(b"\xff\xfe garbage")
    host.add_proc(600, pidns=4026532006, cgroup=f"/libpod_parent/libpod-{IDS['b']}")
    problems: list[str] = []
    found = host.by_id(problems=problems)
    assert set(found) == {"badjson", "deep", "annlist", "huge", IDS["a"], IDS["b"]}
    assert found["huge"].name == "huge"  # the too-big spec was not read
    text = "\n".join(problems)
    for what in ("badpid/init.pid does not hold a PID", "badjson/config.json is not valid JSON",
                 "deep/config.json is not valid JSON", "annlist/config.json: annotations is not",
                 "huge/config.json is larger than", "config.v2.json has no container name",
                 "containers.json is not valid JSON"):
        assert what in text, (what, problems)
    assert "xxxx" not in text and "oops" not in text  # never a file's contents
    assert all("\n" not in p for p in problems)
    assert len(problems) == len(set(problems))


def test_cgroup_scan_skips_crio_sandbox_and_pause(host):
    sandbox, pause = IDS["a"], IDS["b"]
    host.add_proc(500, cgroup=f"/kubepods.slice/crio-{sandbox}.scope", comm="pause")
    ud = host.storage / "overlay-containers" / sandbox / "userdata"
    ud.mkdir(parents=True)
    (ud / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri-o.ContainerType": "sandbox"}}))
    # No metadata at all, a lone 'pause' process: a sandbox seen only by cgroup.
    host.add_proc(600, cgroup=f"/kubepods/besteffort/pod1/{pause}", comm="pause")
    assert host.discover() == []


def test_scan_cgroups_can_be_disabled(host):
    host.add_proc(500, cgroup=f"/docker/{IDS['a']}")
    assert host.discover(scan_cgroups=False) == []


# ------------------------------------------- processes racing the scan


def test_vanishing_and_unreadable_proc_entries(host, monkeypatch):
    cid = IDS["a"]
    path = f"/docker/{cid}"
    host.add_proc(500, pidns=4026532005, cgroup=path)
    # A PID dir whose files are gone (process exited mid-scan).
    (host.proc / "501").mkdir()
    # 'cgroup' that cannot be read as a file.
    (host.proc / "502").mkdir()
    (host.proc / "502" / "cgroup").mkdir()
    # Not-a-pid junk in /proc.
    (host.proc / "sys").mkdir()
    (host.proc / "uptime").write_text("1 1\n")
    host.add_proc(503, pidns=4026532005, cgroup=path)
    real_open = builtins.open
    real_listdir = os.listdir

    def flaky_open(file, *a, **kw):
        f = str(file)
        if f.endswith("/503/cgroup") or f.endswith("/500/status"):
            raise PermissionError(13, "Permission denied", f)
        return real_open(file, *a, **kw)

    def listdir_with_ghost(p):
        names = real_listdir(p)
        if os.path.abspath(p) == os.path.abspath(host.proc):
            names = names + ["77777"]  # listed, then exited before read
        return names

    monkeypatch.setattr(builtins, "open", flaky_open)
    monkeypatch.setattr(os, "listdir", listdir_with_ghost)
    (c,) = host.discover()
    assert (c.id, c.init_pid) == (cid, 500)


def test_init_pid_exits_between_listing_and_reading(host, monkeypatch):
    host.add_proc(100, pidns=4026532001)
    host.add_task("default", "racy", 100)
    # The process is alive at the state-dir check, then gone: its /proc
    # files disappear before the details are read.
    orig_make = ct._make

    def make_after_exit(proc, host_ns, **kw):
        shutil.rmtree(host.proc / "100")
        return orig_make(proc, host_ns, **kw)

    monkeypatch.setattr(ct, "_make", make_after_exit)
    assert host.discover() == []


def test_unreadable_proc_root(tmp_path):
    assert discover(str(tmp_path / "noproc"), containerd_state_dirs=[str(tmp_path / "nostate")],
                    storage_roots=[]) == []


# ------------------------------------------------------------------ resolve


def _c(cid: str, name: str | None = None, pod: str | None = None) -> Container:
    return Container(id=cid, name=name, runtime="containerd", namespace="default",
                     init_pid=1, pidns=None, cgroup=None, pod=pod)


POOL = [
    _c("3f2a" + "0" * 60, "web"),
    _c("3f9b" + "1" * 60, "db"),
    _c("77aa" + "2" * 60, "nginx", pod="front-0"),
    _c("77ab" + "3" * 60, "nginx", pod="front-1"),
    _c("abc", "short"),
    _c("abcd", "longer"),
]


def test_resolve_prefix_name_and_order():
    got = resolve(POOL, ["3f9", "web", "front-1/nginx"])
    assert [c.name for c in got] == ["db", "web", "nginx"]
    assert got[2].pod == "front-1"


def test_resolve_exact_id_beats_prefix():
    assert [c.id for c in resolve(POOL, ["abc"])] == ["abc"]
    assert [c.id for c in resolve(POOL, ["abcd"])] == ["abcd"]


def test_resolve_dedupes_repeated_selectors():
    got = resolve(POOL, ["3f2a", "web", POOL[0].id])
    assert got == [POOL[0]]


def test_resolve_ambiguous_prefix():
    with pytest.raises(ContainerError) as ei:
        resolve(POOL, ["3f"])
    msg = str(ei.value)
    assert "\n" not in msg and "ambiguous" in msg
    assert "3f2a00000000 (web)" in msg and "3f9b11111111 (db)" in msg


def test_resolve_ambiguous_name():
    with pytest.raises(ContainerError, match="ambiguous.*nginx"):
        resolve(POOL, ["nginx"])


def test_resolve_no_match():
    with pytest.raises(RunqlatError) as ei:  # what the CLI reports as one line
        resolve(POOL, ["zzz"])
    assert isinstance(ei.value, ContainerError)
    msg = str(ei.value)
    assert "\n" not in msg and "no container matches 'zzz'" in msg
    assert "+1 more" in msg  # candidate list is kept brief


def test_resolve_empty_pool_and_empty_selector():
    with pytest.raises(ContainerError, match="no containers running"):
        resolve([], ["x"])
    with pytest.raises(ContainerError, match="empty"):
        resolve(POOL, [""])
    assert resolve(POOL, []) == []


def test_resolve_same_id_twice_in_pool_is_not_ambiguous():
    assert resolve([POOL[0], POOL[0]], ["3f2"]) == [POOL[0]]
