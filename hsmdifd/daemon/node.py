"""This device's identity: a node id kept in the state directory, a name, an address."""

from __future__ import annotations

import ipaddress
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from hsmdifd.daemon.config import Config


@dataclass(frozen=True)
class Identity:
    node_id: str
    name: str
    address: str  # host:port peers reach this device on


def load_node_id(state_dir: Path) -> str:
    """The node id, created on first start and kept in `state_dir/node_id`."""
    path = state_dir / "node_id"
    try:
        text = path.read_text().strip()
        return str(uuid.UUID(text))
    except FileNotFoundError:
        pass
    except ValueError:
        raise ValueError(f"{path} does not hold a node id; delete it to make a new one") from None
    node_id = str(uuid.uuid4())
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)
    return node_id


def advertise_host(config: Config) -> str:
    """The configured address, else the first global IPv4 address of an interface that is up."""
    if config.network.advertise_address:
        return config.network.advertise_address
    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family.name == "AF_INET" and not ipaddress.ip_address(addr.address).is_loopback:
                return addr.address
    return "127.0.0.1"


def load_identity(config: Config) -> Identity:
    return Identity(
        node_id=load_node_id(config.state_dir),
        name=config.node_name,
        address=f"{advertise_host(config)}:{config.network.port}",
    )
