"""The daemon's own memory bound, on a real daemon in a host with a memory cap.

The host's cgroup stands in for the unit's delegated cgroup: the daemon moves itself
into `daemon/` with its own limit and starts its engine in `engine/`. A load that needs
more memory than the host has is killed by the OOM killer alone; the daemon answers on.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmdifd.daemon.cgroups import directory_of, oom_kills
from tests.conftest import Daemon, child_pids, stop_all, write_config
from tests.netns import Cluster, Host, require_root_netns
from tests.tinymodel import write_tiny_llama

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
CAP_MB = 480
DAEMON_MB = 256
HUNGRY_CONTEXT = 10240  # about 320 MiB of KV cache: within the cap, not beside the rest


@pytest.fixture(scope="module")
def hungry_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model that takes a very long context: its KV cache is what eats memory."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("hungry") / "hungry.gguf",
        n_layer=32,
        n_embd=256,
        n_head=2,
        n_head_kv=2,
        n_ff=512,
        n_ctx_train=HUNGRY_CONTEXT,
    )


def daemon_base(d: Daemon) -> Path:
    """The cgroup the daemon laid out: the parent of the leaf it sits in."""
    assert d.proc is not None
    _, leaf = directory_of(Path(f"/proc/{d.proc.pid}/cgroup"))
    assert leaf is not None and leaf.name == "daemon", leaf
    return leaf.parent


@pytest.fixture
def capped(short_dir: Path, tiny_model: Path) -> Iterator[tuple[Host, Daemon]]:
    """One daemon in a host capped at CAP_MB, which declares the whole cap usable (as a
    device whose figure was set by hand), so that the planner lets a load through that
    the host cannot hold."""
    require_root_netns()
    with Cluster(1, memory_limit_bytes=CAP_MB * MiB) as cluster:
        host = cluster.hosts[0]
        directory = short_dir / "h0"
        directory.mkdir()
        resources = (
            f"memory_reserve_mb = 0\nmemory_override_mb = {CAP_MB}\n"
            f"daemon_memory_max_mb = {DAEMON_MB}"
        )
        config = write_config(directory / "hsmdifd.toml", tiny_model, resources=resources)
        d = Daemon(dir=directory, config=config, host=host)
        try:
            d.start()
            yield host, d
        finally:
            stop_all([d])


def status_within_a_second(d: Daemon) -> dict[str, object]:
    start = time.monotonic()
    r = d.ctl("--json", "status", timeout=10)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 1.0
    status: dict[str, object] = json.loads(r.stdout)
    return status


def answer(d: Daemon) -> str:
    r = d.ctl("prompt", "once upon a time", "--raw", "--max-tokens", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_daemon_has_its_own_leaf_and_the_engine_a_sibling(
    capped: tuple[Host, Daemon],
) -> None:
    host, d = capped
    assert d.proc is not None
    base = daemon_base(d)
    assert base == host.cgroups[0] or base.parent == host.cgroups[0]  # v1, v2
    limit = "memory.max" if (base / "memory.max").exists() else "memory.limit_in_bytes"
    assert int((base / "daemon" / limit).read_text()) == DAEMON_MB * MiB
    assert str(d.proc.pid) in (base / "daemon" / "cgroup.procs").read_text().split()
    assert "bounded at 256 MiB" in d.log()
    answer(d)
    engines = [p for p in child_pids(d.proc.pid) if b"engine.child" in cmdline(p)]
    assert len(engines) == 1
    assert any(line.endswith("/engine") for line in cgroup_lines(engines[0])), cgroup_lines(
        engines[0]
    )
    # The device, as the planner sees it, is the host's cap, not the daemon's leaf.
    r = d.ctl("--json", "devices", timeout=30)
    assert r.returncode == 0, r.stderr
    device = json.loads(r.stdout)[0]
    assert device["memory_total_mb"] == CAP_MB, device


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def cgroup_lines(pid: int) -> list[str]:
    return [line.rpartition(":")[2] for line in Path(f"/proc/{pid}/cgroup").read_text().split()]


NEIGHBOUR_MB = 200
HOG = (
    "import sys; held = b'x' * (int(sys.argv[1]) << 20); print('ready', flush=True); "
    "sys.stdin.read()"
)


@contextlib.contextmanager
def neighbour(host: Host, mb: int) -> Iterator[None]:
    """Another program on the device, holding `mb` MiB (which the declared figure ignores)."""
    proc = host.popen(
        [sys.executable, "-c", HOG, str(mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        yield
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_a_load_the_host_cannot_hold_fails_alone(
    capped: tuple[Host, Daemon], hungry_model: Path
) -> None:
    """The planner, trusting the declared figure, lets through a load that the host,
    with another program holding 200 MiB, cannot hold: the OOM killer ends the engine,
    and only it."""
    host, d = capped
    assert d.proc is not None
    first = answer(d)
    with neighbour(host, NEIGHBOUR_MB):
        r = d.ctl("load", str(hungry_model), "--max-seq-len", str(HUNGRY_CONTEXT), timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "OOM killer" in r.stderr and "ran out of memory" in r.stderr, r.stderr
    assert "--max-seq-len" in r.stderr  # what to do
    assert d.proc.poll() is None, d.log()
    status_within_a_second(d)
    # The model loaded before answers again (kept, or loaded again by the prompt).
    assert answer(d) == first
    assert d.proc.poll() is None
    status_within_a_second(d)
    assert os.path.exists(d.socket)


def test_the_daemon_outgrowing_its_leaf_ends_alone_and_starts_again(
    short_dir: Path, tiny_model: Path
) -> None:
    """With a leaf too small for the speed benchmark (64 MiB), `devices --refresh-speed`
    makes the daemon itself outgrow its limit: the OOM killer ends the daemon, counted
    in its leaf and not in the engine's, while a program beside it keeps its memory;
    started again (as systemd would), it serves."""
    require_root_netns()
    with Cluster(1, memory_limit_bytes=CAP_MB * MiB) as cluster:
        host = cluster.hosts[0]
        directory = short_dir / "h0"
        directory.mkdir()
        config = write_config(directory / "hsmdifd.toml", tiny_model, resources=SMALL_LEAF)
        d = Daemon(dir=directory, config=config, host=host)
        try:
            d.start()  # measures the speed once, before the leaf is made small
            d.stop()
            write_config(config, tiny_model, resources=SMALL_LEAF.replace("256", "40"))
            d.start()
            answer(d)
            base = daemon_base(d)
            with neighbour(host, 50):
                r = d.ctl("devices", "--refresh-speed", timeout=60)
                assert r.returncode != 0
                assert d.proc is not None and d.proc.wait(20) == -9, d.log()
            assert oom_kills(base / "daemon") >= 1
            assert oom_kills(base / "engine") == 0
            d.start()
            answer(d)
        finally:
            stop_all([d])


SMALL_LEAF = "memory_reserve_mb = 0\ndaemon_memory_max_mb = 256"
