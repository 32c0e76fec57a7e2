"""The cluster on real hosts: network namespaces on a bridge, one real hsmdifd each."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster.cluster_secret import write_secret_file
from tests.conftest import Daemon, slow_model, stop_all, write_config
from tests.netns import Cluster, Host, require_root_netns

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    require_root_netns()


class Nodes:
    """Daemons on the hosts of a test cluster; every one stopped afterwards."""

    def __init__(self, base: Path, model: Path) -> None:
        self.base = base
        self.model = model
        self.secret = base / "cluster.secret"
        write_secret_file(self.secret)
        self.daemons: list[Daemon] = []

    def start(
        self, host: Host, name: str, *extra: str, secret: Path | None = None, state: str = ""
    ) -> Daemon:
        directory = self.base / name
        directory.mkdir()
        config = write_config(directory / "hsmdifd.toml", self.model)
        d = Daemon(dir=directory, config=config, host=host, mdns=True)
        d.extra_args = [
            "--name",
            name,
            "--secret-file",
            str(secret or self.secret),
            *extra,
        ]
        if state:
            shutil.copytree(self.base / state / "state", d.state_dir)
        d.start()
        self.daemons.append(d)
        return d


@pytest.fixture
def nodes(short_dir: Path, tiny_model: Path) -> Iterator[Nodes]:
    n = Nodes(short_dir, tiny_model)
    yield n
    stop_all(n.daemons)


def root_seen_by(d: Daemon) -> str:
    """The root `d` names, over the control socket directly (fast enough to time)."""
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        return str(pb_grpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=5).root_name)


def status_of(d: Daemon) -> dict[str, Any]:
    """What `hsmdifctl --json status` says on one daemon."""
    status = d.ctl("--json", "status", timeout=30)
    assert status.returncode == 0, status.stderr
    result: dict[str, Any] = json.loads(status.stdout)
    return result


def root_queue(d: Daemon) -> tuple[int, int, int]:
    """The root's answers in flight, requests waiting and bound, as `d`'s status says."""
    s = status_of(d)
    return s["in_flight"], s["queued"], s["max_queue"]


def view(d: Daemon) -> dict[str, Any]:
    """What one daemon says: its status and its device list."""
    devices = d.ctl("--json", "devices", timeout=30)
    assert devices.returncode == 0, devices.stderr
    return {"status": status_of(d), "devices": json.loads(devices.stdout)}


def alive_names(v: dict[str, Any]) -> set[str]:
    return {d["name"] for d in v["devices"] if d["state"] == "alive"}


def agree(daemons: list[Daemon], root: str | None = None) -> bool:
    """Every daemon sees all the others alive and names the same root."""
    names = {d.dir.name for d in daemons}
    views = [view(d) for d in daemons]
    roots = {v["status"]["root"] for v in views}
    return (
        all(alive_names(v) >= names for v in views)
        and len(roots) == 1
        and (root is None or roots == {root})
    )


def start_agreeing(nodes: Nodes, cluster: Cluster) -> tuple[list[Daemon], Daemon, list[Daemon]]:
    """A daemon on every host, once they agree: all of them, the root, the others."""
    daemons = [nodes.start(h, f"h{h.index}") for h in cluster.hosts]
    wait_until(lambda: agree(daemons), 20, "agreement")
    root_name = view(daemons[0])["status"]["root"]
    root = next(d for d in daemons if d.dir.name == root_name)
    return daemons, root, [d for d in daemons if d is not root]


def agree_without(survivors: list[Daemon], gone: str) -> bool:
    """The survivors name one root, and it is not `gone`."""
    roots = {root_seen_by(d) for d in survivors}
    return len(roots) == 1 and gone not in roots


def wait_until(condition: Any, timeout: float, what: str) -> float:
    """Poll `condition` until it holds; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def sigkill(d: Daemon) -> float:
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    return time.monotonic()


