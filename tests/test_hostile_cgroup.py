"""--cgroup paths are resolved and must name a directory on a cgroup v2 file
system (issue 12, item 8). `/sys/fs/cgroup/unified/../cpu` on a hybrid host is a
v1 directory whose inode, 1, is also the id of the v2 root: taken as is, it
traced the whole host without a word. No BPF: the CLI refuses before loading.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from runqlat.cgroups import CGROUP2_SUPER_MAGIC, CgroupTree, cgroup2_mount, fs_magic  # noqa: E402
from runqlat.cli import app  # noqa: E402
from runqlat.errors import InputError  # noqa: E402


def mount_or_skip() -> Path:
    m = cgroup2_mount()
    if m is None:
        pytest.skip("no cgroup2 file system mounted")
    return m


def escape_to(mount: Path, target: Path) -> str:
    """A path that starts at the mount and climbs out of it to target."""
    return str(mount) + "/.." * len(mount.parts) + str(target)


def test_fs_magic():
    assert fs_magic(mount_or_skip()) == CGROUP2_SUPER_MAGIC
    assert fs_magic(Path("/proc")) == 0x9FA0  # PROC_SUPER_MAGIC
    assert fs_magic(Path("/nonexistent/x")) is None


def test_a_directory_climbed_to_with_dotdot_is_refused(tmp_path):
    """Before: a non-cgroup directory holding a file named cgroup.procs was taken, by its inode."""
    mount = mount_or_skip()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "cgroup.procs").write_text("1\n")
    path = escape_to(mount, fake)
    with pytest.raises(InputError) as ei:
        CgroupTree(mount).id_of(path)
    assert f"(that is {fake}) is not on a cgroup v2 (cgroup2) file system" in str(ei.value)


def test_a_symlink_into_another_file_system_is_refused(tmp_path):
    mount = mount_or_skip()
    link = tmp_path / "cg"
    link.symlink_to(tmp_path)
    with pytest.raises(InputError, match="not on a cgroup v2"):
        CgroupTree(mount).id_of(escape_to(mount, link))


def test_real_cgroup2_directories_resolve_to_their_inode():
    mount = mount_or_skip()
    tree = CgroupTree(mount)
    assert tree.id_of("/") == os.stat(mount).st_ino
    assert tree.id_of(str(mount) + "/.") == os.stat(mount).st_ino


def test_v1_cpu_directory_next_to_the_unified_mount_is_refused():
    mount = mount_or_skip()
    v1 = mount.parent / "cpu"
    if mount.name != "unified" or not v1.is_dir():
        pytest.skip("not a hybrid cgroup host (no v1 cpu hierarchy beside the unified mount)")
    r = CliRunner().invoke(app, ["run", "--cgroup", f"{mount}/../cpu", "1", "1"])
    assert r.exit_code == 1, r.output
    assert r.output == (f"runqlat-core: error: cgroup {mount}/../cpu (that is {v1}) is not on a cgroup v2 "
                        f"(cgroup2) file system; give a cgroup v2 directory under {mount}\n")


def test_cli_refuses_a_non_cgroup_directory_in_one_line(tmp_path):
    mount = mount_or_skip()
    r = CliRunner().invoke(app, ["run", "--cgroup", escape_to(mount, tmp_path), "1", "1"])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and "is not on a cgroup v2 (cgroup2) file system" in r.output
    assert "Traceback" not in r.output
