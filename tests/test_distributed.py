"""A model no host can hold alone, split over hosts with cgroup memory limits."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hsmdifd.cluster.cluster_secret import write_secret_file
from tests.conftest import REPO, Daemon, child_pids, stop_all, write_config
from tests.netns import Cluster, Host, require_root_netns
from tests.oracle_client import by_hand
from tests.test_cluster import agree, alive_names, view, wait_until
from tests.tinymodel import write_tiny_llama

pytestmark = pytest.mark.netns

MIB = 1024 * 1024
LIMIT = 600 * MIB
PROMPT = "once upon a time"


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    require_root_netns()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 690 MB of f32 weights, with feed-forward matrices over the RPC cache's 10 MiB."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("big") / "big.gguf",
        n_layer=14,
        n_embd=1024,
        n_ff=2816,
        n_ctx_train=512,
        dtype="f32",
    )


def start(
    host: Host, base: Path, name: str, model: Path, secret: Path, *, http: str = "off"
) -> Daemon:
    directory = base / name
    directory.mkdir()
    config = write_config(directory / "hsmdifd.toml", model, resources="memory_reserve_mb = 0")
    d = Daemon(dir=directory, config=config, host=host, mdns=True, http=http)
    d.extra_args = ["--name", name, "--secret-file", str(secret)]
    d.start()
    return d


@pytest.fixture
def split_cluster(short_dir: Path, big_model: Path) -> Iterator[tuple[Cluster, list[Daemon]]]:
    secret = short_dir / "cluster.secret"
    write_secret_file(secret)
    with Cluster(3, memory_limit_bytes=LIMIT) as cluster:
        daemons = [start(h, short_dir, f"h{h.index}", big_model, secret) for h in cluster.hosts]
        wait_until(lambda: agree(daemons), 30, "agreement")
        yield cluster, daemons
        stop_all(daemons)


def root_of(daemons: list[Daemon]) -> Daemon:
    name = view(daemons[0])["status"]["root"]
    return next(d for d in daemons if d.dir.name == name)


def prompt(d: Daemon, tokens: int = 12) -> dict[str, object]:
    r = d.ctl(
        "prompt", PROMPT, "--raw", "--temperature", "0", "--max-tokens", str(tokens), "--json"
    )
    assert r.returncode == 0, r.stderr
    answer: dict[str, object] = json.loads(r.stdout)
    return answer


def test_split_over_hosts_matches_llama_cpp_rpc_by_hand(
    split_cluster: tuple[Cluster, list[Daemon]], big_model: Path
) -> None:
    cluster, daemons = split_cluster
    root = root_of(daemons)
    r = root.ctl("plan", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert not plan["standalone"] and len(plan["devices"]) >= 2
    for device in plan["devices"]:
        assert device["bytes"] <= device["capacity_bytes"]
    assert sum(d["layers"] for d in plan["devices"]) == 14
    assert plan["model_bytes"] > LIMIT

    r = root.ctl("load")
    assert r.returncode == 0, r.stderr
    held = {d["name"]: d["layers"] for d in view(root)["devices"] if d["layers"]}
    assert len(held) >= 2, held
    answer = prompt(root, 16)
    text = str(answer["text"])
    assert text and answer["completion_tokens"] == 16

    # The same split driven by hand: fresh rpc-workers on the same hosts.
    loaded = json.loads(root.ctl("--json", "status").stdout)["model"]
    assert root.ctl("unload").returncode == 0
    info = json.loads(root.ctl("plan", "--json").stdout)
    by_name = {h: cluster.hosts[int(h[1:])] for h in (d["name"] for d in info["devices"])}
    oracle = by_hand(
        by_name, info, big_model, PROMPT, "--n-ctx", str(loaded["context_length"]), "--tokens", "16"
    )
    assert oracle.returncode == 0, oracle.stderr[-2000:]
    assert oracle.stdout == text


def test_one_host_alone_refuses_and_keeps_running(short_dir: Path, big_model: Path) -> None:
    secret = short_dir / "cluster.secret"
    write_secret_file(secret)
    with Cluster(1, memory_limit_bytes=LIMIT) as cluster:
        d = start(cluster.hosts[0], short_dir, "alone", big_model, secret)
        r = d.ctl("load")
        assert r.returncode == 1
        assert "does not fit" in r.stderr and "MiB" in r.stderr, r.stderr
        r = d.ctl("plan")
        assert r.returncode == 1 and "does not fit" in r.stderr
        assert d.proc is not None and d.proc.poll() is None
        assert view(d)["status"]["role"] == "root"
        d.stop()


def test_worker_killed_mid_generation(split_cluster: tuple[Cluster, list[Daemon]]) -> None:
    _, daemons = split_cluster
    root = root_of(daemons)
    assert root.ctl("load").returncode == 0
    shares = {d["name"]: d for d in view(root)["devices"] if d["layers"]}
    worker = next(d for d in daemons if d.dir.name in shares and d is not root)
    assert worker.proc is not None
    (rpc_worker,) = child_pids(worker.proc.pid)
    answer = root.ctl_popen(
        "prompt",
        PROMPT,
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "400",
    )
    assert answer.stdout is not None
    answer.stdout.read(1)  # the answer has started
    psutil.Process(rpc_worker).kill()
    _, err = answer.communicate(timeout=120)
    assert answer.returncode == 0, err  # the answer goes on over the devices left
    assert f"{worker.dir.name} was lost; resumed on" in err, err
    assert all(d.proc is not None and d.proc.poll() is None for d in daemons)
    # The next prompt plans again over what is left and works.
    again = prompt(root, 8)
    assert again["completion_tokens"] == 8


def test_reload_uses_the_tensor_cache(split_cluster: tuple[Cluster, list[Daemon]]) -> None:
    _, daemons = split_cluster
    root = root_of(daemons)
    first = json.loads(root.ctl("--json", "load").stdout)
    assert root.ctl("unload").returncode == 0
    second = json.loads(root.ctl("--json", "load").stdout)
    workers = [d for d in daemons if d is not root]
    cached = [p for d in workers for p in (d.state_dir / "rpc-cache").glob("*") if p.is_file()]
    assert cached, "the rpc-workers keep weights over 10 MiB in their cache"
    print(
        f"load {first['load_seconds']:.2f} s, reload {second['load_seconds']:.2f} s "
        f"({first['load_seconds'] / second['load_seconds']:.2f}x)"
    )


ASK_FOR_LEASE = """
import asyncio, secrets, sys, tempfile, grpc
from pathlib import Path
from hsmdifd.cluster import auth, cluster_secret, peer_auth
from hsmdifd.cluster import tls
from hsmdifd.cluster.peer_channel import OPEN_METHODS
from hsmdif.proto import hsmdif_pb2 as pb, hsmdif_pb2_grpc as pb_grpc

