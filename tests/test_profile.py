"""Tests for hsmdifd.placement.profile: cgroup memory (v1 and v2 trees built in tmp_path),
memory figures, the speed benchmark and its cache, and CPU load."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from hsmdifd.daemon.config import Config, ResourcesConfig, StateConfig
from hsmdifd.daemon.node import Identity
from hsmdifd.placement import profile, rpc_protocol
from hsmdifd.placement.profile import CgroupMemory, cached_speed, memory_figures, read_cgroup_memory

MiB = 1024 * 1024
GiB = 1024 * MiB
V1_UNLIMITED = "9223372036854771712"


def make_cgroup(tmp_path: Path, proc: str | bytes, files: dict[str, str | bytes]) -> Path:
    """Write a fake /proc/self/cgroup and files under tmp_path/root; return the proc path."""
    proc_file = tmp_path / "cgroup"
    if isinstance(proc, bytes):
        proc_file.write_bytes(proc)
    else:
        proc_file.write_text(proc)
    for name, content in files.items():
        path = tmp_path / "root" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return proc_file


def read(tmp_path: Path, proc: str | bytes, files: dict[str, str | bytes]) -> CgroupMemory:
    return read_cgroup_memory(make_cgroup(tmp_path, proc, files), tmp_path / "root")


def fake_memory(monkeypatch: pytest.MonkeyPatch, total: int, available: int) -> None:
    memory = SimpleNamespace(total=total, available=available)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)


def test_v2_limit_and_usage(tmp_path: Path) -> None:
    got = read(
        tmp_path,
        "0::/system.slice/hsmdifd.service\n",
        {
            "system.slice/hsmdifd.service/memory.max": f"{512 * MiB}\n",
            "system.slice/hsmdifd.service/memory.current": f"{100 * MiB}\n",
        },
    )
    assert got == CgroupMemory(limit_bytes=512 * MiB, usage_bytes=100 * MiB)


def test_v2_max_is_no_limit(tmp_path: Path) -> None:
    got = read(tmp_path, "0::/a\n", {"a/memory.max": "max\n", "a/memory.current": "4096\n"})
    assert got == CgroupMemory(limit_bytes=None, usage_bytes=4096)


def test_v2_smaller_limit_on_a_parent_wins_with_the_parents_usage(tmp_path: Path) -> None:
    got = read(
        tmp_path,
        "0::/outer/middle/leaf\n",
        {
            "outer/memory.max": f"{2 * GiB}\n",
            "outer/memory.current": f"{300 * MiB}\n",
            "outer/middle/memory.max": f"{256 * MiB}\n",
            "outer/middle/memory.current": f"{200 * MiB}\n",
            "outer/middle/leaf/memory.max": "max\n",
            "outer/middle/leaf/memory.current": f"{50 * MiB}\n",
        },
    )
    assert got == CgroupMemory(limit_bytes=256 * MiB, usage_bytes=200 * MiB)


def test_inactive_file_cache_does_not_count_as_used(tmp_path: Path) -> None:
    got = read(
        tmp_path,
        "0::/a\n",
        {
            "a/memory.max": f"{GiB}\n",
            "a/memory.current": f"{500 * MiB}\n",
            "a/memory.stat": f"anon {100 * MiB}\nactive_file 0\ninactive_file {400 * MiB}\n",
        },
    )
    assert got == CgroupMemory(limit_bytes=GiB, usage_bytes=100 * MiB)


def test_active_file_cache_counts_as_reclaimable_but_mapped_and_dirty_do_not(
    tmp_path: Path,
) -> None:
    """A model file read by an engine that has ended stays on the active list: it is
    still reclaimable, so an unload does not make the device look smaller."""
    stat = (
        f"anon {100 * MiB}\nfile {420 * MiB}\nactive_file {300 * MiB}\n"
        f"inactive_file {100 * MiB}\nfile_mapped {50 * MiB}\nfile_dirty {8 * MiB}\n"
        f"file_writeback {2 * MiB}\nshmem {20 * MiB}\n"
    )
    got = read(
        tmp_path,
        "0::/a\n",
        {"a/memory.max": f"{GiB}\n", "a/memory.current": f"{520 * MiB}\n", "a/memory.stat": stat},
    )
    # 400 MiB of cache, less 60 MiB mapped, dirty or being written back.
    assert got == CgroupMemory(limit_bytes=GiB, usage_bytes=180 * MiB)


def test_an_unload_leaves_the_device_as_big_as_before_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the load: 150 MiB of the model file cached (read by `plan`). Loaded: the
    same pages mapped by the engine. Unloaded: unmapped but still on the active list."""
    fake_memory(monkeypatch, total=8 * GiB, available=6 * GiB)

    def usable(current: int, stat: str) -> int:
        files: dict[str, str | bytes] = {
            "a/memory.max": f"{GiB}",
            "a/memory.current": f"{current}",
            "a/memory.stat": stat,
        }
        cg = read(tmp_path, "0::/a\n", files)
        return memory_figures(cgroup=cg).usable_bytes

    before = usable(160 * MiB, f"anon {10 * MiB}\ninactive_file {150 * MiB}\n")
    loaded = usable(
        200 * MiB,
        f"anon {50 * MiB}\nactive_file {150 * MiB}\nfile_mapped {150 * MiB}\n",
    )
    after = usable(160 * MiB, f"anon {10 * MiB}\nactive_file {150 * MiB}\n")
    assert loaded == before - 190 * MiB
    assert after == before


