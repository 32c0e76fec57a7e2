"""The devices this device knows, as people are shown them and as the planner takes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import election
from hsmdifd.placement import planner, rpc_protocol

if TYPE_CHECKING:
    from hsmdifd.cluster.view import Cluster


def capacities(
    cluster: Cluster, extra_local_bytes: int = 0, credit: dict[str, int] | None = None
) -> list[planner.DeviceCapacity]:
    """Live devices for the planner: this device (the root) first, then by priority.

    `extra_local_bytes` is memory here that a reload gives back (the loaded model),
    `credit` the same on workers, by node id (the layers they hold for us).
    """
    credit = credit or {}
    me = cluster.device
    if me.memory_declared:  # a configured figure does not drop as a model loads
        extra_local_bytes = 0
    out = [
        planner.DeviceCapacity(
            node_id=me.id,
            name=me.name,
            address=me.address,
            usable_bytes=_capped(me.memory_usable_bytes + extra_local_bytes, me.memory_total_bytes),
            speed=me.speed,
            load=me.load,
        )
    ]
    if cluster.membership is None:
        return out
    for member in election.rank(cluster.members(), cluster.policy):
        device = cluster.membership.device_of(member.node_id)
        if member.node_id == me.id or not member.live or device is None:
            continue
        if rpc_protocol.refusal(me.rpc_protocol, device.rpc_protocol):
            continue
        if member.node_id in cluster.unreachable_ids:
            continue  # its RPC connection failed; membership has not caught up yet
        freed, released_at = cluster.leases.released.get(member.node_id, (0, 0.0))
        if device.memory_declared or device.measured_at >= released_at:
            freed = 0
        out.append(
            planner.DeviceCapacity(
                node_id=member.node_id,
                name=member.name,
                address=member.address,
                usable_bytes=_capped(
                    device.memory_usable_bytes
                    + freed
                    + (0 if device.memory_declared else credit.get(member.node_id, 0)),
                    device.memory_total_bytes,
                ),
                speed=device.speed,
                load=device.load,
            )
        )
    return out


def devices(cluster: Cluster) -> list[pb.DeviceProfile]:
    """Every known device, in priority order, with role, state and rank."""
    ranked = election.rank(cluster.members(), cluster.policy)
    by_id = {m.node_id: m for m in ranked}
    out = []
    for rank, member in enumerate(ranked, 1):
        if member.node_id == cluster.identity.node_id:
            device = pb.DeviceProfile()
            device.CopyFrom(cluster.device)
        else:
            known = cluster.membership.device_of(member.node_id) if cluster.membership else None
            device = known or pb.DeviceProfile(id=member.node_id)
        device.rank = rank
        device.state = by_id[member.node_id].state.value
        if member.node_id != cluster.identity.node_id and (
            why := rpc_protocol.refusal(cluster.device.rpc_protocol, device.rpc_protocol)
        ):
            device.problem = f"not planned onto: {why}"
        device.role = "root" if member.node_id == cluster.root_id else "worker"
        out.append(device)
    if cluster.membership is not None:
        now = cluster.membership.now()
        for record in cluster.membership.records():
            state = cluster.membership.state_of(record, now)
            unknown = record.status is None and not record.alias_of
            if unknown and state not in election.LIVE_STATES:
                out.append(pb.DeviceProfile(address=record.address, state=state.value, role="-"))
    return out


def _capped(usable: int, total: int) -> int:
    return min(usable, total) if total else usable
