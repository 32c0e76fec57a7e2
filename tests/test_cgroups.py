"""hsmdifd.daemon.cgroups: where the daemon and its children go (decisions, property-tested),
the writes on a fake tree, and the device's memory measured above the leaves."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from hsmdifd.daemon import cgroups, children
from hsmdifd.daemon.cgroups import Found, Layout
from hsmdifd.placement.profile import CgroupMemory, read_cgroup_memory
from tests.conftest import Daemon
from tests.test_profile import make_cgroup

MiB = 1024 * 1024
UNIT = Path("/sys/fs/cgroup/system.slice/hsmdifd.service")

names = st.text(st.characters(categories=["L", "N"], include_characters="-_."), min_size=1)
founds = st.builds(
    Found,
    version=st.sampled_from([0, 1, 2]),
    directory=st.one_of(st.none(), st.lists(names, max_size=4).map(lambda p: Path("/cg", *p))),
    writable=st.booleans(),
    others=st.integers(0, 5),
    controllers=st.lists(st.sampled_from(["cpu", "memory", "io", "pids"]), unique=True).map(tuple),
)


@given(founds, st.integers(-5, 4096))
def test_a_bound_is_applied_only_in_a_writable_cgroup_of_its_own(found: Found, mb: int) -> None:
    decided = cgroups.plan(found, mb)
    alone = found.others == 0
    memory = found.version == 1 or "memory" in found.controllers
    usable = mb > 0 and found.version > 0 and found.directory is not None
    if usable and found.writable and alone and memory:
        assert isinstance(decided, Layout)
        assert decided.daemon_limit_bytes == mb * MiB
        assert decided.version == found.version
        assert found.directory is not None
        assert decided.base in (found.directory, found.directory.parent)
        assert decided.leaf(cgroups.DAEMON).parent == decided.base
    else:
        assert isinstance(decided, str) and decided  # one sentence saying why not


@given(founds)
def test_the_daemons_leaf_is_never_the_base(found: Found) -> None:
    """Started again inside its own leaf, the daemon lays out the cgroup above it, never
    leaves inside its leaf."""
    decided = cgroups.plan(found, 256)
    if isinstance(decided, Layout):
        assert decided.base.name != cgroups.DAEMON or found.directory == decided.base


def test_why_not_names_the_cgroup_and_the_fix() -> None:
    shared = Found(2, UNIT, True, 3, ("memory",))
    assert "3 other process(es)" in str(cgroups.plan(shared, 512))
    locked = Found(2, UNIT, False, 0, ("memory",))
    assert "Delegate=yes" in str(cgroups.plan(locked, 512))
    assert "memory controller" in str(cgroups.plan(Found(2, UNIT, True, 0, ("cpu",)), 512))
    assert "= 0" in str(cgroups.plan(Found(2, UNIT, True, 0, ("memory",)), 0))


@given(st.lists(names, max_size=5), st.booleans())
def test_measuring_skips_only_one_of_our_leaves(parts: list[str], ours: bool) -> None:
    for leaf in [*cgroups.LEAVES, "other"]:
        path = [*parts, leaf]
        got = cgroups.outside_leaves(path, lambda parent: ours)
        if ours and leaf in cgroups.LEAVES:
            assert got == parts
        else:
            assert got == path
    assert cgroups.outside_leaves(parts, lambda parent: ours) == (
        parts[:-1] if parts and parts[-1] in cgroups.LEAVES and ours else parts
    )


def fake_tree(tmp_path: Path, version: int) -> tuple[Path, Path]:
    """A unit's cgroup with this process alone in it: (the proc file, the cgroup root)."""
    line = "0::/svc\n" if version == 2 else "4:memory:/svc\n"
    where = "svc" if version == 2 else "memory/svc"
    files: dict[str, str | bytes] = {f"{where}/cgroup.procs": f"{os.getpid()}\n"}
    if version == 2:
        files |= {
            f"{where}/cgroup.controllers": "cpu memory\n",
            f"{where}/cgroup.subtree_control": "",
        }
    return make_cgroup(tmp_path, line, files), tmp_path / "root"


def test_apply_makes_the_leaves_and_enables_memory_after_leaving(tmp_path: Path) -> None:
    proc, root = fake_tree(tmp_path, 2)
    found = cgroups.find(proc, root)
    assert found == Found(2, root / "svc", True, 0, ("cpu", "memory"))
    layout = cgroups.plan(found, 300)
    assert isinstance(layout, Layout)
    cgroups.apply(layout)
    base = root / "svc"
    assert (base / "daemon" / "cgroup.procs").read_text() == str(os.getpid())
    assert (base / "cgroup.subtree_control").read_text() == "+memory"
    assert (base / "daemon" / "memory.max").read_text() == str(300 * MiB)
    assert (base / "engine").is_dir() and (base / "workers").is_dir()