def test_hosts_find_each_other_and_agree(nodes: Nodes) -> None:
    with Cluster(3) as cluster:
        daemons = [nodes.start(h, f"h{h.index}") for h in cluster.hosts]
        wait_until(lambda: agree(daemons), 20, "three hosts agreeing on a root")
        v = view(daemons[1])
        (root,) = [d for d in v["devices"] if d["role"] == "root"]
        assert root["name"] == v["status"]["root"]
        assert sorted(d["rank"] for d in v["devices"]) == [1, 2, 3]
        for device in v["devices"]:
            assert device["address"].startswith("10.213.0.")
            assert device["memory_total_mb"] > 0 and device["speed"] > 0
        assert v["status"]["epoch"]["root_id"] == root["id"]


def test_priority_change_on_a_worker_reaches_every_host(nodes: Nodes) -> None:
    with Cluster(3) as cluster:
        daemons = [nodes.start(h, f"h{h.index}") for h in cluster.hosts]
        wait_until(lambda: agree(daemons), 20, "agreement")
        root = view(daemons[0])["status"]["root"]
        worker = next(d for d in daemons if d.dir.name != root)
        target = next(d.dir.name for d in daemons if d.dir.name not in (root, worker.dir.name))
        r = worker.ctl("devices", "--priority", target, cluster.hosts[0].address)
        assert r.returncode == 0, r.stderr
        took = wait_until(lambda: agree(daemons, target), 10, f"{target} root everywhere")
        print(f"priority change reached every host in {took:.2f} s")
        for d in daemons:
            policy = view(d)["status"]["policy"]
            assert policy["order_names"][0] == target and policy["version"] == 1
        # Unknown devices are refused with the known ones listed.
        r = worker.ctl("devices", "--priority", "nosuchhost")
        assert r.returncode == 1
        assert "unknown device: 'nosuchhost'" in r.stderr and target in r.stderr
        # A restarted device catches up with the policy.
        late = next(d for d in daemons if d.dir.name != target)
        late.stop()
        late.start()
        wait_until(lambda: agree(daemons, target), 20, "the restarted host agreeing")


def test_root_sigkilled_survivors_elect_within_3_s_at_defaults(nodes: Nodes) -> None:
    with Cluster(3) as cluster:
        _, root, survivors = start_agreeing(nodes, cluster)
        root_name = root.dir.name
        killed = sigkill(root)
        wait_until(lambda: agree_without(survivors, root_name), 10, "a new root")
        took = time.monotonic() - killed
        print(f"survivors agreed on a new root {took:.2f} s after SIGKILL")
        assert took <= 3.0
        for d in survivors:
            states = {x["name"]: x["state"] for x in view(d)["devices"]}
            assert states[root_name] == "dead"


def test_a_frozen_root_is_replaced_and_takes_over_again_when_it_wakes(nodes: Nodes) -> None:
    """A device that stops answering (swapping, suspended) is dead to the others, who
    go on without it; when it wakes the cluster settles on one root again."""
    with Cluster(3) as cluster:
        daemons, root, survivors = start_agreeing(nodes, cluster)
        root_name = root.dir.name
        assert root.proc is not None
        r = root.ctl("prompt", "hello", "--max-tokens", "3", "--json")
        assert r.returncode == 0, r.stderr
        root.proc.send_signal(signal.SIGSTOP)
        try:

            def survivors_agree() -> bool:
                roots = {root_seen_by(d) for d in survivors}
                return len(roots) == 1 and root_name not in roots

            wait_until(survivors_agree, 10, "a new root while the old one is frozen")
            r = survivors[0].ctl("prompt", "hello", "--max-tokens", "3", "--json")
            assert r.returncode == 0, r.stderr
        finally:
            root.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: agree(daemons, root_name), 20, f"{root_name} root again")
        r = survivors[1].ctl("prompt", "hello", "--max-tokens", "3", "--json")
        assert r.returncode == 0, r.stderr
        assert view(root)["status"]["model"]["state"] == "ready"
        assert all(view(d)["status"]["role"] == "worker" for d in survivors)


