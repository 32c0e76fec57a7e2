"""The daemon's lifecycle in this process: a startup that fails at any step leaves
nothing running (no socket, no listening port, no mDNS announcement, no child, no task),
and a shutdown after a good startup leaves nothing either."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import psutil
import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from hsmdifd.cluster.discovery import SERVICE_TYPE
from hsmdifd.daemon.config import (
    ApiConfig,
    ClusterConfig,
    Config,
    ControlConfig,
    NetworkConfig,
    NodeConfig,
    ResourcesConfig,
    StateConfig,
)
from hsmdifd.daemon.errors import StartupError
from hsmdifd.daemon.server import Daemon

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> socket.socket:
    s = socket.socket()
    s.bind((HOST, port))
    s.listen()
    return s


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _config(directory: Path, peer_port: int, http_port: int) -> Config:
    secret = directory / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    return Config(
        node=NodeConfig(name="startup"),
        network=NetworkConfig(listen_address=HOST, port=peer_port, advertise_address=HOST),
        cluster=ClusterConfig(secret_file=str(secret)),
        control=ControlConfig(socket=str(directory / "ctl.sock")),
        state=StateConfig(dir=str(directory / "state")),
        resources=ResourcesConfig(speed_override=1.0, memory_override_mb=1024),
        api=ApiConfig(listen=f"{HOST}:{http_port}"),
    )


async def _announced(instance: str) -> bool:
    """Whether anyone answers for the mDNS instance, asked afresh (no cache)."""
    zc = AsyncZeroconf(interfaces=[HOST], ip_version=IPVersion.V4Only)
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}")
        return await info.async_request(zc.zeroconf, 1500)
    finally:
        await zc.async_close()


def _others() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def _assert_nothing_left(daemon: Daemon, config: Config, peer_port: int) -> None:
    assert not config.socket_path.exists()
    assert _port_free(peer_port), "the peer port is still held"
    assert psutil.Process().children(recursive=True) == []
    assert daemon.identity is not None
    assert not await _announced(f"startup-{daemon.identity.node_id[:8]}")
    assert _others() == set()


@pytest.mark.parametrize(
    ("taken", "refusal"),
    [
        # The last step: the control socket, the peer port and mDNS are open by then.
        ("http", "cannot serve the HTTP API on {HOST}:{port}"),
        # Before the control socket: the cluster is made, the leases and the engine too.
        ("peer", "cannot listen for peers on {HOST}:{port}"),
    ],
)
def test_a_startup_that_fails_closes_what_the_steps_before_opened(
    short_dir: Path, taken: str, refusal: str
) -> None:
    ports = {"peer": _free_port(), "http": _free_port()}
    config = _config(short_dir, ports["peer"], ports["http"])

    async def main() -> None:
        daemon = Daemon(config, None, {})
        with _listening(ports[taken]), pytest.raises(StartupError) as info:
            await daemon.startup()
        assert refusal.format(HOST=HOST, port=ports[taken]) in str(info.value)
        for name, port in ports.items():
            assert name == taken or _port_free(port), f"the {name} port is still held"
        await _assert_nothing_left(daemon, config, ports["peer"])

    asyncio.run(main())


def test_a_daemon_that_started_is_announced_and_serving_until_shutdown(
    short_dir: Path,
) -> None:
    peer_port, http_port = _free_port(), _free_port()
    config = _config(short_dir, peer_port, http_port)

    async def main() -> None:
        daemon = Daemon(config, None, {})
        await daemon.startup()
        assert daemon.identity is not None
        try:
            assert config.socket_path.is_socket()
            assert not _port_free(peer_port) and not _port_free(http_port)
            assert await _announced(f"startup-{daemon.identity.node_id[:8]}")
            assert signal.getsignal(signal.SIGHUP) != signal.SIG_DFL
        finally:
            await daemon.shutdown()
        assert _port_free(http_port)
        await _assert_nothing_left(daemon, config, peer_port)

    asyncio.run(main())
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # gone with the loop


def test_a_daemon_whose_startup_failed_shuts_down_as_serve_does(short_dir: Path) -> None:
    peer_port, http_port = _free_port(), _free_port()
    config = _config(short_dir, peer_port, http_port)

    async def main() -> None:
        daemon = Daemon(config, None, {})
        with _listening(http_port), pytest.raises(StartupError):
            await daemon.startup()
        await daemon.shutdown()  # what serve() does after a StartupError: nothing left to do
        await _assert_nothing_left(daemon, config, peer_port)

    asyncio.run(main())
