"""Faults the cluster must ride out on real hosts: a long partition that heals, a device
that stood still and wakes, and a link that works one way only."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, stop_all
from tests.netns import Cluster, require_root_netns
from tests.test_cluster import Nodes, agree, root_seen_by, start_agreeing, status_of, wait_until

pytestmark = pytest.mark.netns


@pytest.fixture
def nodes(short_dir: Path, tiny_model: Path) -> Iterator[Nodes]:
    require_root_netns()
    n = Nodes(short_dir, tiny_model)
    yield n
    stop_all(n.daemons)


def roots_seen(d: Daemon, seconds: float) -> list[str]:
    """The root `d` names, read every 20 ms for `seconds`, with repeats collapsed."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        root = root_seen_by(d)
        if not seen or seen[-1] != root:
            seen.append(root)
        time.sleep(0.02)
    return seen


def test_a_long_partition_heals_within_seconds(nodes: Nodes) -> None:
    """Cut off for longer than TCP's retransmission backs off, two devices agree again
    within a few seconds of the cable coming back (keepalive on the peer channels);
    before, the old connection hung on retransmission for 25-50 s."""
    with Cluster(2) as cluster:
        daemons, _, (worker,) = start_agreeing(nodes, cluster)
        cut = cluster.hosts[daemons.index(worker)]
        cluster.partition(cut)
        wait_until(lambda: root_seen_by(worker) == worker.dir.name, 20, "the cut-off host alone")
        time.sleep(35)
        cluster.heal(cut)
        took = wait_until(lambda: agree(daemons), 20, "agreement after the heal")
        print(f"agreed {took:.2f} s after a 35 s partition healed")
        assert took < 10, f"{took:.1f} s to agree after the heal"


def test_a_woken_device_does_not_name_itself_root(nodes: Nodes) -> None:
    """A worker stopped for longer than dead_after wakes with old heartbeats: it keeps
    following the root it knew until its peers answer, so its view moves at most once."""
    with Cluster(3) as cluster:
        _, root, workers = start_agreeing(nodes, cluster)
        sleeper = workers[0]
        assert sleeper.proc is not None
        sleeper.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            sleeper.proc.send_signal(signal.SIGCONT)
        seen = roots_seen(sleeper, 3)
        assert sleeper.dir.name not in seen, seen
        assert seen == [root.dir.name], seen


def test_a_link_that_works_one_way_still_carries_the_policy(nodes: Nodes) -> None:
    """h0 cannot open a connection to h1, h1 can to h0: a policy set on h0 reaches h1 in
    h0's answer to h1's heartbeat, and both follow the same root."""
    with Cluster(2) as cluster:
        daemons = [nodes.start(h, f"h{h.index}") for h in cluster.hosts]
        wait_until(lambda: agree(daemons), 20, "agreement")
        h0, h1 = cluster.hosts
        script = (
            "add table inet oneway\n"
            "add chain inet oneway out { type filter hook output priority 0; }\n"
            f"add rule inet oneway out ip daddr {h1.address} tcp dport 9999 "
            "tcp flags syn drop\n"
        )
        h0.run(["nft", "-f", "-"], input=script, text=True, check=True)
        # The connection h0 had open to h1 goes; h0 cannot make a new one.
        before = status_of(daemons[0])["policy"]["version"]
        other = "h1" if status_of(daemons[0])["root"] == "h0" else "h0"
        r = daemons[0].ctl("devices", "--priority", other)
        assert r.returncode == 0, r.stderr

        def both_follow() -> bool:
            views = [status_of(d) for d in daemons]
            return all(v["policy"]["version"] == before + 1 and v["root"] == other for v in views)

        wait_until(both_follow, 20, f"both devices on the new policy, following {other}")