def test_prompt_on_a_worker_is_answered_by_the_root(nodes: Nodes, tiny_model: Path) -> None:
    with Cluster(2) as cluster:
        _, root, (worker,) = start_agreeing(nodes, cluster)
        root_name = root.dir.name
        r = worker.ctl("prompt", "hello", "--max-tokens", "5", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["completion_tokens"] >= 1
        # The root holds the model; the worker runs no engine.
        root_status = view(root)["status"]
        assert root_status["model"]["state"] == "ready"
        assert view(worker)["status"]["model"]["path"] == str(tiny_model)
        assert not list(worker.dir.glob("engine-*.sock"))
        r = worker.ctl("load", "/nonexistent/model.gguf")
        assert r.returncode == 1
        assert f"on the root ({root_name})" in r.stderr and "not found" in r.stderr


def test_wrong_secret_is_never_admitted(nodes: Nodes, short_dir: Path) -> None:
    other = short_dir / "other.secret"
    write_secret_file(other)
    with Cluster(3) as cluster:
        good = [nodes.start(h, f"h{h.index}") for h in cluster.hosts[:2]]
        intruder = nodes.start(cluster.hosts[2], "intruder", secret=other)
        # Give the intruder every chance: it is named first in the priority order.
        wait_until(lambda: agree(good), 20, "the two good hosts agreeing")
        r = good[0].ctl("devices", "--priority", "intruder")
        assert r.returncode == 1 and "unknown device" in r.stderr

        def intruder_seen_unauthenticated() -> bool:
            states = {d["address"]: d["state"] for d in view(good[0])["devices"]}
            return states.get(f"{cluster.hosts[2].address}:9999") == "unauthenticated"

        wait_until(intruder_seen_unauthenticated, 15, "the intruder marked unauthenticated")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for d in good:
                v = view(d)
                assert "intruder" not in alive_names(v)
                assert v["status"]["root"] != "intruder"
        # The intruder cannot reach the root's model either.
        assert "h0" not in alive_names(view(intruder))


def test_static_peers_without_multicast(nodes: Nodes) -> None:
    with Cluster(3) as cluster:
        cluster.block_multicast()
        peers = ",".join(f"{h.address}:9999" for h in cluster.hosts)
        daemons = [nodes.start(h, f"h{h.index}", "--peers", peers) for h in cluster.hosts]
        wait_until(lambda: agree(daemons), 20, "agreement through static peers")


def test_devices_file_declares_figures(nodes: Nodes, short_dir: Path) -> None:
    with Cluster(2) as cluster:
        cluster.block_multicast()
        devices = short_dir / "devices.json"
        devices.write_text(
            json.dumps(
                [
                    {
                        "address": cluster.hosts[1].address,
                        "port": 9999,
                        "total_memory": 3500,
                        "memfree": 3000,
                        "speed": 5.0,
                        "load": 0.0,
                    }
                ]
            )
        )
        a = nodes.start(cluster.hosts[0], "h0", "--devices", str(devices))
        b = nodes.start(cluster.hosts[1], "h1", "--peers", f"{cluster.hosts[0].address}:9999")
        wait_until(lambda: agree([a, b]), 20, "agreement")
        declared = {d["name"]: d for d in view(a)["devices"]}["h1"]
        assert declared["figures"] == "declared"
        assert declared["memory_total_mb"] == 3500 and declared["speed"] == 5.0


def test_duplicate_node_id_is_reported_and_refused(nodes: Nodes) -> None:
    with Cluster(3) as cluster:
        first = [nodes.start(h, f"h{h.index}") for h in cluster.hosts[:2]]
        wait_until(lambda: agree(first), 20, "agreement")
        copy = nodes.start(cluster.hosts[2], "copy", state="h0")  # a copied state directory
        assert (copy.state_dir / "node_id").read_text() == (
            first[0].state_dir / "node_id"
        ).read_text()

        def reported() -> bool:
            warning = view(copy)["status"]["warning"] or ""
            return "node id is also used by" in warning

        wait_until(reported, 15, "the duplicate reported by the newer daemon")
        for d in first:
            v = view(d)
            assert "copy" not in alive_names(v)
            assert v["status"]["root"] in ("h0", "h1")
        assert agree(first)


def test_root_change_unloads_the_old_roots_model(nodes: Nodes) -> None:
    with Cluster(2) as cluster:
        daemons, old_root, (new_root,) = start_agreeing(nodes, cluster)
        other = new_root.dir.name
        assert old_root.ctl("load").returncode == 0
        assert old_root.ctl("devices", "--priority", other).returncode == 0
        wait_until(lambda: agree(daemons, other), 10, "the new root")
        wait_until(
            lambda: not list(old_root.dir.glob("engine-*.sock")), 10, "the old root unloading"
        )
        r = old_root.ctl("prompt", "hi", "--max-tokens", "3", "--json")
        assert r.returncode == 0, r.stderr


def test_no_takeover_while_the_root_is_generating(nodes: Nodes, short_dir: Path) -> None:
    nodes.model = slow_model(short_dir)
    with Cluster(2) as cluster:
        daemons, root, (other,) = start_agreeing(nodes, cluster)
        root_name = root.dir.name
        assert root.ctl("load", "--max-seq-len", "2048").returncode == 0
        long_answer = ("prompt", "once", "--raw", "--max-tokens", "2000", "--temperature", "0")
        # The follower's status shows the root's queue: one answering, one waiting.
        first = other.ctl_popen(*long_answer)
        assert first.stdout is not None
        first.stdout.read(1)
        second = other.ctl_popen("prompt", "twice", "--raw", "--max-tokens", "3")
        wait_until(
            lambda: root_queue(other) == (1, 1, 64), 5, "the follower to show the root's queue"
        )
        for ended in (first, second):
            _, err = ended.communicate(timeout=120)
            assert ended.returncode == 0, err
        answer = other.ctl_popen(*long_answer)
        assert answer.stdout is not None
        answer.stdout.read(1)  # the answer is streaming from the root
        assert other.ctl("devices", "--priority", other.dir.name).returncode == 0
        # While the answer streams, the root stays where it is on both hosts. A view
        # counts when the root, asked after it, was still generating: the hand-over
        # rightly follows the answer's last token.
        checked = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            seen_by_other = status_of(other)
            seen_by_root = status_of(root)
            if not seen_by_root["generating"]:
                break
            assert (seen_by_other["root"], seen_by_root["root"]) == (root_name, root_name)
            checked += 1
        assert checked, "the answer ended before the root could be watched"
        _, err = answer.communicate(timeout=120)
        assert answer.returncode == 0, err
        assert "Generated 2000 tokens" in err
        # Then the device named first takes over.
        wait_until(lambda: agree(daemons, other.dir.name), 10, "the takeover")


def test_root_frozen_mid_answer_goes_on_on_the_next_root(nodes: Nodes, short_dir: Path) -> None:
    """A prompt given on a worker, when the root freezes mid-answer, goes on on the root
    chosen next (here the worker) instead of waiting for it; the next one is answered."""
    nodes.model = slow_model(short_dir)
    with Cluster(2) as cluster:
        _, root, (worker,) = start_agreeing(nodes, cluster)
        assert root.proc is not None
        assert root.ctl("load", "--max-seq-len", "2048").returncode == 0
        answer = worker.ctl_popen("prompt", "once", "--raw", "--max-tokens", "2000")
        assert answer.stdout is not None
        answer.stdout.read(1)  # the answer is streaming from the root
        root.proc.send_signal(signal.SIGSTOP)
        try:
            _, err = answer.communicate(timeout=180)  # the whole answer, 2000 tokens
            assert answer.returncode == 0, err
            assert f"{root.dir.name} was lost; resumed on {worker.dir.name}" in err, err
            r = worker.ctl("prompt", "hello", "--max-tokens", "3", "--json")
            assert r.returncode == 0, r.stderr
        finally:
            root.proc.send_signal(signal.SIGCONT)
