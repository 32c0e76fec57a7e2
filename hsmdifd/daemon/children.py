"""Child processes of the daemon: started as plain subprocesses, never forked.

Each child prints `ready` on stdout when it serves, and exits when its stdin
(a pipe from the daemon) closes, so it never outlives a daemon that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import NoReturn

from hsmdifd.daemon import cgroups, timing

ENGINE_MODULE = "hsmdifd.engine.child"


def leaf_of(module: str) -> str:
    """The cgroup leaf a child runs in: the engine apart, the rest (rpc-worker,
    quantizer) together; never the daemon's own."""
    return cgroups.ENGINE if module == ENGINE_MODULE else cgroups.WORKERS


def command(module: str, *args: str) -> list[str]:
    """The argv that runs `python -m module args` in the child's own cgroup leaf, when
    the daemon laid its cgroup out: a shell joins the leaf, then becomes Python, so that
    every byte the child allocates is charged to its leaf (if joining fails, the child
    runs where the daemon does, as it would without the leaves)."""
    argv = [sys.executable, "-m", module, *args]
    leaf = cgroups.leaf_for_children(leaf_of(module))
    if leaf is None:
        return argv
    _oom_seen[module] = cgroups.oom_kills(leaf)
    join = 'echo $$ 2>/dev/null >"$0"; exec "$@"'
    return ["/bin/sh", "-c", join, str(leaf / "cgroup.procs"), *argv]


_oom_seen: dict[str, int] = {}
"""The OOM kills counted in each module's leaf when its last child was started."""


def sigkill_cause(module: str = ENGINE_MODULE) -> str:
    """For a child of `module` ended by SIGKILL: the OOM killer's doing, as far as the
    cgroup leaf tells (its count rose since the last such child started), and what to do.
    Asked twice about one death, it says the same."""
    leaf = cgroups.leaf_for_children(leaf_of(module))
    if leaf is None or cgroups.oom_kills(leaf) <= _oom_seen.get(module, 0):
        return " (out of memory?)"
    return (
        ": the kernel's OOM killer ended it, this device ran out of memory; load a "
        "smaller model or a shorter --max-seq-len, or give the device more memory"
    )


async def start_child(module: str, *args: str) -> asyncio.subprocess.Process | None:
    """Run `python -m module args`; the process once it said `ready`, else None (ended)."""
    proc = await asyncio.create_subprocess_exec(
        *command(module, *args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timing.ENGINE_START_TIMEOUT)
    except TimeoutError:
        line = b""
    if line.strip() == b"ready":
        return proc
    await stop_child(proc)
    return None


async def stop_child(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after CHILD_STOP_TIMEOUT; reaped either way."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timing.CHILD_STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


OOM_SCORE_ADJ = 1000
"""What a child tells the kernel's OOM killer: take me first. Children hold the model;
the daemon holds the cluster and reports a child's death, then loads again."""


def first_to_go_when_memory_runs_out() -> None:
    """In a child: be the one the OOM killer ends, not the daemon (raising one's own
    score needs no privilege)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:  # not Linux, or /proc is not there
        pass


def exit_when_parent_goes() -> NoReturn:
    """In a child: block until stdin (the pipe from the daemon) closes, then exit."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)
