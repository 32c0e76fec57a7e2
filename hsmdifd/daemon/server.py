"""The daemon's lifecycle: startup(), main_loop(), shutdown(), on one asyncio loop.

Signal handlers only set events: SIGTERM/SIGINT ask for a graceful shutdown and
a second one makes it immediate; SIGHUP reloads the configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import logging
import os
import signal
import socket
import time
from pathlib import Path

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api import api_key
from hsmdifd.api.control_service import ControlService, add_control_service
from hsmdifd.api.http_api import HttpApi, model_id
from hsmdifd.api.metrics import ClusterView, Metrics
from hsmdifd.api.peer_service import PeerService, add_peer_service
from hsmdifd.api.queue import RequestQueue
from hsmdifd.api.routing import Router
from hsmdifd.cluster import tls
from hsmdifd.cluster.auth import AuthServerInterceptor, SecretError, load_secret
from hsmdifd.cluster.devices_file import load_devices_file
from hsmdifd.cluster.follow import Follower
from hsmdifd.cluster.membership import OPEN_METHODS, server_keepalive_options
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon import cgroups, notify, timing
from hsmdifd.daemon.bundled import bundled_model_path
from hsmdifd.daemon.config import Config, ConfigError, api_address, load_config, with_overrides
from hsmdifd.daemon.node import Identity, load_identity
from hsmdifd.engine.models import Models
from hsmdifd.engine.supervisor import Engine
from hsmdifd.placement import profile, rpc_protocol
from hsmdifd.placement.leases import Leases

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def claim_socket(path: Path) -> None:
    """Make `path` free for a new server: replace a stale socket, refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise StartupError(
            f"{path} exists and is not a socket; remove it or choose another --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("replacing the stale socket %s", path)
        path.unlink()
        return
    except OSError as e:
        raise StartupError(f"cannot check the existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise StartupError(
        f"another hsmdifd is already running on {path}; stop it first "
        "(systemctl stop hsmdifd) or give this one another --socket"
    )


def _share_socket(path: Path, group: str) -> None:
    """Mode 0660, and the configured group where that group exists."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = -1
    if gid != -1:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            log.warning("cannot give %s to group %s: not a member", path, group)
    os.chmod(path, 0o660)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, overrides: dict[str, object]):
        self.config = config
        self._config_path = config_path
        self._overrides = overrides
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._models: Models | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.identity: Identity | None = None
        self._owns_socket = False
        self._peer_server: grpc.aio.Server | None = None
        self.cluster: Cluster | None = None
        self._leases: Leases | None = None
        self._tls: tls.DeviceCredentials | None = None
        self._router: Router | None = None
        self._http: HttpApi | None = None
        self._metrics: Metrics | None = None

    # ---- device figures -------------------------------------------------------------

    def _memory(self) -> profile.MemoryFigures:
        res = self.config.resources
        override = res.memory_override_mb * MIB if res.memory_override_mb else None
        return profile.memory_figures(res.memory_reserve_mb * MIB, override)

    def device_profile(self, refresh_speed: bool = False) -> pb.DeviceProfile:
        """This device's figures (blocking: the speed benchmark may run)."""
        assert self.identity is not None
        memory = self._memory()
        res = self.config.resources
        speed = res.speed_override or profile.cached_speed(
            self.config.state_dir, refresh=refresh_speed
        )
        return pb.DeviceProfile(
            id=self.identity.node_id,
            name=self.identity.name,
            address=self.identity.address,
            memory_total_bytes=memory.total_bytes,
            memory_usable_bytes=memory.usable_bytes,
            memory_limit_bytes=memory.limit_bytes,
            speed=speed,
            load=profile.cpu_load(),
            threads=self.config.threads,
            role="root",
            state="alive",
            declared=memory.declared or bool(res.speed_override),
            memory_declared=memory.declared,
            measured_at=time.time(),
            rpc_protocol=rpc_protocol.protocol(),
        )

    # ---- lifecycle ------------------------------------------------------------------

    async def startup(self) -> None:
        config = self.config
        cgroups.bound_daemon(config.resources.daemon_memory_max_mb)
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            self.identity = load_identity(config)
        except (OSError, ValueError) as e:
            raise StartupError(f"cannot use the state directory {config.state_dir}: {e}") from e
        secret, declared = self._cluster_inputs()
        key = self._api_key()
        path = config.socket_path
        try:
            claim_socket(path)
        except PermissionError as e:
            raise StartupError(f"cannot create the control socket {path}: {e.strerror}") from e
        engine = Engine(Engine.child_socket(path.parent))
        if secret is not None:
            try:
                self._tls = await asyncio.to_thread(
                    tls.device_credentials, secret, self.identity.node_id, config.state_dir
                )
            except (OSError, ValueError) as e:
                raise StartupError(
                    f"cannot make this device's TLS key in {config.state_dir / 'tls'}: {e}"
                ) from e
        cluster = self.cluster = Cluster(
            config,
            self.identity,
            secret,
            busy=lambda: models.in_flight > 0,
            model=lambda: models.info,
            declared=declared,
            credentials=self._tls,
        )
        models = self._models = Models(config, engine, cluster)
        cluster.set_device(await asyncio.to_thread(self.device_profile))
        router = self._router = Router(cluster, models, RequestQueue(config.api.max_queue))
        if secret is not None:
            await self._serve_peers(secret)
        server = grpc.aio.server()
        add_control_service(ControlService(cluster, router, self.device_profile), server)
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise StartupError(f"cannot listen on {path}")
        await server.start()
        self._server = server
        self._owns_socket = True
        _share_socket(path, config.control.group)
        if not _accepts(path):
            raise StartupError(f"the control socket {path} does not accept connections")
        await cluster.start()
        await self._serve_http(router, key)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        interval = notify.watchdog_interval()
        if interval:
            self._tasks.append(asyncio.create_task(notify.watchdog_loop(interval)))
        self._tasks.append(asyncio.create_task(self._refresh_device()))
        follower = Follower(cluster, models, self._leases)
        self._tasks.append(asyncio.create_task(follower.run()))
        if secret:
            self._tasks.append(asyncio.create_task(self._notice_own_stalls()))
        log.info(
            "hsmdifd %s (%s) ready on %s%s",
            self.identity.name,
            self.identity.node_id,
            path,
            f", peers on {self.identity.address}" if secret else ", alone (no cluster secret)",
        )
        notify.notify("READY=1")

    def _api_key(self) -> bytes | None:
        """The HTTP API's key; refuse a listen address others can reach without one."""
        api = self.config.api
        if not api.listen:
            return None
        address = api_address(api.listen)
        if address is None:
            raise StartupError(f"[api] listen {api.listen!r}: give ADDRESS:PORT, or empty")
        try:
            return api_key.api_key_for(api.listen, api.api_key_file)
        except api_key.ApiKeyError as e:
            raise StartupError(str(e)) from e

    def _default_model_id(self) -> str:
        model = self.config.model.default
        return model_id(model or str(bundled_model_path(self.config.state_dir)))

    async def _serve_http(self, router: Router, key: bytes | None) -> None:
        assert self.cluster is not None and self._models is not None
        cluster, models = self.cluster, self._models
        leases = self._leases
        self._metrics = Metrics(
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
        self._tasks.append(asyncio.create_task(self._watch_metrics(self._metrics)))
        address = api_address(self.config.api.listen)
        if address is None:
            return
        api = HttpApi(
            router, self._metrics, self._default_model_id, key, self.config.api.cors_origins
        )
        try:
            await api.start(*address)
        except OSError as e:
            raise StartupError(
                f"cannot serve the HTTP API on {self.config.api.listen}: {e.strerror}; choose "
                "another with --http ADDRESS:PORT, or --http off"
            ) from e
        self._http = api
        log.info("OpenAI-compatible HTTP API on http://%s/v1", self.config.api.listen)

    async def _watch_metrics(self, metrics: Metrics) -> None:
        while True:
            metrics.watch()
            await asyncio.sleep(timing.METRICS_WATCH)

    def _cluster_inputs(self) -> tuple[bytes | None, dict[str, pb.DeviceProfile]]:
        cluster = self.config.cluster
        try:
            secret = load_secret(Path(cluster.secret_file)) if cluster.secret_file else None
            declared = load_devices_file(Path(cluster.devices_file)) if cluster.devices_file else {}
        except (SecretError, ConfigError) as e:
            raise StartupError(str(e)) from e
        if declared and secret is None:
            raise StartupError("static peers need the cluster secret: give --secret-file")
        return secret, declared

    async def _serve_peers(self, secret: bytes) -> None:
        assert self.identity is not None and self._models is not None
        network = self.config.network
        assert self._tls is not None
        server = grpc.aio.server(
            interceptors=[
                AuthServerInterceptor(
                    secret,
                    self.identity.node_id,
                    open_methods=OPEN_METHODS,
                    cert_id=lambda context: tls.peer_node_id_from_auth_context(
                        {k: list(v) for k, v in context.auth_context().items()}
                    ),
                )
            ],
            options=server_keepalive_options(self.config.timing.heartbeat_interval),
        )
        assert self.cluster is not None and self._router is not None
        host = self.identity.address.rsplit(":", 1)[0]
        timing_config = self.config.timing
        self._leases = Leases(
            host,
            self.config.state_dir / "rpc-cache",
            self.config.threads,
            self.cluster.lease_refusal,
            credentials=self._tls,
            data_plane=self.config.cluster.data_plane,
            keepalive_interval=timing_config.heartbeat_interval,
            dead_after=timing_config.dead_after,
        )
        add_peer_service(
            PeerService(self.cluster, self._models, self._leases, secret, self._router), server
        )
        target = f"{network.listen_address}:{network.port}"
        try:
            bound = server.add_secure_port(target, tls.server_credentials(self._tls))
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise StartupError(
                f"cannot listen for peers on {target} (in use?); choose another --port"
            )
        await server.start()
        self._peer_server = server

    async def _refresh_device(self) -> None:
        """Keep this device's figures current, measured off the loop."""
        assert self.cluster is not None
        while True:
            try:
                self.cluster.set_device(await asyncio.to_thread(self.device_profile))
            except Exception:
                log.exception("measuring this device failed")
            await asyncio.sleep(timing.DEVICE_REFRESH)

    async def _notice_own_stalls(self) -> None:
        """Notice when this device itself stopped (suspended, swapping, SIGSTOP) for
        long enough that its peers counted it as gone: they ended the leases it held,
        so a model split over them is loaded anew rather than failing the next
        prompt. The boot-time clock also runs while the system sleeps."""
        assert self.cluster is not None and self._models is not None
        interval = self.config.timing.heartbeat_interval
        before = time.clock_gettime(time.CLOCK_BOOTTIME)
        while True:
            await asyncio.sleep(interval)
            now = time.clock_gettime(time.CLOCK_BOOTTIME)
            gap, before = now - before, now
            # Peers heard nothing for up to the gap plus a heartbeat interval.
            if gap + interval > self.config.timing.dead_after:
                await self._models.leases_lost(gap)

    def handle_exit(self) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: stopping now")
            self._force.set()
        self._stop.set()

    async def main_loop(self) -> None:
        while not self._stop.is_set():
            stop = asyncio.create_task(self._stop.wait())
            reload = asyncio.create_task(self._reload.wait())
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                self.reload_config()

    def reload_config(self) -> None:
        notify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = with_overrides(load_config(self._config_path), **self._overrides)
        except ConfigError as e:
            log.error("configuration not reloaded, the old one stays: %s", e)
        else:
            for key in ("control", "state", "network"):
                if getattr(new, key) != getattr(self.config, key):
                    log.warning("[%s] changed: takes effect when hsmdifd restarts", key)
            if dataclasses.replace(new.api, max_queue=0) != dataclasses.replace(
                self.config.api, max_queue=0
            ):
                log.warning("[api] changed: takes effect when hsmdifd restarts (max_queue: now)")
            self.config = new
            if self._router is not None:
                self._router.queue.resize(new.api.max_queue)
            if self._models is not None:
                self._models.reconfigure(new)
            log.info("configuration reloaded from %s", self._config_path or "defaults")
        notify.notify("READY=1")

    async def shutdown(self) -> None:
        """Stop accepting, let answers in flight finish for a grace period, cancel the
        rest, end the children and the leases, say goodbye, remove the socket."""
        notify.notify("STOPPING=1")
        log.info("stopping")
        grace = 0.0 if self._force.is_set() else self.config.timing.shutdown_grace
        servers = [s for s in (self._server, self._peer_server) if s is not None]
        http = self._http

        async def stop_servers() -> None:
            await asyncio.gather(
                *(s.stop(grace) for s in servers), *([http.stop(grace)] if http else [])
            )

        stopping = asyncio.create_task(stop_servers())
        forced = asyncio.create_task(self._force.wait())
        await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            await asyncio.gather(*(s.stop(0) for s in servers), *([http.stop(0)] if http else []))
        forced.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._models is not None:
            await self._models.close()  # ends the engine and the leases it holds
        if self._leases is not None:
            await self._leases.close()  # ends the rpc-worker this device runs
        if self.cluster is not None:
            await self.cluster.stop()
        if self._owns_socket:
            self.config.socket_path.unlink(missing_ok=True)
        log.info("stopped")


async def serve(config: Config, config_path: Path | None, overrides: dict[str, object]) -> int:
    daemon = Daemon(config, config_path, overrides)
    try:
        await daemon.startup()
    except StartupError as e:
        log.error("%s", e)
        await daemon.shutdown()
        return 1
    try:
        await daemon.main_loop()
    finally:
        await daemon.shutdown()
    return 0
