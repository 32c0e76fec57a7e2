"""Tests of the multi-host harness in tests/netns.py: reachability, mDNS multicast and
blocking it, cgroup limits seen from inside a host, partitions, and a teardown that
leaves nothing behind (also after a crash, through cleanup_stale)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import netns
from tests.netns import CgroupError, Cluster, Host, cleanup_stale, require_root_netns, wait_until

REPO = Path(__file__).parent.parent
PY = sys.executable
MiB = 1024 * 1024

# Joins the mDNS group on the interface the 224.0.0.0/4 route names, then collects
# datagrams on port 5353 until the unicast "end" marker arrives.
RECEIVER = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
group = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton("0.0.0.0"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
s.settimeout(10)
print("ready", flush=True)
got = []
while (data := s.recvfrom(2048)[0]) != b"end":
    got.append(data.decode())
print(" ".join(got))
"""

# One multicast datagram to 224.0.0.251:5353, then the "end" marker to each receiver by
# unicast. On one CPU the datagrams cross the bridge in order, so a receiver that gets
# the marker first never gets the multicast.
SENDER = """
import os, socket, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"mdns", ("224.0.0.251", 5353))
for address in sys.argv[1:]:
    s.sendto(b"end", (address, 5353))
"""

ECHO_SERVER = """
import os, socket, sys
server = socket.create_server((sys.argv[1], 9999))
print("ready", os.getpid(), flush=True)
server.settimeout(10)
conn, (peer, _) = server.accept()
conn.sendall(conn.recv(100) + f" from {peer}".encode())
"""

ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], 9999), timeout=10) as c:
    c.sendall(b"hello")
    print(b"".join(iter(lambda: c.recv(100), b"")).decode())
"""

# What a process sees of its cgroups from inside a host, v1 or v2.
CGROUP_REPORT = """
import json
from pathlib import Path
from hsmdifd.placement.profile import read_cgroup_memory

paths = {}
for line in Path("/proc/self/cgroup").read_text().splitlines():
    _, controllers, path = line.split(":", 2)
    for controller in controllers.split(",") if controllers else ["v2"]:
        paths[controller] = path

def limit_file(controller, v1_name, v2_name):
    if controller in paths:
        return Path("/sys/fs/cgroup", controller, paths[controller].lstrip("/"), v1_name)
    return Path("/sys/fs/cgroup", paths["v2"].lstrip("/"), v2_name)

memory = limit_file("memory", "memory.limit_in_bytes", "memory.max").read_text().split()
cpu_file = limit_file("cpu", "cpu.cfs_quota_us", "cpu.max")
cpu = cpu_file.read_text().split()
if "cpu" in paths:
    cpu.append((cpu_file.parent / "cpu.cfs_period_us").read_text().strip())
limit = int(memory[0]) if memory[0] != "max" and int(memory[0]) < 2**62 else None
quota = int(cpu[0]) / int(cpu[1]) if cpu[0] not in ("max", "-1") else None
print(json.dumps({
    "memory_path": paths.get("memory", paths.get("v2")),
    "memory_limit": limit,
    "cpu_quota": quota,
    "profile_limit": read_cgroup_memory().limit_bytes,
}))
"""


@pytest.fixture(scope="module")
def netns_ready() -> None:
    require_root_netns()
    cleanup_stale()


def multicast_heard(sender: Host, receivers: list[Host]) -> dict[int, bool]:
    """Send one mDNS datagram from `sender`; which receivers heard it."""
    procs = [r.popen([PY, "-c", RECEIVER], stdout=subprocess.PIPE, text=True) for r in receivers]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
    sender.run([PY, "-c", SENDER, *(r.address for r in receivers)], check=True, timeout=30)
    heard = {}
    for r, proc in zip(receivers, procs, strict=True):
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0
        heard[r.index] = out.split() == ["mdns"]
    return heard


def root_network() -> str:
    """Links, addresses and routes of the machine's own network namespace."""
    return "".join(
        subprocess.run(["ip", "-o", *args], capture_output=True, text=True, check=True).stdout
        for args in (["link"], ["addr"], ["route"], ["-4", "route", "show", "table", "all"])
    )


def namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_hosts_reach_each_other_and_talk_tcp_on_9999() -> None:
    with Cluster(3) as cluster:
        assert [h.address for h in cluster] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        for a in cluster:
            for b in cluster:
                assert a is b or a.can_reach(b.address), f"{a.address} -> {b.address}"
        server, client = cluster[0], cluster[1]
        proc = server.popen([PY, "-c", ECHO_SERVER, server.address], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        # The wrappers exec: the pid is the server's own, so signals reach it.
        assert proc.stdout.readline().split() == [b"ready", str(proc.pid).encode()]
        reply = client.run(
            [PY, "-c", ECHO_CLIENT, server.address],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert reply.stdout.strip() == f"hello from {client.address}"
        proc.communicate(timeout=10)
        assert proc.returncode == 0


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_mdns_multicast_crosses_the_bridge_until_blocked() -> None:
    with Cluster(3) as cluster:
        a, b, c = cluster
        assert multicast_heard(a, [b, c]) == {1: True, 2: True}
        cluster.block_multicast()
        assert multicast_heard(a, [b, c]) == {1: False, 2: False}
        assert a.can_reach(b.address)  # unicast (and ARP) still work
        cluster.unblock_multicast()
        assert multicast_heard(c, [a, b]) == {0: True, 1: True}


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_block_multicast_for_one_host_blocks_both_directions() -> None:
    with Cluster(3) as cluster:
        a, b, c = cluster
        cluster.block_multicast(c)
        assert multicast_heard(a, [b, c]) == {1: True, 2: False}
        assert multicast_heard(c, [a, b]) == {0: False, 1: False}
        assert c.can_reach(a.address)
        cluster.unblock_multicast(c)
        assert multicast_heard(c, [a, b]) == {0: True, 1: True}


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_memory_limit_and_cpu_quota_are_seen_inside_a_host() -> None:
    with Cluster(2, memory_limit_bytes=[256 * MiB, None], cpu_quota=[0.5, None]) as cluster:
        limited, free = cluster
        proc = limited.popen([PY, "-c", CGROUP_REPORT], cwd=REPO, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        seen = json.loads(out)
        assert seen["memory_path"].endswith(f"/{cluster.run_id}/h0")
        assert seen["memory_limit"] == seen["profile_limit"] == 256 * MiB
        assert seen["cpu_quota"] == 0.5

        report = free.run([PY, "-c", CGROUP_REPORT], cwd=REPO, capture_output=True, check=True)
        seen = json.loads(report.stdout)
        assert seen["memory_path"].endswith(f"/{cluster.run_id}/h1")
        assert seen["memory_limit"] is None
        assert seen["cpu_quota"] is None


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_partition_cuts_a_host_off_and_heal_brings_it_back() -> None:
    with Cluster(2) as cluster:
        a, b = cluster
        assert a.can_reach(b.address)
        cluster.partition(b)
        assert not a.can_reach(b.address, timeout=0.5)
        assert not b.can_reach(a.address, timeout=0.5)
        cluster.heal(b)
        wait_until(lambda: a.can_reach(b.address) and b.can_reach(a.address), 5, "healed")


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_teardown_leaves_nothing_behind_even_when_the_test_fails() -> None:
    before = root_network()
    pids: set[int] = set()
    cluster = Cluster(2, memory_limit_bytes=64 * MiB)
    with pytest.raises(RuntimeError, match="the test failed"), cluster:
        a, b = cluster
        a.popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])  # a process tree
        b.popen(["setsid", "sleep", "60"])  # a session of its own
        wait_until(lambda: len(a.pids()) == 3 and len(b.pids()) == 1, 5, "processes started")
        pids = a.pids() | b.pids()
        assert all(d.is_dir() for h in cluster for d in h.cgroups)
        assert root_network() == before  # the machine's own network is untouched
        raise RuntimeError("the test failed")

    assert not [p for p in pids if alive(p)]
    assert cluster.run_id not in namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert cluster.run_hex not in links.stdout
    assert "10.213." not in root_network()
    assert cluster.cgroup_parents
    assert not [p for p in cluster.cgroup_parents if p.exists()]


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_cgroup_failure_raises_and_removes_what_was_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n")
    monkeypatch.setattr(netns, "MOUNTINFO", mountinfo)
    cluster = Cluster(2, memory_limit_bytes=64 * MiB)
    with pytest.raises(CgroupError, match="no cgroup hierarchy has the memory controller"):
        cluster.start()
    assert cluster.run_id not in namespaces()


CRASHING_RUN = """
import os, signal, subprocess, sys
from tests.netns import Cluster, wait_until
cluster = Cluster(2, memory_limit_bytes=64 << 20, prefix=sys.argv[1])
cluster.start()
proc = cluster[1].popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wait_until(lambda: proc.pid in cluster[1].pids(), 5, "sleep started")
print(cluster.run_id, proc.pid, *cluster.cgroup_parents, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.netns
@pytest.mark.usefixtures("netns_ready")
def test_cleanup_stale_removes_a_crashed_run_and_spares_a_live_one() -> None:
    # A prefix of this test's own, so that parallel sessions leave its leftovers alone.
    prefix = f"t{secrets.token_hex(3)}"
    crashed = subprocess.run(
        [PY, "-c", CRASHING_RUN, prefix],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_id, pid, *parents = crashed.stdout.split()
    assert run_id in namespaces()
    assert alive(int(pid))
    assert all(Path(p).is_dir() for p in parents)

    with Cluster(1, memory_limit_bytes=64 * MiB, prefix=prefix) as live:
        removed = cleanup_stale(prefix)
        assert f"{run_id}-sw" in removed
        assert run_id not in namespaces()
        assert not alive(int(pid))
        assert not [p for p in parents if Path(p).exists()]
        assert live.run_id in namespaces()
        assert all(p.is_dir() for p in live.cgroup_parents)
        assert live[0].can_reach(live[0].address)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Cluster(0), "at least one host"),
        (lambda: Cluster(300), "room for 254 hosts"),
        (lambda: Cluster(2, memory_limit_bytes=[MiB]), "1 values for 2 hosts"),
        (lambda: Cluster(2, cpu_quota=-1.0), "must be positive"),
        (lambda: Cluster(1, prefix="Bad-Prefix"), "prefix"),
        (lambda: Cluster(1)[0].run(["true"], shell=True), "shell=True"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_made(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_require_root_netns_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(netns, "_netns_problem", lambda: "no namespaces here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no namespaces here"):
        require_root_netns()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no namespaces here"):
        require_root_netns()
