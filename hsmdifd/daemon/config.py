"""The daemon's configuration: a frozen dataclass tree loaded from TOML.

Every default is written once, here; `etc/hsmdifd.toml` documents the same keys.
An unknown key or a value of the wrong type is a `ConfigError` naming the key
and the file.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from hsmdif.paths import default_socket_path, default_state_dir
from hsmdifd.daemon import timing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PORT = 9999


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class NodeConfig:
    name: str = ""
    """Name shown to people; empty means the host name."""


@dataclass(frozen=True)
class NetworkConfig:
    listen_address: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    advertise_address: str = ""
    mdns: bool = True
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterConfig:
    secret_file: str = ""
    """The cluster secret (hsmdifctl cluster init); empty means this device runs alone."""
    devices_file: str = ""
    """A devices.json listing static peers and the figures they declare."""
    data_plane: str = "tls"
    """How llama.cpp's RPC stream crosses the network: "tls" (a mutually authenticated,
    encrypted relay per lease) or "plain" (for a link you trust)."""


@dataclass(frozen=True)
class ControlConfig:
    socket: str = ""
    """Control socket path; empty means the default for this user."""
    group: str = "hsmdif"


@dataclass(frozen=True)
class StateConfig:
    dir: str = ""
    """State directory; empty means the default for this user."""


@dataclass(frozen=True)
class ResourcesConfig:
    threads: int = 0
    """llama.cpp threads; 0 means one per physical core."""
    memory_reserve_mb: int = 512
    memory_override_mb: int = 0
    speed_override: float = 0.0
    daemon_memory_max_mb: int = 512
    """The daemon's own memory limit, where it has a cgroup of its own (under systemd);
    its children (the model) are not counted in it. 0: no limit of its own."""


@dataclass(frozen=True)
class ModelConfig:
    default: str = ""
    """Model loaded when none is named; empty means the bundled Gemma 3 270M."""
    context_length: int = 4096
    max_tokens: int = 512
    keep_alive: float = 0.0
    """Seconds an idle model stays loaded; 0 keeps it loaded until unloaded."""
    strategy: str = "capacity"
    """How layers are split over devices: "capacity" or "latency"."""
    quantize: str = ""
    """Load an F32, F16 or BF16 model as a cached "4bit" (Q4_K_M) or "8bit" (Q8_0) copy
    when the load does not say; empty loads files as they are."""


DEFAULT_API_LISTEN = "127.0.0.1:9998"


@dataclass(frozen=True)
class ApiConfig:
    listen: str = DEFAULT_API_LISTEN
    """ADDRESS:PORT of the OpenAI-compatible HTTP API; empty turns it off."""
    api_key_file: str = ""
    """A file holding the key clients send as `Authorization: Bearer KEY`; needed
    unless `listen` is a loopback address."""
    cors_origins: tuple[str, ...] = ()
    """Origins a browser page may call the API from ("*" for any)."""
    max_queue: int = 64
    """Requests that may wait at the root for the model before more are refused."""


@dataclass(frozen=True)
class TimingConfig:
    heartbeat_interval: float = timing.HEARTBEAT_INTERVAL
    dead_after: float = timing.DEAD_AFTER
    mdns_ttl: int = timing.MDNS_TTL
    unproven_timeout: float = timing.UNPROVEN_TIMEOUT
    shutdown_grace: float = timing.SHUTDOWN_GRACE


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    state: StateConfig = field(default_factory=StateConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)

    # Derived values, resolved against the environment.

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname()

    @property
    def socket_path(self) -> Path:
        return Path(self.control.socket) if self.control.socket else default_socket_path()

    @property
    def state_dir(self) -> Path:
        return Path(self.state.dir) if self.state.dir else default_state_dir()

    @property
    def threads(self) -> int:
        return self.resources.threads or physical_cores()


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


_T = TypeVar("_T")


def load_config(path: Path | None) -> Config:
    """Load `path` (all defaults when None); raise ConfigError on any problem."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    config = _build(Config, data, str(path), "")
    _validate(config, str(path))
    return config


def _build(cls: type[_T], data: Mapping[str, Any], file: str, prefix: str) -> _T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            raise ConfigError(f"{file}: unknown key '{name}' (known keys in {where}: {known})")
        kwargs[key] = _convert(hints[key], value, file, name)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, file: str, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: '{name}' must be a table ([{name}]), not {_kind(value)}")
        return _build(hint, value, file, f"{name}.")  # type: ignore[arg-type]
    origin = get_origin(hint)
    if origin is tuple:
        (item,) = get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{file}: '{name}' must be a list, not {_kind(value)}")
        return tuple(_convert(item, v, file, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{file}: '{name}' must be {_kind_of_type(hint)}, not {_kind(value)} ({value!r})"
        )
    return float(value) if hint is float else value


def _kind_of_type(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        hint, str(hint)
    )


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a table"})
    return names.get(type(value), type(value).__name__)


def _validate(config: Config, file: str) -> None:
    checks: list[tuple[bool, str]] = [
        (0 < config.network.port < 65536, "'network.port' must be between 1 and 65535"),
        (config.resources.threads >= 0, "'resources.threads' must be 0 (automatic) or more"),
        (config.resources.memory_reserve_mb >= 0, "'resources.memory_reserve_mb' must be >= 0"),
        (
            config.resources.daemon_memory_max_mb >= 0,
            "'resources.daemon_memory_max_mb' must be >= 0",
        ),
        (config.resources.memory_override_mb >= 0, "'resources.memory_override_mb' must be >= 0"),
        (config.resources.speed_override >= 0, "'resources.speed_override' must be >= 0"),
        (config.model.context_length >= 16, "'model.context_length' must be at least 16"),
        (config.model.max_tokens > 0, "'model.max_tokens' must be at least 1"),
        (config.model.keep_alive >= 0, "'model.keep_alive' must be >= 0 (0 keeps models loaded)"),
        (
            config.model.strategy in ("capacity", "latency"),
            '\'model.strategy\' must be "capacity" or "latency"',
        ),
        (
            config.model.quantize in ("", "4bit", "8bit"),
            '\'model.quantize\' must be "4bit", "8bit" or "" (load files as they are), '
            f"not {config.model.quantize!r}",
        ),
        (config.timing.heartbeat_interval > 0, "'timing.heartbeat_interval' must be > 0"),
        (
            config.timing.dead_after > config.timing.heartbeat_interval,
            "'timing.dead_after' must be longer than 'timing.heartbeat_interval'",
        ),
        (config.timing.mdns_ttl > 0, "'timing.mdns_ttl' must be > 0"),
        (config.timing.unproven_timeout > 0, "'timing.unproven_timeout' must be > 0"),
        (
            config.cluster.data_plane in ("tls", "plain"),
            '\'cluster.data_plane\' must be "tls" or "plain"',
        ),
        (config.timing.shutdown_grace >= 0, "'timing.shutdown_grace' must be >= 0"),
        (config.api.max_queue >= 0, "'api.max_queue' must be 0 (no waiting) or more"),
        (
            not config.api.listen or api_address(config.api.listen) is not None,
            f"'api.listen' must be ADDRESS:PORT or empty (got {config.api.listen!r})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{file}: {message}")


def api_address(listen: str) -> tuple[str, int] | None:
    """(host, port) of an `[api] listen` value; None when it is not ADDRESS:PORT."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply command-line overrides given as `section_key=value` (None = not given)."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split("_", 1)
        sections.setdefault(section, {})[key] = value
    for section, values in sections.items():
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), **values)}
        )
    return config