def test_v1_writes_its_own_limit_file(tmp_path: Path) -> None:
    proc, root = fake_tree(tmp_path, 1)
    layout = cgroups.plan(cgroups.find(proc, root), 200)
    assert isinstance(layout, Layout) and layout.base == root / "memory" / "svc"
    cgroups.apply(layout)
    assert (layout.leaf("daemon") / "memory.limit_in_bytes").read_text() == str(200 * MiB)


def test_the_device_is_measured_above_the_daemons_leaf(tmp_path: Path) -> None:
    """Once the daemon sits in its 256 MiB leaf, the device still has the unit's 1 GiB
    (less what all of it uses), not 256 MiB."""
    unit = "system.slice/hsmdifd.service"
    files: dict[str, str | bytes] = {
        f"{unit}/memory.max": f"{1024 * MiB}\n",
        f"{unit}/memory.current": f"{900 * MiB}\n",
        f"{unit}/daemon/memory.max": f"{256 * MiB}\n",
        f"{unit}/daemon/memory.current": f"{100 * MiB}\n",
        f"{unit}/engine/memory.max": "max\n",
    }
    for where in ("daemon", "engine", "workers"):
        proc = make_cgroup(tmp_path, f"0::/{unit}/{where}\n", files)
        got = read_cgroup_memory(proc, tmp_path / "root")
        assert got == CgroupMemory(limit_bytes=1024 * MiB, usage_bytes=900 * MiB), where


def test_a_cgroup_merely_named_daemon_still_counts(tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {
        "x/daemon/memory.max": f"{256 * MiB}\n",
        "x/daemon/memory.current": "0\n",
    }
    proc = make_cgroup(tmp_path, "0::/x/daemon\n", files)
    assert read_cgroup_memory(proc, tmp_path / "root").limit_bytes == 256 * MiB


def test_children_join_their_leaf_only_when_laid_out(tmp_path: Path) -> None:
    plain = children.command("hsmdifd.engine.child", "--socket", "s")
    assert plain[1:] == ["-m", "hsmdifd.engine.child", "--socket", "s"]
    layout = Layout(2, tmp_path, 256 * MiB)
    cgroups._applied["layout"] = layout
    try:
        engine = children.command("hsmdifd.engine.child", "--socket", "s")
        worker = children.command("hsmdifd.engine.rpc_worker")
    finally:
        cgroups._applied.clear()
    assert engine[0] == "/bin/sh" and engine[3] == str(tmp_path / "engine" / "cgroup.procs")
    assert engine[4:] == plain
    assert worker[3] == str(tmp_path / "workers" / "cgroup.procs")


def test_oom_kills_are_read_from_v2_and_v1_files(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert cgroups.oom_kills(tmp_path) == 2
    (tmp_path / "memory.events").unlink()
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert cgroups.oom_kills(tmp_path) == 5
    assert cgroups.oom_kills(tmp_path / "gone") == 0
    assert cgroups.oom_kills(None) >= 0  # the whole system's count


def test_a_daemon_started_by_hand_says_once_that_it_is_not_bounded(daemon: Daemon) -> None:
    """Run from a shell (its cgroup shared with pytest), the daemon leaves the cgroup as
    it is, says why in one line, and serves as before."""
    r = daemon.ctl("prompt", "hello", "--raw", "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    lines = [line for line in daemon.log().splitlines() if "own memory is not bounded" in line]
    assert len(lines) == 1 and "other process(es)" in lines[0], daemon.log()


def test_a_sigkill_is_the_oom_killers_only_when_the_leaf_counted_one(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    cgroups._applied["layout"] = Layout(1, tmp_path, 256 * MiB)
    try:
        children.command(children.ENGINE_MODULE)  # an engine starts: 3 kills so far
        assert children.sigkill_cause() == " (out of memory?)"
        (engine / "memory.oom_control").write_text("oom_kill 4\n")
        said = children.sigkill_cause()
        assert "OOM killer" in said and "--max-seq-len" in said
        assert children.sigkill_cause() == said  # the same death, asked again
    finally:
        cgroups._applied.clear()
    assert children.sigkill_cause() == " (out of memory?)"  # no leaves: cannot tell
