"""The devices.json format: static peers and the figures they declare.

    [{"address": "10.0.0.1", "port": 9999, "total_memory": 8192, "memfree": 6000,
      "speed": 5.0, "load": 0.1}, ...]

Memory is in MB; every key but `address` may be left out (port 9999 by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hsmdifd.config import DEFAULT_PORT, ConfigError
from hsmdifd.proto import hsmdif_pb2 as pb

MB = 1024 * 1024
_NUMBERS = ("total_memory", "memfree", "speed", "load")


def load_devices_file(path: Path) -> dict[str, pb.DeviceProfile]:
    """Declared figures by "host:port"; ConfigError naming the file and the entry."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such devices file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable devices.json: {e}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: must hold a list of devices")
    devices = {}
    for i, entry in enumerate(entries):
        device = _device(entry, f"{path}: device {i + 1}")
        devices[device.address] = device
    return devices


def _device(entry: Any, where: str) -> pb.DeviceProfile:
    if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
        raise ConfigError(f"{where}: needs an 'address' string")
    unknown = set(entry) - {"address", "port", *_NUMBERS}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    port = entry.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{where}: 'port' must be a port number")
    for key in _NUMBERS:
        value = entry.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}: '{key}' must be a number >= 0")
    return pb.DeviceProfile(
        address=f"{entry['address']}:{port}",
        memory_total_bytes=int(entry.get("total_memory", 0) * MB),
        memory_usable_bytes=int(entry.get("memfree", 0) * MB),
        speed=float(entry.get("speed", 0)),
        load=float(entry.get("load", 0)),
        declared=True,
    )
