"""The daemon's lifecycle: startup(), main_loop(), shutdown(), on one asyncio loop.

Startup enters every component on one `contextlib.AsyncExitStack` as it opens it, so a
step that fails closes exactly what the steps before it opened, in reverse order, and
shutdown closes the same stack after the servers have drained.

Signal handlers only set events: SIGTERM/SIGINT ask for a graceful shutdown and
a second one makes it immediate; SIGHUP reloads the configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Protocol

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api.control_service import ControlService
from hsmdifd.api.http_api import model_id
from hsmdifd.api.peer_service import PeerService
from hsmdifd.api.queue import RequestQueue
from hsmdifd.api.routing import Router
from hsmdifd.cluster.follow import Follower
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon import background, cgroups, components, notify
from hsmdifd.daemon.bundled import bundled_model_path
from hsmdifd.daemon.config import Config, ConfigError, load_config, with_overrides
from hsmdifd.daemon.control_socket import claim_socket, enter_control_server
from hsmdifd.daemon.errors import StartupError
from hsmdifd.daemon.node import Identity
from hsmdifd.engine.models import Models
from hsmdifd.engine.supervisor import Engine
from hsmdifd.placement import profile

log = logging.getLogger(__name__)


class _Server(Protocol):
    async def stop(self, grace: float) -> None: ...


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, overrides: dict[str, object]):
        self.config = config
        self._config_path = config_path
        self._overrides = overrides
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._servers: list[_Server] = []  # drained at shutdown, before the stack closes
        self.identity: Identity | None = None
        self.cluster: Cluster | None = None
        self._models: Models | None = None
        self._router: Router | None = None

    def device_profile(self, refresh_speed: bool = False) -> pb.DeviceProfile:
        """This device's figures (blocking: the speed benchmark may run)."""
        assert self.identity is not None
        return profile.device_profile(self.config, self.identity, refresh_speed)

    def _default_model_id(self) -> str:
        model = self.config.model.default
        return model_id(model or str(bundled_model_path(self.config.state_dir)))

    # ---- lifecycle ------------------------------------------------------------------

    async def startup(self) -> None:
        """Open every component; if a step fails, close what was opened and raise."""
        try:
            await self._open(self._stack)
        except BaseException:
            self._servers.clear()  # stopped with the stack
            await self._stack.aclose()
            raise

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        cgroups.bound_daemon(config.resources.daemon_memory_max_mb)
        identity = self.identity = components.identity(config)
        secret, declared = components.cluster_inputs(config)
        key = components.http_api_key(config)
        path = config.socket_path
        claim_socket(path)
        credentials = None
        if secret is not None:
            credentials = await components.device_credentials(config, identity.node_id, secret)
        queue = RequestQueue(config.api.max_queue)
        cluster = self.cluster = Cluster(
            config,
            identity,
            secret,
            busy=lambda: models.in_flight > 0,
            model=lambda: models.info,
            waiting=lambda: (queue.waiting, queue.max_waiting),
            declared=declared,
            credentials=credentials,
        )
        stack.push_async_callback(cluster.stop)
        leases = None
        if credentials is not None:
            leases = components.leases(
                config,
                identity,
                cluster,
                credentials,
                lambda: background.measure_device(cluster, self.device_profile),
            )
            stack.push_async_callback(leases.close)  # ends the rpc-worker this device runs
        engine = Engine(Engine.child_socket(path.parent))
        models = self._models = Models(config, engine, cluster)
        stack.push_async_callback(models.close)  # ends the engine and the leases it holds
        cluster.set_device(await asyncio.to_thread(self.device_profile))
        router = self._router = Router(cluster, models, queue)
        if secret is not None and credentials is not None and leases is not None:
            service = PeerService(cluster, models, leases, secret, router)
            self._servers.append(
                await components.enter_peer_server(stack, config, secret, credentials, service)
            )
        metrics = components.metrics(cluster, models, leases, router)
        control = ControlService(cluster, router, self.device_profile, metrics=metrics)
        self._servers.append(await enter_control_server(stack, path, config.control.group, control))
        await cluster.start()
        tasks = background.Background()
        stack.push_async_callback(tasks.aclose)
        tasks.spawn(background.watch_metrics(metrics))
        http = await components.enter_http_api(
            stack, config, router, metrics, key=key, default_model_id=self._default_model_id
        )
        if http is not None:
            self._servers.append(http)
            log.info("OpenAI-compatible HTTP API on http://%s/v1", config.api.listen)
        self._handle_signals()
        interval = notify.watchdog_interval()
        if interval:
            tasks.spawn(notify.watchdog_loop(interval))
        tasks.spawn(background.refresh_device(cluster, self.device_profile))
        tasks.spawn(Follower(cluster, models, leases).run())
        if secret:
            tasks.spawn(background.notice_own_stalls(models, lambda: self.config.timing))
        log.info(
            "hsmdifd %s (%s) ready on %s%s",
            identity.name,
            identity.node_id,
            path,
            f", peers on {identity.address}" if secret else ", alone (no cluster secret)",
        )
        notify.notify("READY=1")

    def _handle_signals(self) -> None:
        """Until the loop closes: a stop signal asked for during shutdown too makes it
        immediate, rather than killing the process."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)

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
        rest; then close what startup opened, in reverse order: the background tasks,
        the engine and the leases it holds, the rpc-worker, the cluster (goodbyes,
        mDNS), the socket."""
        notify.notify("STOPPING=1")
        log.info("stopping")
        grace = 0.0 if self._force.is_set() else self.config.timing.shutdown_grace
        servers, self._servers = self._servers, []
        stopping = asyncio.create_task(_stop_all(servers, grace))
        forced = asyncio.create_task(self._force.wait())
        await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            await _stop_all(servers, 0)
        forced.cancel()
        await self._stack.aclose()
        log.info("stopped")


async def _stop_all(servers: list[_Server], grace: float) -> None:
    await asyncio.gather(*(s.stop(grace) for s in servers))


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
