"""The daemon's own memory bound: the daemon in one leaf cgroup, its children in others.

Under systemd (`Delegate=yes`), the unit's cgroup is the daemon's to arrange. At start
the daemon moves itself into a leaf, `daemon/`, with its own memory limit, and every
child it starts joins a sibling leaf (`engine/` for the engine child, `workers/` for
the rpc-worker and the quantizer). The unit's limit (or the device's memory) stays
shared by them all, so a model still gets the device's memory, while a request that
made the daemon itself allocate without bound ends at its own leaf's limit: an OOM
there kills only the daemon (systemd restarts it), and a child killed by the OOM killer
(it asks to go first) leaves the daemon running.

cgroup v2 lets no process sit in a cgroup whose children have controllers, so the
daemon leaves the unit's cgroup before it enables the memory controller for the
leaves. cgroup v1's memory hierarchy has no such rule and no controllers to enable.

Where no cgroup is the daemon's own (run by hand from a shell, in a container, a
unit without `Delegate=`), nothing is changed and one log line says why.
`plan()` decides from what was read; `apply()` does the writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

DAEMON, ENGINE, WORKERS = "daemon", "engine", "workers"
LEAVES = (DAEMON, ENGINE, WORKERS)
MIB = 1024 * 1024
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Found:
    """What this process's memory cgroup looks like, as read at start."""

    version: int  # 2 (unified), 1 (a v1 memory hierarchy), 0 (none found)
    directory: Path | None  # this process's memory cgroup
    writable: bool  # can this user create cgroups in it and move processes into it
    others: int  # processes in it other than this one
    controllers: tuple[str, ...] = ()  # v2: cgroup.controllers of `directory`


@dataclass(frozen=True)
class Layout:
    """Where the daemon and its children go."""

    version: int
    base: Path  # the delegated cgroup: the parent of the leaves, the device's share
    daemon_limit_bytes: int

    def leaf(self, name: str) -> Path:
        return self.base / name

    @property
    def limit_file(self) -> str:
        return limit_file(self.version)


def limit_file(version: int) -> str:
    return "memory.max" if version == 2 else "memory.limit_in_bytes"


def plan(found: Found, limit_mb: int) -> Layout | str:
    """Where to put the daemon, or the sentence that says why its bound is not applied."""
    where = found.directory
    if limit_mb <= 0:
        return "turned off (resources.daemon_memory_max_mb = 0)"
    if found.version == 0 or where is None:
        return "this system has no memory cgroup to use"
    if where.name == DAEMON and found.others == 0:
        where = where.parent  # already in our leaf: a daemon started again in its place
    if not found.writable:
        return (
            f"its cgroup {where} is not writable by this user "
            "(the unit gives the daemon its cgroup with Delegate=yes)"
        )
    if found.others:
        return (
            f"its cgroup {where} holds {found.others} other process(es): started by hand, "
            "the daemon leaves that cgroup as it is"
        )
    if found.version == 2 and "memory" not in found.controllers:
        return f"the memory controller is not available in {where} (Delegate=yes gives it)"
    return Layout(found.version, where, limit_mb * MIB)


def outside_leaves(parts: Sequence[str], is_ours: Callable[[Sequence[str]], bool]) -> list[str]:
    """The cgroup path `parts` without a last component that is one of our leaves.

    The device's memory for models is the share of the cgroup above the leaves: the
    daemon's own small limit is not what a model can use. `is_ours(parent)` tells
    whether `parent` is a cgroup laid out by this module (it has a `daemon/` and an
    `engine/` leaf), so that a cgroup that merely shares a leaf's name is left alone.
    """
    if parts and parts[-1] in LEAVES and is_ours(parts[:-1]):
        return list(parts[:-1])
    return list(parts)


def laid_out(directory: Path) -> bool:
    """Whether `directory` holds the leaves this module makes."""
    return (directory / DAEMON).is_dir() and (directory / ENGINE).is_dir()


def _memory_cgroup(text: str) -> tuple[int, str]:
    """The memory hierarchy's version and this process's path in it, from /proc/PID/cgroup."""
    unified = ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            return 1, path
        if hierarchy == "0" and controllers == "":
            unified = path
    return (2, unified) if unified else (0, "")


def directory_of(proc_cgroup: Path, root: Path = CGROUP_ROOT) -> tuple[int, Path | None]:
    """The memory hierarchy's version and the cgroup directory named in `proc_cgroup`
    (a /proc/PID/cgroup file); (0, None) when there is none we can see."""
    try:
        version, path = _memory_cgroup(proc_cgroup.read_text())
    except OSError:
        version, path = 0, ""
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    if version == 0 or ".." in parts:  # none, or outside our cgroup namespace
        return 0, None
    directory = (root / "memory" if version == 1 else root).joinpath(*parts)
    if version == 2 and not (directory / "cgroup.controllers").exists():
        directory = (root / "unified").joinpath(*parts)  # a hybrid system: v2 mounted aside
    return version, directory


def find(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> Found:
    """Read this process's memory cgroup (nothing here raises on an odd system)."""
    version, directory = directory_of(proc_cgroup, root)
    if directory is None:
        return Found(0, None, False, 0)
    base = directory.parent if directory.name == DAEMON else directory
    writable = os.access(base, os.W_OK) and os.access(base / "cgroup.procs", os.W_OK)
    try:
        pids = {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return Found(version, directory, False, 0)
    controllers: tuple[str, ...] = ()
    if version == 2:
        with contextlib.suppress(OSError):
            controllers = tuple((directory / "cgroup.controllers").read_text().split())
    return Found(version, directory, writable, len(pids - {os.getpid()}), controllers)


def apply(layout: Layout) -> None:
    """Make the leaves, move this process into `daemon/`, and set its limit (OSError when
    the cgroup refuses; this process may then already sit in its leaf, unbounded)."""
    for name in LEAVES:
        layout.leaf(name).mkdir(exist_ok=True)
    (layout.leaf(DAEMON) / "cgroup.procs").write_text(str(os.getpid()))
    if layout.version == 2:
        control = layout.base / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
    (layout.leaf(DAEMON) / layout.limit_file).write_text(str(layout.daemon_limit_bytes))


_applied: dict[str, Layout] = {}
"""The layout in use ("layout"), once the daemon applied one."""


def bound_daemon(limit_mb: int) -> Layout | None:
    """At start: put the daemon in its own leaf with its own limit, or say why not."""
    decided = plan(find(), limit_mb)
    if isinstance(decided, str):
        log.info("the daemon's own memory is not bounded: %s", decided)
        return None
    try:
        apply(decided)
    except OSError as e:
        log.warning("the daemon's own memory is not bounded: %s: %s", decided.base, e)
        return None
    _applied["layout"] = decided
    log.info(
        "the daemon's own memory is bounded at %d MiB in %s; its children go beside it",
        decided.daemon_limit_bytes // MIB,
        decided.leaf(DAEMON),
    )
    return decided


def leaf_for_children(name: str) -> Path | None:
    """The leaf a child joins, when the daemon laid its cgroup out."""
    layout = _applied.get("layout")
    return None if layout is None else layout.leaf(name)


def oom_kills(leaf: Path | None) -> int:
    """Processes the OOM killer ended in `leaf` (or on the whole system, when None)."""
    if leaf is None:
        files, key = [Path("/proc/vmstat")], "oom_kill"
    else:
        files, key = [leaf / "memory.events", leaf / "memory.oom_control"], "oom_kill"
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    return 0
