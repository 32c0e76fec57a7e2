"""The devices.json format: static peers and the figures they declare.

Either a bare list of devices or, as the hsmdif-llama prototype wrote it, an object
holding that list under "devices":

    [{"address": "10.0.0.1", "port": 9999, "total_memory": 8192, "memfree": 6000,
      "speed": 5.0, "load": 0.1}, ...]
    {"devices": [{"address": "192.168.1.10", "port": 9999, ...}, ...]}

Memory is in MB; every key but `address` may be left out (port 9999 by default).
The file is only read here: nothing is contacted until the daemon heartbeats the
addresses it lists. Anything else (a file over 1 MiB, JSON nested too deep, NaN or
infinite figures, negative ones, two entries for one address, a port out of range)
is a ConfigError naming the file, the device and the key.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any, NoReturn

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.daemon.config import DEFAULT_PORT, ConfigError

MB = 1024 * 1024
MAX_FILE_BYTES = 1024 * 1024
MAX_MEMORY_MB = 1024**3  # 1 PiB: far above any device, far below the uint64 of bytes
_NUMBERS = ("total_memory", "memfree", "speed", "load")
_KEYS = ("address", "port", *_NUMBERS)
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")  # looks like an IPv4 address but is not one


def load_devices_file(path: Path) -> dict[str, pb.DeviceProfile]:
    """Declared figures by "host:port"; ConfigError naming the file and the entry."""
    entries = _entries(_parse(path), path)
    devices: dict[str, pb.DeviceProfile] = {}
    first_index: dict[str, int] = {}
    for i, entry in enumerate(entries, start=1):
        device = _device(entry, f"{path}: device {i}")
        key = device.address.lower()
        if key in first_index:
            raise ConfigError(
                f"{path}: device {i}: {device.address} is already device {first_index[key]}; "
                "list each device once"
            )
        first_index[key] = i
        devices[device.address] = device
    return devices


def _parse(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such devices file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a devices.json file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the devices file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{path}: the devices file is over {MAX_FILE_BYTES // 1024} KiB; "
            "a devices.json lists a few devices and is far smaller"
        )
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path}: not a readable devices.json: {_unreadable(e)}") from None


def _unreadable(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a figure a device can declare (give a finite number)")


def _entries(document: Any, path: Path) -> list[Any]:
    if isinstance(document, list):
        return document
    shapes = 'a list of devices, or an object with a "devices" list'
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: must hold {shapes}, not {_kind(document)}")
    unknown = sorted(set(document) - {"devices"})
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ConfigError(
            f'{path}: unknown top-level keys {names}; the object holds only "devices"'
        )
    if "devices" not in document:
        raise ConfigError(f'{path}: must hold {shapes}; this object has no "devices"')
    entries = document["devices"]
    if not isinstance(entries, list):
        raise ConfigError(f'{path}: "devices" must hold a list of devices, not {_kind(entries)}')
    return entries


def _device(entry: Any, where: str) -> pb.DeviceProfile:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object with an 'address', not {_kind(entry)}")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(unknown)} (known keys: {', '.join(_KEYS)})"
        )
    host = _host(entry.get("address"), where)
    port = entry.get("port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(
            f"{where}: 'port' must be a port number from 1 to 65535, not {_short(port)}"
        )
    figures = {key: _figure(entry, key, where) for key in _NUMBERS}
    for key in ("total_memory", "memfree"):
        if figures[key] > MAX_MEMORY_MB:
            raise ConfigError(f"{where}: '{key}' must be at most {MAX_MEMORY_MB} MB")
    if figures["load"] > 1:
        raise ConfigError(
            f"{where}: 'load' must be between 0 and 1 (the fraction of the CPU in use), "
            f"not {figures['load']:g}"
        )
    if 0 < figures["total_memory"] < figures["memfree"]:
        raise ConfigError(
            f"{where}: 'memfree' ({figures['memfree']:g} MB) is more than 'total_memory' "
            f"({figures['total_memory']:g} MB); give the free memory in MB, at most the total"
        )
    return pb.DeviceProfile(
        address=f"{host}:{port}",
        memory_total_bytes=int(figures["total_memory"] * MB),
        memory_usable_bytes=int(figures["memfree"] * MB),
        speed=figures["speed"],
        load=figures["load"],
        declared=True,
    )


def _host(address: Any, where: str) -> str:
    """The address as a gRPC target host: an IPv6 address in brackets."""
    if address is None:
        raise ConfigError(f"{where}: needs an 'address' (a host name or IP address)")
    if not isinstance(address, str):
        raise ConfigError(
            f"{where}: 'address' must be a host name or IP address string, not {_kind(address)}"
        )
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if _HOSTNAME.fullmatch(address) and not _DOTTED_NUMBERS.fullmatch(address):
            return address
        if address.count(":") == 1 and address.rsplit(":", 1)[1].isdigit():
            raise ConfigError(
                f"{where}: 'address' {_short(address)} holds a port; give the port in 'port'"
            ) from None
        raise ConfigError(
            f"{where}: 'address' {_short(address)} is neither a host name nor an IP address"
        ) from None
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _figure(entry: dict[str, Any], key: str, where: str) -> float:
    value = entry.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: '{key}' must be a number >= 0, not {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where}: '{key}' must be a finite number >= 0, not {_short(value)}")
    return number


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too large to print"
    return text if len(text) <= 40 else f"{text[:37]}..."