async def ask():
    address, secret_file, node_id = sys.argv[1:]
    if secret_file:
        secret = cluster_secret.load_secret(Path(secret_file))
    else:
        secret = cluster_secret.generate_secret()
    creds = tls.device_credentials(secret, node_id, Path(tempfile.mkdtemp()))
    proven = []
    interceptors = peer_auth.client_interceptors(
        secret, node_id, lambda: proven[0] if proven else None, open_methods=OPEN_METHODS
    )
    async with grpc.aio.secure_channel(
        address, tls.channel_credentials(creds), options=tls.CHANNEL_OPTIONS,
        interceptors=interceptors,
    ) as channel:
        stub = pb_grpc.PeerStub(channel)
        try:
            challenge = secrets.token_hex(16)
            hello = await stub.Hello(
                pb.HelloRequest(challenge=challenge, caller_id=node_id), timeout=10
            )
            auth.check_hello(secret, challenge, node_id, hello.node_id, hello.proof)
            proven.append(hello.node_id)
            epoch = pb.Epoch(policy_version=99, root_id=node_id, generation=99)
            await stub.StartRpc(pb.LeaseRequest(epoch=epoch), timeout=10)
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
    return "OK"

print(asyncio.run(ask()))
"""


def ask_for_lease(cluster: Cluster, worker: int, secret: Path | None, node_id: str) -> str:
    """Ask host `worker` for a lease from the last host, as `node_id`."""
    r = cluster.hosts[-1].run(
        [
            sys.executable,
            "-c",
            ASK_FOR_LEASE,
            f"{cluster.hosts[worker].address}:9999",
            str(secret or ""),
            node_id,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return str(r.stdout.strip() or r.stderr)


def test_wrong_secret_never_gets_a_lease(split_cluster: tuple[Cluster, list[Daemon]]) -> None:
    cluster, daemons = split_cluster
    worker = daemons[1]
    assert worker.proc is not None
    before = child_pids(worker.proc.pid)
    # From another host on the same network, with a secret of its own.
    answer = ask_for_lease(cluster, 1, None, "intruder")
    # Its certificate was not made with the cluster's secret: no TLS, no call at all.
    assert answer.startswith("UNAVAILABLE") and "CERTIFICATE_VERIFY_FAILED" in answer, answer
    assert child_pids(worker.proc.pid) == before, "no rpc-worker was started"


def test_only_the_root_a_worker_follows_gets_a_lease(
    split_cluster: tuple[Cluster, list[Daemon]], short_dir: Path
) -> None:
    cluster, daemons = split_cluster
    root = root_of(daemons)
    worker, other = (d for d in daemons if d is not root)
    assert worker.proc is not None
    before = child_pids(worker.proc.pid)
    # A member of the cluster, with the secret, that is not the root.
    other_id = view(other)["status"]["id"]
    index = daemons.index(worker)
    answer = ask_for_lease(cluster, index, short_dir / "cluster.secret", other_id)
    assert answer == f"ABORTED: this device follows {root.dir.name} as root", answer
    assert child_pids(worker.proc.pid) == before, "no rpc-worker was started"


def test_policy_change_re_plans_when_idle(split_cluster: tuple[Cluster, list[Daemon]]) -> None:
    _, daemons = split_cluster
    root = root_of(daemons)
    assert root.ctl("load").returncode == 0

    def holders() -> set[str]:
        return {d["name"] for d in view(root)["devices"] if d["layers"]}

    used = holders() - {root.dir.name}
    spare = next(d.dir.name for d in daemons if d is not root and d.dir.name not in used)
    r = root.ctl("devices", "--priority", root.dir.name, spare)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: holders() == {root.dir.name, spare}, 60, f"the layers moving to {spare}")
    assert prompt(root, 4)["completion_tokens"] == 4


def test_leases_end_with_the_root(split_cluster: tuple[Cluster, list[Daemon]]) -> None:
    _, daemons = split_cluster
    root = root_of(daemons)
    assert root.ctl("load").returncode == 0
    workers = [d for d in daemons if d is not root]

    def rpc_workers() -> list[int]:
        return [pid for d in workers if d.proc is not None for pid in child_pids(d.proc.pid)]

    assert rpc_workers(), "a split load runs an rpc-worker on a worker"
    assert root.stop() == 0
    wait_until(lambda: not rpc_workers(), 10, "the rpc-workers ending with the root")


def test_a_restarted_root_gets_its_leases_again(
    split_cluster: tuple[Cluster, list[Daemon]],
) -> None:
    """Workers serve the root they follow, whatever the root's own history: a root
    that restarts has seen fewer membership changes than before, and still loads."""
    _, daemons = split_cluster
    root = root_of(daemons)
    last = view(root)["devices"][-1]["name"]  # the device a plan needs least
    spare = next(d for d in daemons if d.dir.name == last)
    for _ in range(2):  # changes the root sees before its first lease
        spare.stop()
        wait_until(lambda: last not in alive_names(view(root)), 30, f"{last} gone")
        spare.start()
        wait_until(lambda: agree(daemons), 30, f"{last} back")
    assert prompt(root, 4)["completion_tokens"] == 4
    root.stop()
    root.start()
    wait_until(lambda: agree(daemons, root.dir.name), 30, f"{root.dir.name} root again")
    assert prompt(root, 4)["completion_tokens"] == 4


def test_worker_frozen_mid_generation(split_cluster: tuple[Cluster, list[Daemon]]) -> None:
    """A device holding layers that stops answering (suspended, swapping) counts as dead
    after dead_after, and the answer goes on without it; nothing waits on it for ever."""
    _, daemons = split_cluster
    root = root_of(daemons)
    assert root.ctl("load").returncode == 0
    shares = {d["name"] for d in view(root)["devices"] if d["layers"]}
    worker = next(d for d in daemons if d.dir.name in shares and d is not root)
    assert worker.proc is not None
    (rpc_worker,) = child_pids(worker.proc.pid)
    frozen = [worker.proc.pid, rpc_worker]
    answer = root.ctl_popen("prompt", PROMPT, "--raw", "--temperature", "0", "--max-tokens", "400")
    assert answer.stdout is not None
    answer.stdout.read(1)  # the answer has started
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        _, err = answer.communicate(timeout=60)
        assert answer.returncode == 0, err  # the answer goes on over the devices left
        assert f"{worker.dir.name} was lost; resumed on" in err, err
        # The next prompt plans without it, while it is still frozen.
        assert prompt(root, 4)["completion_tokens"] == 4
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    # Woken, it ends the lease it held (the root may lease it anew, but the old
    # rpc-worker and the layers it holds go).
    wait_until(lambda: not psutil.pid_exists(rpc_worker), 30, "the old lease ending")
    assert root.proc is not None and root.proc.poll() is None


def test_a_root_that_froze_answers_the_first_prompt_after(
    split_cluster: tuple[Cluster, list[Daemon]],
) -> None:
    """While the root was stopped its workers counted it as gone and ended their leases;
    on waking it loads the model anew, and the first prompt is answered."""
    _, daemons = split_cluster
    root = root_of(daemons)
    assert root.proc is not None
    assert root.ctl("load").returncode == 0
    leased = [pid for d in daemons if d is not root and d.proc for pid in child_pids(d.proc.pid)]
    assert leased, "a split load runs an rpc-worker on a worker"
    root.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not any(map(psutil.pid_exists, leased)), 30, "the leases ending")
    finally:
        root.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: agree(daemons, root.dir.name), 30, f"{root.dir.name} root again")
    assert prompt(root, 4)["completion_tokens"] == 4