def test_v1_counts_both_file_lists_less_mapped(tmp_path: Path) -> None:
    got = read(
        tmp_path,
        V1_PROC,
        {
            "memory/docker/abc/memory.limit_in_bytes": f"{768 * MiB}\n",
            "memory/docker/abc/memory.usage_in_bytes": f"{400 * MiB}\n",
            "memory/docker/abc/memory.stat": (
                f"cache {1 * MiB}\nactive_file {1 * MiB}\ntotal_active_file {200 * MiB}\n"
                f"total_inactive_file {100 * MiB}\ntotal_mapped_file {40 * MiB}\n"
                f"total_dirty {10 * MiB}\ntotal_writeback 0\n"
            ),
        },
    )
    assert got == CgroupMemory(limit_bytes=768 * MiB, usage_bytes=150 * MiB)


V1_PROC = "9:name=systemd:/\n4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n"


def test_v1_limit(tmp_path: Path) -> None:
    got = read(
        tmp_path,
        V1_PROC,
        {
            "memory/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/docker/abc/memory.limit_in_bytes": f"{768 * MiB}\n",
            "memory/docker/abc/memory.usage_in_bytes": f"{68 * MiB}\n",
            # In a hybrid layout the unified tree has no memory controller; ignore it.
            "memory.max": f"{64 * MiB}\n",
        },
    )
    assert got == CgroupMemory(limit_bytes=768 * MiB, usage_bytes=68 * MiB)


@pytest.mark.parametrize("physical", [8 * GiB, 2**63])
def test_v1_unlimited_sentinel_is_no_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, physical: int
) -> None:
    fake_memory(monkeypatch, total=physical, available=GiB)  # even if psutil misreports
    got = read(
        tmp_path,
        V1_PROC,
        {
            "memory/docker/abc/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
            "memory/docker/abc/memory.usage_in_bytes": "1000\n",
        },
    )
    assert got == CgroupMemory(limit_bytes=None, usage_bytes=1000)


def test_limit_above_physical_memory_is_no_limit(tmp_path: Path) -> None:
    physical = psutil.virtual_memory().total
    got = read(tmp_path, "0::/a\n", {"a/memory.max": str(physical + GiB)})
    assert got.limit_bytes is None


