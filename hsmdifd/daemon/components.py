"""What the daemon is built from, each piece entered on the lifecycle's exit stack so that
closing the stack (at shutdown, or when a later step of startup fails) ends exactly what
was opened, in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api import api_key
from hsmdifd.api.http_api import HttpApi
from hsmdifd.api.metrics import ClusterView, Metrics
from hsmdifd.api.peer_service import PeerService, add_peer_service
from hsmdifd.api.routing import Router
from hsmdifd.cluster import tls
from hsmdifd.cluster.cluster_secret import SecretError, load_secret
from hsmdifd.cluster.devices_file import load_devices_file
from hsmdifd.cluster.peer_auth import AuthServerInterceptor
from hsmdifd.cluster.peer_channel import OPEN_METHODS, server_keepalive_options
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.config import Config, ConfigError, api_address
from hsmdifd.daemon.errors import StartupError
from hsmdifd.daemon.node import Identity, load_identity
from hsmdifd.engine.models import Models
from hsmdifd.placement.leases import Leases


def identity(config: Config) -> Identity:
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        return load_identity(config)
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot use the state directory {config.state_dir}: {e}") from e


def cluster_inputs(config: Config) -> tuple[bytes | None, dict[str, pb.DeviceProfile]]:
    """The cluster secret (None: this device runs alone) and the devices declared in the
    devices file."""
    cluster = config.cluster
    try:
        secret = load_secret(Path(cluster.secret_file)) if cluster.secret_file else None
        declared = load_devices_file(Path(cluster.devices_file)) if cluster.devices_file else {}
    except (SecretError, ConfigError) as e:
        raise StartupError(str(e)) from e
    if declared and secret is None:
        raise StartupError("static peers need the cluster secret: give --secret-file")
    return secret, declared


def http_api_key(config: Config) -> bytes | None:
    """The HTTP API's key; refuse a listen address others can reach without one."""
    api = config.api
    if not api.listen:
        return None
    if api_address(api.listen) is None:
        raise StartupError(f"[api] listen {api.listen!r}: give ADDRESS:PORT, or empty")
    try:
        return api_key.api_key_for(api.listen, api.api_key_file)
    except api_key.ApiKeyError as e:
        raise StartupError(str(e)) from e


async def device_credentials(config: Config, node_id: str, secret: bytes) -> tls.DeviceCredentials:
    try:
        return await asyncio.to_thread(tls.device_credentials, secret, node_id, config.state_dir)
    except (OSError, ValueError) as e:
        raise StartupError(
            f"cannot make this device's TLS key in {config.state_dir / 'tls'}: {e}"
        ) from e


def leases(
    config: Config,
    identity: Identity,
    cluster: Cluster,
    credentials: tls.DeviceCredentials,
    released: Callable[[], Awaitable[None]],
) -> Leases:
    """The leases this device grants as a worker; `released` runs as each one's
    rpc-worker has exited."""
    timing = config.timing
    return Leases(
        identity.address.rsplit(":", 1)[0],
        config.state_dir / "rpc-cache",
        config.threads,
        cluster.lease_refusal,
        credentials=credentials,
        data_plane=config.cluster.data_plane,
        keepalive_interval=timing.heartbeat_interval,
        dead_after=timing.dead_after,
        released=released,
    )


async def enter_peer_server(
    stack: contextlib.AsyncExitStack,
    config: Config,
    secret: bytes,
    credentials: tls.DeviceCredentials,
    service: PeerService,
) -> grpc.aio.Server:
    """Serve `service` to peers over mutual TLS, every call checked for its proof."""
    server = grpc.aio.server(
        interceptors=[
            AuthServerInterceptor(
                secret,
                credentials.node_id,
                open_methods=OPEN_METHODS,
                cert_id=lambda context: tls.peer_node_id_from_auth_context(
                    {k: list(v) for k, v in context.auth_context().items()}
                ),
            )
        ],
        options=server_keepalive_options(config.timing.heartbeat_interval),
    )
    add_peer_service(service, server)
    target = f"{config.network.listen_address}:{config.network.port}"
    try:
        bound = server.add_secure_port(target, tls.server_credentials(credentials))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot listen for peers on {target} (in use?); choose another --port")
    await server.start()
    stack.push_async_callback(server.stop, 0)
    return server


def metrics(cluster: Cluster, models: Models, leases: Leases | None, router: Router) -> Metrics:
    return Metrics(
        ClusterView(
            queued=lambda: router.load_counts()[0],
            in_flight=lambda: router.load_counts()[1],
            model=router.model_info,
            members_alive=lambda: len(cluster.live_ids()),
            root_id=lambda: cluster.root_id,
            leases_held=lambda: len(models.loaded.leases) if models.loaded else 0,
            leases_granted=lambda: int(leases is not None and leases.holder is not None),
        )
    )


async def enter_http_api(
    stack: contextlib.AsyncExitStack,
    config: Config,
    router: Router,
    metrics: Metrics,
    *,
    key: bytes | None,
    default_model_id: Callable[[], str],
) -> HttpApi | None:
    """The OpenAI-compatible HTTP API, where [api] listen gives an address."""
    address = api_address(config.api.listen)
    if address is None:
        return None
    api = HttpApi(router, metrics, default_model_id, key, config.api.cors_origins)
    stack.push_async_callback(api.stop, 0)
    try:
        await api.start(*address)
    except OSError as e:
        raise StartupError(
            f"cannot serve the HTTP API on {config.api.listen}: {e.strerror}; choose "
            "another with --http ADDRESS:PORT, or --http off"
        ) from e
    return api
