"""Cluster pieces without a network: announcements, devices files, membership states."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path

import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster.clocks import StallFreeClock
from hsmdifd.cluster.devices_file import load_devices_file
from hsmdifd.cluster.discovery import TXT_LIMIT, encode_txt, parse_hint
from hsmdifd.cluster.election import MemberState
from hsmdifd.cluster.membership import Membership
from hsmdifd.cluster.peer_channel import PROTOCOL_VERSION
from hsmdifd.cluster.peer_records import LiveChanged
from hsmdifd.cluster.root_leases import Held
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.config import Config, ConfigError, with_overrides
from hsmdifd.daemon.node import Identity
from hsmdifd.placement import rpc_protocol
from tests.conftest import run_ctl

NODE = "6f1c7d3e-0b7a-4a47-9a0e-1d2c3b4a5f60"
GIB = 1024**3


def test_txt_record_round_trips_under_200_bytes() -> None:
    txt = encode_txt(
        node_id=NODE, protocol_version=1, port=9999, memory_mb=123456, speed=17.5, policy=42
    )
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) < TXT_LIMIT
    hint = parse_hint({k.encode(): v.encode() for k, v in txt.items()}, "10.0.0.5", 9999)
    assert hint is not None
    assert (hint.node_id, hint.address, hint.memory_mb, hint.policy_version) == (
        NODE,
        "10.0.0.5:9999",
        123456,
        42,
    )


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {b"id": b""},
        {b"id": NODE.encode(), b"pv": b"one"},
        {b"id": NODE.encode(), b"pv": b"1", b"port": b"99999"},
        {b"id": NODE.encode(), b"pv": b"1", b"mem": b"lots"},
        {b"id": b"\xff\xfe", b"pv": b"1"},
        {b"id": None, b"pv": b"1"},
    ],
)
def test_malformed_announcements_are_ignored(properties: dict[bytes, bytes | None]) -> None:
    assert parse_hint(properties, "10.0.0.5", 9999) is None


def test_devices_file(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    path.write_text(
        json.dumps(
            [
                {
                    "address": "10.0.0.1",
                    "port": 9999,
                    "total_memory": 8192,
                    "memfree": 6000,
                    "speed": 5.0,
                    "load": 0.1,
                },
                {"address": "10.0.0.2"},
            ]
        )
    )
    devices = load_devices_file(path)
    first = devices["10.0.0.1:9999"]
    assert first.memory_total_bytes == 8192 * 1024 * 1024 and first.speed == 5.0
    assert first.declared
    assert "10.0.0.2:9999" in devices


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "must hold a list"),
        ("[{}]", "device 1: needs an 'address'"),
        ('[{"address": "a", "port": 0}]', "'port' must be a port number"),
        ('[{"address": "a", "speed": "fast"}]', "'speed' must be a number"),
        ('[{"address": "a", "colour": 1}]', "unknown keys colour"),
        ("[", "not a readable devices.json"),
    ],
)
def test_bad_devices_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "devices.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_devices_file(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def status(node_id: str, address: str, protocol: int = PROTOCOL_VERSION) -> pb.PeerStatus:
    return pb.PeerStatus(
        protocol_version=protocol,
        device=pb.DeviceProfile(id=node_id, name=node_id[:4], address=address),
        started_at=1.0,
    )


def test_membership_states() -> None:
    async def scenario() -> None:
        changes: list[int] = []
        # Loopback addresses only: observing a peer starts heartbeats to it.
        me = status(NODE, "127.0.0.1:9")
        m = Membership(
            node_id=NODE,
            secret=b"s" * 32,
            local_status=lambda: me,
            on_event=lambda event: changes.append(1) if isinstance(event, LiveChanged) else None,
            heartbeat_interval=0.05,
            dead_after=0.2,
        )
        try:
            m.observe(status("peer-a", "127.0.0.2:9"))
            m.observe(status("peer-b", "127.0.0.3:9", protocol=PROTOCOL_VERSION + 1))
            states = {x.node_id: x.state for x in m.members()}
            assert states == {"peer-a": MemberState.ALIVE}
            (record,) = [r for r in m.records() if r.address == "127.0.0.3:9"]
            assert m.state_of(record, 0) is MemberState.INCOMPATIBLE
            assert m.generation == 1 and changes
            # No more heartbeats: suspect, then dead.
            await asyncio.sleep(0.15)
            assert {x.state for x in m.members()} == {MemberState.SUSPECT}
            await asyncio.sleep(0.15)
            m.refresh()
            assert {x.state for x in m.members()} == {MemberState.DEAD}
            assert m.generation == 2
            # A goodbye from a device that does not answer at once is final.
            m.observe(status("peer-a", "127.0.0.2:9"))
            m.goodbye("peer-a", "127.0.0.2:9")
            for _ in range(100):
                if {x.state for x in m.members()} == {MemberState.DEAD}:
                    break
                await asyncio.sleep(0.01)
            assert {x.state for x in m.members()} == {MemberState.DEAD}
        finally:
            await m.close()

    asyncio.run(scenario())


def test_cluster_init_writes_a_private_secret(tmp_path: Path) -> None:
    out = tmp_path / "cluster.secret"
    r = run_ctl("cluster", "init", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(bytes.fromhex(out.read_text().strip())) == 32
    assert "Copy the same file to every device" in r.stdout
    again = run_ctl("cluster", "init", "--out", str(out))
    assert again.returncode == 1 and str(out) in again.stderr


def test_the_membership_clock_does_not_count_this_devices_own_stalls() -> None:
    real = [100.0]
    clock = StallFreeClock(max_step=0.75, source=lambda: real[0])
    start = clock()
    for _ in range(10):  # read often: it keeps time
        real[0] += 0.25
        clock()
    assert clock() - start == pytest.approx(2.5)
    before = clock()
    real[0] += 30.0  # this device stood still for 30 s
    assert clock() - before == pytest.approx(0.75)
    real[0] -= 5.0  # never backwards
    assert clock() - before == pytest.approx(0.75)


def test_the_rpc_protocol_comes_from_the_installed_header() -> None:
    header = "#define RPC_PROTO_MAJOR_VERSION    7\n#define RPC_PROTO_MINOR_VERSION 0\n"
    assert rpc_protocol.parse_header(header) is None  # no patch level: not a version
    assert rpc_protocol.parse_header(header + "#define RPC_PROTO_PATCH_VERSION 2\n") == "7.0.2"
    assert rpc_protocol.protocol().startswith(("rpc ", "llama-cpp-python "))
    assert rpc_protocol.refusal("rpc 7.0.0", "rpc 7.0.0") is None
    assert "rpc 6.1.0, the root rpc 7.0.0" in (rpc_protocol.refusal("rpc 7.0.0", "rpc 6.1.0") or "")
    assert "did not say" in (rpc_protocol.refusal("rpc 7.0.0", "") or "")


def test_a_device_with_another_rpc_protocol_is_not_planned_onto(tmp_path: Path) -> None:
    """It stays a member (it may be root), but holds no layers; devices says why."""

    async def scenario() -> None:
        config = with_overrides(Config(), state_dir=str(tmp_path), network_mdns=False)
        me = Identity(NODE, "me", "127.0.0.1:9")
        cluster = Cluster(config, me, b"s" * 32, busy=lambda: False, model=pb.ModelInfo)
        cluster.set_device(
            pb.DeviceProfile(
                id=NODE,
                name="me",
                address=me.address,
                memory_total_bytes=GIB,
                memory_usable_bytes=GIB,
                speed=1.0,
                rpc_protocol="rpc 7.0.0",
            )
        )
        await cluster.start()
        try:
            for node_id, address, protocol in (
                ("peer-same", "127.0.0.2:9", "rpc 7.0.0"),
                ("peer-other", "127.0.0.3:9", "rpc 6.1.0"),
            ):
                peer = status(node_id, address)
                peer.device.memory_total_bytes = peer.device.memory_usable_bytes = GIB
                peer.device.rpc_protocol = protocol
                cluster.observe(peer)
            planned = {d.node_id for d in cluster.capacities()}
            assert planned == {NODE, "peer-same"}
            problems = {d.id: d.problem for d in cluster.devices()}
            assert problems[NODE] == problems["peer-same"] == ""
            assert "it speaks llama.cpp rpc 6.1.0, the root rpc 7.0.0" in problems["peer-other"]
            assert {m.node_id for m in cluster.members() if m.live} >= {"peer-other"}
        finally:
            await cluster.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("declared", [False, True], ids=["measured", "declared"])
def test_memory_a_reload_gives_back_counts_only_where_it_was_measured(
    tmp_path: Path, declared: bool
) -> None:
    """A measured figure drops while a model is loaded, so a re-plan credits it back; a
    configured one (memory_override_mb, a devices file) never dropped."""
    config = with_overrides(Config(), state_dir=str(tmp_path), network_mdns=False)
    cluster = Cluster(
        config, Identity(NODE, "me", "127.0.0.1:9"), None, busy=lambda: False, model=pb.ModelInfo
    )
    cluster.set_device(
        pb.DeviceProfile(
            id=NODE, memory_total_bytes=4 * GIB, memory_usable_bytes=GIB, memory_declared=declared
        )
    )
    (me,) = cluster.capacities(extra_local_bytes=GIB)
    assert me.usable_bytes == (GIB if declared else 2 * GIB)


def test_after_a_loss_the_planner_sees_what_was_freed_and_not_the_lost_device(
    tmp_path: Path,
) -> None:
    """Right after a worker's lease ends, its reported figures still count the layers it
    held until it measures again; and a worker whose RPC connection failed is left out
    before membership counts it as dead. Both make the first plan after a loss the same
    as the ones after it."""

    async def scenario() -> None:
        config = with_overrides(Config(), state_dir=str(tmp_path), network_mdns=False)
        cluster = Cluster(
            config,
            Identity(NODE, "me", "127.0.0.1:9"),
            b"s" * 32,
            busy=lambda: False,
            model=pb.ModelInfo,
        )
        cluster.set_device(
            pb.DeviceProfile(
                id=NODE, memory_total_bytes=GIB, memory_usable_bytes=GIB, rpc_protocol="rpc 7.0.0"
            )
        )
        await cluster.start()
        try:
            for node_id, address in (("peer-a", "127.0.0.2:9"), ("peer-b", "127.0.0.3:9")):
                peer = status(node_id, address)
                peer.device.memory_total_bytes = 4 * GIB
                peer.device.memory_usable_bytes = GIB // 4
                peer.device.measured_at = time.time()
                peer.device.rpc_protocol = "rpc 7.0.0"
                cluster.observe(peer)
            usable = {d.node_id: d.usable_bytes for d in cluster.capacities()}
            assert usable["peer-a"] == GIB // 4
            # The lease on peer-a ends: its 3/4 GiB share is free before it says so.
            await cluster.release_leases([Held("peer-a", "a", "lease-1", "", "", 3 * GIB // 4)])
            usable = {d.node_id: d.usable_bytes for d in cluster.capacities()}
            assert usable["peer-a"] == GIB
            fresh = status("peer-a", "127.0.0.2:9")
            fresh.device.memory_total_bytes = 4 * GIB
            fresh.device.memory_usable_bytes = GIB
            fresh.device.measured_at = time.time() + 1  # measured after the release
            fresh.device.rpc_protocol = "rpc 7.0.0"
            cluster.observe(fresh)
            usable = {d.node_id: d.usable_bytes for d in cluster.capacities()}
            assert usable["peer-a"] == GIB  # no longer added: the figure has it
            # llama.cpp lost peer-b: it is planned around until it is heard from again.
            cluster.unreachable({"peer-b"})
            assert "peer-b" not in {d.node_id for d in cluster.capacities()}
            again = status("peer-b", "127.0.0.3:9")
            again.device.memory_total_bytes = 4 * GIB
            again.device.rpc_protocol = "rpc 7.0.0"
            cluster.observe(again)
            assert "peer-b" in {d.node_id for d in cluster.capacities()}
        finally:
            await cluster.stop()

    asyncio.run(scenario())