@pytest.mark.parametrize(
    "proc",
    ["", "3:cpu,cpuacct:/\n2:pids:/\n1:name=systemd:/\n", "not a cgroup file\n", b"\xff\xfe\x00"],
)
def test_no_memory_controller_means_no_limit(tmp_path: Path, proc: str | bytes) -> None:
    got = read(tmp_path, proc, {"memory.limit_in_bytes": f"{MiB}", "memory/memory.max": f"{MiB}"})
    assert got == CgroupMemory(limit_bytes=None, usage_bytes=None)


def test_missing_proc_file_and_root_mean_no_limit(tmp_path: Path) -> None:
    got = read_cgroup_memory(tmp_path / "absent", tmp_path / "absent-root")
    assert got == CgroupMemory(limit_bytes=None, usage_bytes=None)
    got = read_cgroup_memory(make_cgroup(tmp_path, "0::/a/b\n", {}), tmp_path / "absent-root")
    assert got == CgroupMemory(limit_bytes=None, usage_bytes=None)


@pytest.mark.parametrize("garbage", ["lots\n", "", "-5\n", "12 MB\n", b"\xff\x00\x80"])
def test_garbage_in_the_files_means_no_limit(tmp_path: Path, garbage: str | bytes) -> None:
    got = read(
        tmp_path,
        "0::/a\n",
        {"a/memory.max": garbage, "a/memory.current": garbage, "a/memory.stat": garbage},
    )
    assert got == CgroupMemory(limit_bytes=None, usage_bytes=None)


def test_a_directory_where_a_file_should_be_means_no_limit(tmp_path: Path) -> None:
    proc = make_cgroup(tmp_path, "0::/a\n", {"a/memory.max/oops": "1"})
    assert read_cgroup_memory(proc, tmp_path / "root").limit_bytes is None


def test_cgroup_limit_caps_total_and_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, total=8 * GiB, available=6 * GiB)
    got = memory_figures(cgroup=CgroupMemory(limit_bytes=GiB, usage_bytes=300 * MiB))
    assert got == profile.MemoryFigures(
        total_bytes=GiB, usable_bytes=GiB - 300 * MiB, limit_bytes=GiB, declared=False
    )
    # Without a cgroup limit, the machine's own figures apply.
    got = memory_figures(cgroup=CgroupMemory(limit_bytes=None, usage_bytes=None))
    assert (got.total_bytes, got.usable_bytes, got.limit_bytes) == (8 * GiB, 6 * GiB, 0)
    # When the machine has less available than the cgroup leaves, the machine wins.
    got = memory_figures(cgroup=CgroupMemory(limit_bytes=7 * GiB, usage_bytes=0))
    assert (got.total_bytes, got.usable_bytes) == (7 * GiB, 6 * GiB)


def test_reserve_lowers_usable_by_exactly_the_reserve_but_not_below_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_memory(monkeypatch, total=4 * GiB, available=3 * GiB)
    no_limit = CgroupMemory(limit_bytes=None, usage_bytes=None)
    assert memory_figures(512 * MiB, cgroup=no_limit).usable_bytes == 3 * GiB - 512 * MiB
    assert memory_figures(5 * GiB, cgroup=no_limit).usable_bytes == 0
    # Usage above the limit (it happens briefly) also stops at zero.
    over = CgroupMemory(limit_bytes=GiB, usage_bytes=GiB + MiB)
    assert memory_figures(0, cgroup=over).usable_bytes == 0


def test_reserve_on_this_machine() -> None:
    cgroup = CgroupMemory(limit_bytes=256 * MiB, usage_bytes=56 * MiB)
    before = memory_figures(0, cgroup=cgroup)
    after = memory_figures(64 * MiB, cgroup=cgroup)
    assert before.usable_bytes == 200 * MiB
    assert after.usable_bytes == 136 * MiB


def test_override_is_declared_and_replaces_the_measurement() -> None:
    got = memory_figures(reserve_bytes=GiB, override_bytes=100 * MiB)
    assert got.declared
    assert got.usable_bytes == 100 * MiB
    assert not memory_figures(reserve_bytes=GiB).declared


