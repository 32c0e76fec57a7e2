"""Multi-host test clusters on one machine: network namespaces joined by a bridge.

Every host is a network namespace with one veth interface. The other ends of the
veths sit on a bridge in a namespace of its own (the "switch"), so the machine's own
network namespace gets no interface, address or route. Addresses come from a private
block (10.213.0.0/24 unless told otherwise) that exists only inside these namespaces.
The bridge floods multicast (snooping off) and every host routes 224.0.0.0/4 to its
interface, so mDNS works between hosts as on a home LAN.

A host can have a memory limit and a CPU quota: one cgroup per host (v2, or v1 on
hybrid machines), created under a parent named after the run. Processes started with
`Host.run` and `Host.popen` join the host's cgroups before they enter the namespace,
and see the cgroup filesystems inside it at the usual places (`ip netns exec`
remounts /sys, which would hide them).

Names carry a random run id, the creator's pid and its start time
(`hsm1a2b3c-4242-98765-h0`), so parallel runs never collide and `cleanup_stale()`
can tell leftovers of a crashed run from those of a live one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

SUBNET = "10.213.0.0/24"
PREFIX = "hsm"
MULTICAST_NET = "224.0.0.0/4"
NETNS_DIR = Path("/run/netns")
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CPU_PERIOD_US = 100_000
SETUP_TIMEOUT = 10.0
TEARDOWN_TIMEOUT = 10.0

# Classic BPF for a tc ingress filter: drop frames whose destination MAC is IPv4
# multicast (01:...) or IPv6 multicast (33:33:...); pass everything else,
# broadcast (ARP) included. Offset 0xffe00000 is SKF_LL_OFF, the link-layer header.
_DROP_MULTICAST_BPF = "5,48 0 0 4292870144,21 1 0 1,21 0 1 51,6 0 0 2,6 0 0 0"

Command = Sequence[str | os.PathLike[str]]


class NetnsError(RuntimeError):
    """A namespace, link or route could not be set up or removed."""


class CgroupError(NetnsError):
    """A cgroup for a host's memory limit or CPU quota could not be created."""


# --- small helpers -----------------------------------------------------------------


@functools.cache
def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise NetnsError(f"{name} is not installed")
    return path


