"""The cluster policy on the wire and on disk: the priority order and its version."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import election
from hsmdifd.daemon.errors import RequestError

log = logging.getLogger(__name__)


def policy_to_pb(policy: election.Policy) -> pb.Policy:
    return pb.Policy(
        version=policy.version, order=list(policy.order), by_memory=policy.by_memory_only
    )


def policy_from_pb(message: pb.Policy) -> election.Policy:
    return election.Policy(
        version=message.version, order=tuple(message.order), by_memory_only=message.by_memory
    )


def load_policy(path: Path) -> election.Policy:
    """The policy saved in `path`; the default when there is none or it is unusable."""
    try:
        data = json.loads(path.read_text())
        policy = election.Policy(
            version=int(data["version"]),
            order=tuple(str(x) for x in data["order"]),
            by_memory_only=bool(data["by_memory"]),
        )
        if not 0 <= policy.version <= election.MAX_POLICY_VERSION:
            raise ValueError(f"version {policy.version} is out of bounds")
        return policy
    except FileNotFoundError:
        return election.DEFAULT_POLICY
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s (%s): using the default policy", path, e)
        return election.DEFAULT_POLICY


def save_policy(path: Path, policy: election.Policy) -> None:
    """Write `policy` to `path` whole or not at all."""
    tmp = path.with_suffix(".tmp")
    data = {
        "version": policy.version,
        "order": list(policy.order),
        "by_memory": policy.by_memory_only,
    }
    with tmp.open("w") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe_policy(policy: election.Policy) -> str:
    if policy.by_memory_only or not policy.order:
        return "by memory"
    return "order " + ", ".join(policy.order) + ", then by memory"


def next_policy(
    current: election.Policy, names: list[str], by_memory: bool, members: Sequence[election.Member]
) -> election.Policy:
    """The policy a person's priority order (or by memory) makes of `current`, one version
    on; RequestError for a device no member answers to, or a version at its limit."""
    if by_memory:
        order: tuple[str, ...] = ()
    else:
        try:
            order = election.resolve_priority(names, members)
        except election.PriorityError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    if current.version >= election.MAX_POLICY_VERSION:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the policy version is at its limit ({election.MAX_POLICY_VERSION}); "
            "delete policy.json in every state directory and restart",
        )
    return election.Policy(current.version + 1, order, by_memory)


def policy_with_names(policy: election.Policy, members: Sequence[election.Member]) -> pb.Policy:
    """`policy` on the wire, with the names of the devices it orders, for people."""
    message = policy_to_pb(policy)
    names = {m.node_id: m.name for m in members}
    message.order_names.extend(names.get(i, i) for i in policy.order)
    return message