def test_override_is_capped_at_the_total(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, total=2 * GiB, available=GiB)
    got = memory_figures(override_bytes=64 * GiB, cgroup=CgroupMemory(None, None))
    assert (got.usable_bytes, got.total_bytes, got.declared) == (2 * GiB, 2 * GiB, True)


def test_usable_is_never_above_total_on_this_machine() -> None:
    for cgroup in (None, CgroupMemory(None, None), CgroupMemory(64 * MiB, 0)):
        got = memory_figures(cgroup=cgroup)
        assert 0 <= got.usable_bytes <= got.total_bytes
        assert got.total_bytes <= psutil.virtual_memory().total


def test_fingerprint_is_stable_and_changes_with_the_cpu_quota(tmp_path: Path) -> None:
    proc = make_cgroup(tmp_path, "0::/a\n", {"a/cpu.max": "max 100000\n"})
    root = tmp_path / "root"
    first = profile.hardware_fingerprint(proc, root)
    assert first == profile.hardware_fingerprint(proc, root)
    (root / "a/cpu.max").write_text("50000 100000\n")
    assert profile.hardware_fingerprint(proc, root) != first


def test_fingerprint_changes_with_a_v1_cfs_quota(tmp_path: Path) -> None:
    proc = make_cgroup(tmp_path, V1_PROC, {"cpu/docker/abc/cpu.cfs_quota_us": "-1\n"})
    root = tmp_path / "root"
    first = profile.hardware_fingerprint(proc, root)
    (root / "cpu/docker/abc/cpu.cfs_quota_us").write_text("100000\n")
    assert profile.hardware_fingerprint(proc, root) != first


class CountingMeasure:
    def __init__(self, *speeds: float) -> None:
        self.speeds = list(speeds)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.speeds.pop(0)


def test_cached_speed_writes_the_file_and_does_not_measure_again(tmp_path: Path) -> None:
    state = tmp_path / "state" / "hsmdif"
    measure = CountingMeasure(12.5)
    assert cached_speed(state, measure=measure) == 12.5
    record = json.loads((state / "speed.json").read_text())
    assert record["fingerprint"] == profile.hardware_fingerprint()
    assert record["speed"] == 12.5
    assert datetime.fromisoformat(record["measured_at"]).tzinfo is not None
    assert sorted(p.name for p in state.iterdir()) == ["speed.json"]  # no temp file left

    assert cached_speed(state, measure=measure) == 12.5
    assert measure.calls == 1


def test_refresh_measures_again_and_stores_the_new_figure(tmp_path: Path) -> None:
    measure = CountingMeasure(10.0, 20.0)
    cached_speed(tmp_path, measure=measure)
    assert cached_speed(tmp_path, refresh=True, measure=measure) == 20.0
    assert measure.calls == 2
    assert cached_speed(tmp_path, measure=measure) == 20.0
    assert measure.calls == 2


def test_a_different_fingerprint_measures_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure = CountingMeasure(10.0, 20.0, 30.0)
    cached_speed(tmp_path, measure=measure)
    # A file written on other hardware (the state directory was copied).
    record = json.loads((tmp_path / "speed.json").read_text())
    (tmp_path / "speed.json").write_text(json.dumps({**record, "fingerprint": "0123456789abcdef"}))
    assert cached_speed(tmp_path, measure=measure) == 20.0
    # This hardware changed (e.g. a new CPU quota).
    monkeypatch.setattr(profile, "hardware_fingerprint", lambda: "fedcba9876543210")
    assert cached_speed(tmp_path, measure=measure) == 30.0
    assert measure.calls == 3
    assert json.loads((tmp_path / "speed.json").read_text())["fingerprint"] == "fedcba9876543210"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"speed": 5.0}',
        b'{"fingerprint": "FP", "speed": "fast"}',
        b'{"fingerprint": "FP", "speed": -1}',
        b'{"fingerprint": "FP", "speed": NaN}',
        b'{"fingerprint": "FP", "speed": null}',
    ],
)
def test_a_corrupt_cache_measures_again(tmp_path: Path, content: bytes) -> None:
    fingerprint = profile.hardware_fingerprint().encode()
    (tmp_path / "speed.json").write_bytes(content.replace(b"FP", fingerprint))
    measure = CountingMeasure(7.0)
    assert cached_speed(tmp_path, measure=measure) == 7.0
    assert measure.calls == 1
    assert json.loads((tmp_path / "speed.json").read_text())["speed"] == 7.0