def _run(argv: Sequence[str], input: str | None = None) -> str:
    """Run a setup command; raise NetnsError with its stderr when it fails."""
    result = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        command = shlex.join(argv)
        raise NetnsError(f"{command} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _ip(*args: str, ns: str | None = None) -> str:
    return _run([_tool("ip"), *(["-n", ns] if ns else []), *args])


def _ip_batch(lines: Sequence[str], ns: str | None = None) -> None:
    """Several `ip` commands in one process; stops at the first that fails."""
    _run([_tool("ip"), *(["-n", ns] if ns else []), "-batch", "-"], input="\n".join(lines) + "\n")


def _delete_netns(name: str) -> None:
    """Delete namespace `name`; one that another cleanup removed first is fine."""
    if not (NETNS_DIR / name).exists():
        return
    try:
        _ip("netns", "delete", name)
    except NetnsError:
        if (NETNS_DIR / name).exists():
            raise


def _json(argv: Sequence[str]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(_run(argv) or "[]")
    return result


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _creator_alive(pid: int, start: int) -> bool:
    return _start_time(pid) == start


def _netns_pids(name: str) -> set[int]:
    """Processes in namespace `name` (what `ip netns pids` prints)."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return set()
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, a zombie, or a kernel thread
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            pids.add(int(entry.name))
    return pids


def _cgroup_pids(directory: Path) -> set[int]:
    """Processes in cgroup `directory` and below."""
    pids: set[int] = set()
    for root, _dirs, _files in os.walk(directory):  # a cgroup removed meanwhile is skipped
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in Path(root, "cgroup.procs").read_text().split())
    return pids


def _kill(pids: set[int]) -> None:
    for pid in pids - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_until_gone(
    find: Callable[[], set[int]], deadline: float, reap: Callable[[], object] = lambda: None
) -> None:
    """SIGKILL what `find` returns until it returns nothing (new children included)."""
    while remaining := find() - {os.getpid()}:
        _kill(remaining)
        reap()
        if time.monotonic() >= deadline:
            raise NetnsError(f"processes {sorted(remaining)} survive SIGKILL")
        time.sleep(0.01)


# --- cgroups -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    """One line of /proc/self/mountinfo."""

    root: str
    mountpoint: Path
    fstype: str
    options: tuple[str, ...]  # superblock options without rw/ro


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[_Mount]:
    mounts = []
    for line in MOUNTINFO.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _source, superopts) = left.split(), right.split(" ", 2)
        options = tuple(o for o in superopts.split(",") if o not in ("rw", "ro"))
        mounts.append(_Mount(_unescape(fields[3]), Path(_unescape(fields[4])), fstype, options))
    return mounts


def _cgroup_mounts() -> list[_Mount]:
    """The cgroup filesystems under /sys, with the tmpfs holding them, parents first."""
    cgroups = [
        m
        for m in _mounts()
        if m.fstype in ("cgroup", "cgroup2") and m.mountpoint.is_relative_to("/sys")
    ]
    holders = [
        m
        for m in _mounts()
        if m.fstype == "tmpfs" and any(c.mountpoint.is_relative_to(m.mountpoint) for c in cgroups)
    ]
    return sorted(holders + cgroups, key=lambda m: len(m.mountpoint.parts))


def _remount_script() -> str:
    """Shell lines mounting the cgroup filesystems again inside `ip netns exec`.

    With the options they have outside: mounting cgroup2 with other flags (nsdelegate,
    memory_recursiveprot) would change those flags for the whole machine.
    """
    lines = ["set -e"]
    for m in _cgroup_mounts():
        opts = ["-o", ",".join(m.options)] if m.options else []
        where = shlex.quote(str(m.mountpoint))
        lines.append(f"mkdir -p {where}")
        lines.append(shlex.join(["mount", "-t", m.fstype, *opts, m.fstype, str(m.mountpoint)]))
    return "\n".join([*lines, 'exec "$@"'])


@dataclass(frozen=True)
class _Hierarchy:
    """Where the cgroups for some controllers go: a v1 or v2 hierarchy and a base."""

    version: int
    mountpoint: Path
    base: Path  # the run's parent cgroup is created here
    controllers: tuple[str, ...]


def _own_cgroup(mount: _Mount, controller: str | None) -> Path:
    """This process's cgroup directory in `mount` (v1 for `controller`, or v2)."""
    for line in PROC_CGROUP.read_text().splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        v2_line = hierarchy == "0" and controllers == ""
        if (controller is None and v2_line) or (
            controller is not None and controller in controllers.split(",")
        ):
            relative = os.path.relpath(path, mount.root) if path.startswith(mount.root) else "."
            return (mount.mountpoint / relative).resolve()
    return mount.mountpoint


def _v2_base(mountpoint: Path, own: Path, controllers: Sequence[str]) -> Path:
    """The innermost cgroup from ours up to the root whose children get `controllers`.

    A v2 cgroup that holds processes cannot hand controllers to its children (except
    the root), so this walks up until enabling them works.
    """
    errors = []
    for candidate in [own, *own.parents]:
        if not candidate.is_relative_to(mountpoint):
            break
        try:
            enabled = (candidate / "cgroup.subtree_control").read_text().split()
            missing = [c for c in controllers if c not in enabled]
            if missing:
                (candidate / "cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in missing)
                )
            return candidate
        except OSError as e:
            errors.append(f"{candidate}: {e.strerror}")
    raise CgroupError(
        f"cannot enable the {', '.join(controllers)} controller(s) for child cgroups "
        f"anywhere from {own} up to {mountpoint}: {'; '.join(errors)}"
    )


def _hierarchies(controllers: Sequence[str]) -> list[_Hierarchy]:
    """Where each controller lives: v2 when it is enabled there, else v1."""
    mounts = _cgroup_mounts()
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2_available = (
        (v2.mountpoint / "cgroup.controllers").read_text().split() if v2 is not None else []
    )
    found: list[_Hierarchy] = []
    v2_wanted = [c for c in controllers if c in v2_available]
    if v2 is not None and v2_wanted:
        own = _own_cgroup(v2, None)
        base = _v2_base(v2.mountpoint, own, v2_wanted)
        found.append(_Hierarchy(2, v2.mountpoint, base, tuple(v2_wanted)))
    for controller in controllers:
        if controller in v2_wanted:
            continue
        v1 = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if v1 is None:
            raise CgroupError(
                f"no cgroup hierarchy has the {controller} controller "
                f"(not enabled in cgroup v2 and no v1 {controller} hierarchy is mounted)"
            )
        found.append(_Hierarchy(1, v1.mountpoint, _own_cgroup(v1, controller), (controller,)))
    return found


def _limit_files(
    version: int, controller: str, memory: int | None, cpu: float | None
) -> dict[str, str]:
    if controller == "memory" and memory is not None:
        return {"memory.max" if version == 2 else "memory.limit_in_bytes": str(memory)}
    if controller == "cpu" and cpu is not None:
        quota = max(1000, round(cpu * CPU_PERIOD_US))
        if version == 2:
            return {"cpu.max": f"{quota} {CPU_PERIOD_US}"}
        return {"cpu.cfs_period_us": str(CPU_PERIOD_US), "cpu.cfs_quota_us": str(quota)}
    return {}


def _join(directory: Path) -> str:
    """Shell that moves itself into host cgroup `directory`: v1 the directory itself;
    v2 a child of its own, so that the host's cgroup holds no process and a daemon may
    lay out its cgroup as under systemd (v2 forbids processes in a cgroup whose
    children have controllers)."""
    where = shlex.quote(str(directory))
    if not (directory / "cgroup.controllers").exists():
        return f"echo $$ > {where}/cgroup.procs"
    return f"mkdir -p {where}/p$$ && echo $$ > {where}/p$$/cgroup.procs"


def _remove_cgroup_tree(directory: Path, deadline: float) -> None:
    """Kill what runs in `directory` and remove it with its children."""
    while True:
        _kill(_cgroup_pids(directory))
        try:
            for root, _dirs, _files in os.walk(directory, topdown=False):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(root)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise NetnsError(f"cannot remove cgroup {directory}: {e.strerror}") from e
        time.sleep(0.02)


# --- the cluster ---------------------------------------------------------------------


@dataclass(eq=False)
class Host:
    """One host: a network namespace with one interface on the cluster's bridge."""

    cluster: Cluster = field(repr=False)
    index: int
    name: str  # the network namespace
    address: str
    interface: str  # inside the host's namespace
    port: str  # the other end of the veth, on the bridge in the switch namespace
    cgroups: tuple[Path, ...] = ()  # one directory per cgroup hierarchy in use

    def command(self, cmd: Command) -> list[str]:
        """The argv that runs `cmd` in this host's namespace and cgroups.

        For starting processes some other way (asyncio); the cluster still kills them
        on exit, as they run in its namespace.
        """
        argv = [
            _tool("ip"),
            "netns",
            "exec",
            self.name,
            _tool("sh"),
            "-c",
            self.cluster.remount_script,
            "sh",
            *(os.fspath(c) for c in cmd),
        ]
        if not self.cgroups:
            return argv
        joins = " && ".join(_join(d) for d in self.cgroups)
        return [_tool("sh"), "-c", f'{joins} && exec "$@"', "sh", *argv]

    def run(self, cmd: Command, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` inside this host."""
        _refuse_shell(kw)
        return subprocess.run(self.command(cmd), **kw)  # noqa: PLW1510 (the caller's choice)

    def popen(self, cmd: Command, **kw: Any) -> subprocess.Popen[Any]:
        """Start `cmd` inside this host; its pid is the command's own (the wrappers exec).

        The cluster kills it, and anything else left in the namespace, on exit.
        """
        _refuse_shell(kw)
        proc = subprocess.Popen(self.command(cmd), **kw)
        self.cluster.processes.append(proc)
        return proc

    def pids(self) -> set[int]:
        """Every process now running in this host's namespace."""
        return _netns_pids(self.name)

    def can_reach(self, address: str, timeout: float = 1.0) -> bool:
        """Whether `address` answers from here: ping, or a TCP connect where ping is missing.

        Without ping, a connection refused counts as an answer: the reply came back.
        """
        if shutil.which("ping"):
            wait = str(max(1, math.ceil(timeout)))
            ping = self.run(["ping", "-c1", "-W", wait, address], capture_output=True, check=False)
            return ping.returncode == 0
        probe = self.run(
            [sys.executable, "-c", _TCP_PROBE, address, str(timeout)],
            capture_output=True,
            check=False,
            timeout=timeout + 30,
        )
        return probe.returncode == 0


_TCP_PROBE = """\
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[2]))
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    pass
except OSError:
    sys.exit(1)
"""


def _refuse_shell(kw: dict[str, Any]) -> None:
    if kw.get("shell"):
        raise ValueError("shell=True is not supported: pass ['sh', '-c', ...] as the command")


def _per_host(value: Any, n: int, what: str) -> list[Any]:
    if value is None or isinstance(value, int | float):
        values = [value] * n
    else:
        values = list(value)
        if len(values) != n:
            raise ValueError(f"{what} has {len(values)} values for {n} hosts")
    for v in values:
        if v is not None and not v > 0:
            raise ValueError(f"{what} must be positive, not {v}")
    return values


class Cluster:
    """N hosts on one bridge; a context manager that removes everything on exit.

    `memory_limit_bytes` and `cpu_quota` (in CPUs: 0.5 is half a core) take one value
    for every host or one per host (None: no limit on that host).
    """

    def __init__(
        self,
        n: int,
        *,
        subnet: str = SUBNET,
        memory_limit_bytes: int | Sequence[int | None] | None = None,
        cpu_quota: float | Sequence[float | None] | None = None,
        prefix: str = PREFIX,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one host")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"prefix must be 1-8 lowercase letters or digits, not {prefix!r}")
        network = ipaddress.IPv4Network(subnet)
        addresses = [str(a) for a in itertools.islice(network.hosts(), n)]
        if len(addresses) < n:
            raise ValueError(f"{subnet} has room for {len(addresses)} hosts, not {n}")
        self.memory_limits: list[int | None] = _per_host(
            memory_limit_bytes, n, "memory_limit_bytes"
        )
        self.cpu_quotas: list[float | None] = _per_host(cpu_quota, n, "cpu_quota")
        self.run_hex = secrets.token_hex(3)
        pid = os.getpid()
        self.run_id = f"{prefix}{self.run_hex}-{pid}-{_start_time(pid)}"
        self.switch = f"{self.run_id}-sw"
        self.bridge = f"br{self.run_hex}"
        self.prefixlen = network.prefixlen
        self.hosts = [
            Host(self, i, f"{self.run_id}-h{i}", a, f"v{self.run_hex}h{i}", f"v{self.run_hex}s{i}")
            for i, a in enumerate(addresses)
        ]
        self.processes: list[subprocess.Popen[Any]] = []
        self.cgroup_parents: list[Path] = []
        self.remount_script = 'exec "$@"'
        self._started = False
        self._closed = False

    # Access to hosts.
    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this cluster: the switch, then the hosts."""
        return [self.switch, *(h.name for h in self.hosts)]

    # Lifecycle.
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetnsError as e:
            if exc is None:
                raise
            warnings.warn(f"cluster teardown after {exc_type}: {e}", stacklevel=2)

    def start(self) -> None:
        """Create the namespaces, the bridge, the links and the cgroups."""
        if self._started:
            raise RuntimeError("a Cluster can be started once")
        self._started = True
        atexit.register(self.close)
        try:
            self._create_network()
            if any(self.memory_limits) or any(self.cpu_quotas):
                self._create_cgroups()
            self.remount_script = _remount_script()
            self._wait_links_up(self.hosts)
            check = self.hosts[0].run(["true"], capture_output=True, text=True, check=False)
            if check.returncode != 0:
                raise NetnsError(f"cannot start a process on a host: {check.stderr.strip()}")
        except BaseException:
            self.close()
            raise

    def _create_network(self) -> None:
        _ip_batch([f"netns add {name}" for name in self.namespaces])
        _ip_batch(
            [
                "link set lo up",
                f"link add {self.bridge} type bridge stp_state 0 mcast_snooping 0",
                f"link set {self.bridge} up",
                *(
                    line
                    for h in self.hosts
                    for line in (
                        f"link add {h.port} type veth peer name {h.interface} netns {h.name}",
                        f"link set {h.port} master {self.bridge}",
                        f"link set {h.port} up",
                    )
                ),
            ],
            ns=self.switch,
        )
        for h in self.hosts:
            _ip_batch(
                [
                    "link set lo up",
                    f"addr add {h.address}/{self.prefixlen} dev {h.interface}",
                    f"link set {h.interface} multicast on up",
                    f"route add {MULTICAST_NET} dev {h.interface}",
                ],
                ns=h.name,
            )
        bridge = _json([_tool("ip"), "-n", self.switch, "-d", "-j", "link", "show", self.bridge])
        if bridge[0]["linkinfo"]["info_data"].get("mcast_snooping") != 0:
            raise NetnsError(f"multicast snooping is still on for {self.bridge}")

    def _create_cgroups(self) -> None:
        wanted = [
            c
            for c, limits in (("memory", self.memory_limits), ("cpu", self.cpu_quotas))
            if any(limits)
        ]
        dirs: list[list[Path]] = [[] for _ in self.hosts]
        for hierarchy in _hierarchies(wanted):
            parent = hierarchy.base / self.run_id
            try:
                parent.mkdir()
                self.cgroup_parents.append(parent)
                if hierarchy.version == 2:
                    controls = " ".join(f"+{c}" for c in hierarchy.controllers)
                    (parent / "cgroup.subtree_control").write_text(controls)
                for h in self.hosts:
                    directory = parent / f"h{h.index}"
                    directory.mkdir()
                    if hierarchy.version == 2:  # its processes go one level down: _join
                        (directory / "cgroup.subtree_control").write_text(controls)
                    dirs[h.index].append(directory)
                    for controller in hierarchy.controllers:
                        files = _limit_files(
                            hierarchy.version,
                            controller,
                            self.memory_limits[h.index],
                            self.cpu_quotas[h.index],
                        )
                        for file, value in files.items():
                            (directory / file).write_text(value)
            except OSError as e:
                raise CgroupError(
                    f"cannot set up cgroup v{hierarchy.version} "
                    f"{'+'.join(hierarchy.controllers)} under {hierarchy.base}: {e}"
                ) from e
        for h in self.hosts:
            h.cgroups = tuple(dirs[h.index])

    def _wait_links_up(self, hosts: Sequence[Host]) -> None:
        """Wait until the hosts' interfaces have carrier and their ports forward."""

        def ready() -> bool:
            ports = _json([_tool("bridge"), "-n", self.switch, "-j", "link", "show"])
            forwarding = {p["ifname"] for p in ports if p.get("state") == "forwarding"}
            for h in hosts:
                link = _json([_tool("ip"), "-n", h.name, "-j", "link", "show", h.interface])
                if h.port not in forwarding or "LOWER_UP" not in link[0]["flags"]:
                    return False
            return True

        wait_until(ready, SETUP_TIMEOUT, "links up and bridge ports forwarding")

    def close(self) -> None:
        """Kill every process, then remove namespaces (links go with them) and cgroups."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        deadline = time.monotonic() + TEARDOWN_TIMEOUT
        errors = []
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        try:
            self._kill_everything(deadline)
        except NetnsError as e:
            errors.append(str(e))
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for name in self.namespaces:
            try:
                _delete_netns(name)
            except NetnsError as e:
                errors.append(str(e))
        for parent in self.cgroup_parents:
            try:
                _remove_cgroup_tree(parent, deadline)
            except (OSError, NetnsError) as e:
                errors.append(str(e))
        if errors:
            raise NetnsError("teardown left things behind: " + "; ".join(errors))

    def _kill_everything(self, deadline: float) -> None:
        def find() -> set[int]:
            found = [_netns_pids(name) for name in self.namespaces]
            found += [_cgroup_pids(parent) for parent in self.cgroup_parents]
            return set().union(*found)

        def reap() -> None:  # our own children would linger as zombies
            for proc in self.processes:
                proc.poll()

        _kill_until_gone(find, deadline, reap)

    # Faults.
    def block_multicast(self, host: Host | None = None) -> None:
        """Stop multicast (mDNS among it) between hosts; IPv4 unicast and ARP keep working.

        With no host, the bridge floods multicast to no port. With a host, that host
        neither receives multicast (its port is left out of flooding) nor sends any (a
        tc filter drops multicast frames arriving from it). IPv6 neighbour discovery is
        multicast too, so IPv6 between the hosts stops as well.
        """
        targets = self.hosts if host is None else [host]
        for h in targets:
            self._switch("bridge", "link", "set", "dev", h.port, "mcast_flood", "off")
            if host is not None:
                self._switch("tc", "qdisc", "replace", "dev", h.port, "clsact")
                self._switch(
                    *("tc", "filter", "replace", "dev", h.port, "ingress", "pref", "1"),
                    *("handle", "1", "bpf", "bytecode", _DROP_MULTICAST_BPF, "direct-action"),
                )
        ports = _json([_tool("bridge"), "-n", self.switch, "-d", "-j", "link", "show"])
        names = {h.port for h in targets}
        flooding = [p["ifname"] for p in ports if p["ifname"] in names and p.get("mcast_flood")]
        if flooding:
            raise NetnsError(f"multicast flooding is still on for ports {flooding}")

    def unblock_multicast(self, host: Host | None = None) -> None:
        """Undo `block_multicast` for one host or all."""
        for h in self.hosts if host is None else [host]:
            self._switch("bridge", "link", "set", "dev", h.port, "mcast_flood", "on")
            with contextlib.suppress(NetnsError):  # no filter was there
                self._switch("tc", "qdisc", "del", "dev", h.port, "clsact")

    def _switch(self, tool: str, *args: str) -> str:
        """Run an iproute2 `tool` in the switch namespace."""
        return _run([_tool(tool), "-n", self.switch, *args])

    def partition(self, host: Host) -> None:
        """Cut `host` off the bridge, as a pulled cable: its interface loses carrier."""
        self._switch("ip", "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        """Reconnect a partitioned host and wait until its port forwards again."""
        self._switch("ip", "link", "set", host.port, "up")
        self._wait_links_up([host])


# --- pytest helpers and stale runs ------------------------------------------------


@functools.cache
def _netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "bridge", "sh"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"network namespace tests need {tool} (iproute2)"
    pid = os.getpid()
    probe = f"{PREFIX}{secrets.token_hex(3)}-{pid}-{_start_time(pid)}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "delete", probe)
    except NetnsError as e:
        return f"ip netns is unusable here: {e}"
    return None


def require_root_netns() -> None:
    """Skip the calling test when namespaces are unusable; fail instead when CI=true."""
    problem = _netns_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem} (CI=true: a skipped cluster test is a failure)", pytrace=False)
    pytest.skip(problem)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces and cgroups left by runs whose creating process is gone.

    Returns what was removed. Leftovers of live runs (parallel sessions) are kept.
    """
    pattern = re.compile(rf"{re.escape(prefix)}[0-9a-f]{{6}}-(\d+)-(\d+)")
    removed = []
    names = sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []
    stale = []
    for name in names:
        match = re.fullmatch(pattern.pattern + r"-[a-z0-9]+", name)
        if match and not _creator_alive(int(match[1]), int(match[2])):
            stale.append(name)
    deadline = time.monotonic() + TEARDOWN_TIMEOUT
    _kill_until_gone(lambda: set().union(*(_netns_pids(n) for n in stale)), deadline)
    for name in stale:
        _delete_netns(name)
        removed.append(name)
    for mount in _cgroup_mounts():
        if mount.fstype not in ("cgroup", "cgroup2"):
            continue
        for root, subdirs, _files in os.walk(mount.mountpoint):
            for subdir in list(subdirs):
                match = pattern.fullmatch(subdir)
                if match:
                    subdirs.remove(subdir)
                    if not _creator_alive(int(match[1]), int(match[2])):
                        _remove_cgroup_tree(Path(root, subdir), deadline)
                        removed.append(str(Path(root, subdir)))
    return removed
