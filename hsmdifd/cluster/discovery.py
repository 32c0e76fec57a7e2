"""mDNS/DNS-SD discovery with python-zeroconf's asyncio API.

This device is announced as `_hsmdif._tcp.local.` with TXT hints (node id,
protocol version, port, memory, speed, policy version), under 200 bytes. The
hints only say where to look: membership asks the peer itself over gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from hsmdifd.daemon import timing

log = logging.getLogger(__name__)

SERVICE_TYPE = "_hsmdif._tcp.local."
TXT_LIMIT = 200
MAX_RESOLVING = 8
MAX_NAMES = 256


@dataclass(frozen=True)
class Hint:
    """What an announcement says about a device."""

    node_id: str
    address: str  # host:port
    protocol_version: int
    memory_mb: int
    speed: float
    policy_version: int


def encode_txt(
    *, node_id: str, protocol_version: int, port: int, memory_mb: int, speed: float, policy: int
) -> dict[str, str]:
    txt = {
        "id": node_id,
        "pv": str(protocol_version),
        "port": str(port),
        "mem": str(memory_mb),
        "spd": f"{speed:.1f}",
        "polv": str(policy),
    }
    size = sum(len(k) + len(v) + 2 for k, v in txt.items())
    assert size < TXT_LIMIT, f"TXT record of {size} bytes"
    return txt


def parse_hint(properties: dict[bytes, bytes | None], host: str, port: int) -> Hint | None:
    """A Hint from TXT properties, or None when they are malformed (logged, never raised)."""
    try:
        txt = {k.decode(): (v or b"").decode() for k, v in properties.items()}
        txt_port = int(txt.get("port") or port)
        if not 0 < txt_port < 65536 or not txt["id"]:
            raise ValueError("bad port or id")
        return Hint(
            node_id=txt["id"],
            address=f"{host}:{txt_port}",
            protocol_version=int(txt["pv"]),
            memory_mb=int(txt.get("mem") or 0),
            speed=float(txt.get("spd") or 0),
            policy_version=int(txt.get("polv") or 0),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        log.debug("ignoring a malformed announcement from %s: %s", host, e)
        return None


@dataclass(eq=False, kw_only=True)
class Discovery:
    """Announce this device and report others as they come and go."""

    instance: str
    host: str
    port: int
    txt: Callable[[], dict[str, str]]
    on_hint: Callable[[Hint], None]
    on_goodbye: Callable[[str, str], None]
    ttl: int
    _zc: AsyncZeroconf | None = field(default=None, init=False)
    _browser: AsyncServiceBrowser | None = field(default=None, init=False)
    _info: AsyncServiceInfo | None = field(default=None, init=False)
    # service name -> node id, address; the oldest make room for new ones
    _names: collections.OrderedDict[str, tuple[str, str]] = field(
        default_factory=collections.OrderedDict, init=False
    )
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.instance}.{SERVICE_TYPE}",
            port=self.port,
            properties=self.txt(),
            parsed_addresses=[self.host],
            host_ttl=self.ttl,
            other_ttl=self.ttl,
        )

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=[self.host], ip_version=IPVersion.V4Only)
        self._info = self._service_info()
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._info is not None and name == self._info.name:
            return
        if state_change is ServiceStateChange.Removed:
            known = self._names.pop(name, None)
            if known:
                self.on_goodbye(*known)
            return
        if len(self._tasks) >= MAX_RESOLVING:
            log.debug("not resolving %s: %d look-ups under way", name, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, int(timing.MDNS_RESOLVE_TIMEOUT * 1000)):
            return
        hosts = info.parsed_addresses(IPVersion.V4Only)
        if not hosts or info.port is None:
            return
        hint = parse_hint(info.properties, hosts[0], info.port)
        if hint is not None:
            # Bounded, and never closed to newcomers: names announced with a long TTL
            # and never withdrawn must not keep a new device out.
            self._names.pop(name, None)
            while len(self._names) >= MAX_NAMES:
                self._names.popitem(last=False)
            self._names[name] = (hint.node_id, hint.address)
            self.on_hint(hint)

    async def stop(self) -> None:
        """Send goodbyes and close."""
        for task in self._tasks:
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