@pytest.mark.parametrize("threads", [1, 2])
def test_measure_speed_is_a_positive_finite_figure(threads: int) -> None:
    start = time.perf_counter()
    speed = profile.measure_speed(threads=threads, seconds=0.1)
    assert math.isfinite(speed)
    assert speed > 0
    assert time.perf_counter() - start < 5


def test_cpu_load_sees_a_busy_core() -> None:
    profile.cpu_load()
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        pass
    load = profile.cpu_load()
    assert 0.1 < load <= 1.0


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        ("0::/a\n", {"a/cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs keep two threads busy
        ("0::/a\n", {"a/cpu.max": "max 100000\n"}, None),
        ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000"}, 1),
        (
            "4:cpu,cpuacct:/docker/x\n",
            {"cpu/docker/x/cpu.cfs_quota_us": "50000", "cpu/docker/x/cpu.cfs_period_us": "100000"},
            1,
        ),
        (
            "4:cpu,cpuacct:/docker/x\n",
            {"cpu/docker/x/cpu.cfs_quota_us": "-1\n", "cpu/docker/x/cpu.cfs_period_us": "100000"},
            None,
        ),
        ("0::/a\n", {"a/cpu.max": "garbage"}, None),
    ],
)
def test_usable_cpus_is_capped_by_the_cgroup_quota(
    tmp_path: Path, proc: str, files: dict[str, str | bytes], expected: int | None
) -> None:
    cpus = len(os.sched_getaffinity(0))
    got = profile.usable_cpus(make_cgroup(tmp_path, proc, files), tmp_path / "root")
    assert got == (cpus if expected is None else min(cpus, expected))


def test_a_device_reports_the_figures_it_declares(tmp_path: Path) -> None:
    config = Config(
        state=StateConfig(dir=str(tmp_path)),
        resources=ResourcesConfig(threads=3, memory_override_mb=64, speed_override=2.5),
    )
    me = Identity(node_id="node-1", name="kitchen", address="192.0.2.7:9999")
    before = time.time()

    device = profile.device_profile(config, me)

    assert (device.id, device.name, device.address) == ("node-1", "kitchen", "192.0.2.7:9999")
    assert device.memory_usable_bytes == 64 * MiB
    assert device.memory_declared and device.declared
    assert device.memory_total_bytes == memory_figures().total_bytes
    assert (device.speed, device.threads) == (2.5, 3)
    assert (device.role, device.state) == ("root", "alive")
    assert device.rpc_protocol == rpc_protocol.protocol()
    assert before <= device.measured_at <= time.time()
    assert not (tmp_path / "speed.json").exists()  # a declared speed is not measured


def test_a_device_that_declares_nothing_reports_what_it_measured(tmp_path: Path) -> None:
    (tmp_path / "speed.json").write_text(
        json.dumps({"fingerprint": profile.hardware_fingerprint(), "speed": 7.5})
    )
    config = Config(state=StateConfig(dir=str(tmp_path)))

    device = profile.device_profile(config, Identity("node-2", "attic", "192.0.2.8:9999"))

    assert device.speed == 7.5
    assert not device.declared and not device.memory_declared
    assert 0 < device.memory_usable_bytes <= device.memory_total_bytes
