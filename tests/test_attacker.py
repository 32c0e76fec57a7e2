"""An outsider on the LAN without the cluster secret (tests/attacker.py) against real
daemons in network namespaces: it announces itself, collects and replays proofs, floods
announcements, forges goodbyes, probes every port a worker listens on, and listens on
the wire. Nothing it does may change the policy or the root, reach the data plane or
read a prompt.

One cluster serves the whole module: h0 and h1 run hsmdifd with the secret and memory
caps that split the model over both; h2 is the attacker's host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster import auth, cluster_secret, discovery, membership, peer_channel
from hsmdifd.cluster.cluster_secret import write_secret_file
from tests.conftest import REPO, Daemon, child_pids, stop_all, write_config
from tests.netns import Cluster, Host, require_root_netns
from tests.test_cluster import agree, root_seen_by, status_of, wait_until
from tests.test_distributed import ask_for_lease
from tests.tinymodel import write_tiny_llama

pytestmark = pytest.mark.netns

MIB = 1024 * 1024
UNPROVEN_TIMEOUT = 3.0
MEMORY_MB = 21  # each device's usable memory: the model needs both
STATUS_METHOD = "/hsmdif.v1.Peer/Status"
SET_POLICY_METHOD = "/hsmdif.v1.Peer/SetPolicy"
SECRET_PROMPT = "the outsider must never read this sentence about purple elephants"


@dataclass
class Lan:
    cluster: Cluster
    daemons: list[Daemon]
    base: Path
    secret: Path

    @property
    def attacker(self) -> Host:
        return self.cluster.hosts[-1]

    def host_of(self, d: Daemon) -> Host:
        return self.cluster.hosts[self.daemons.index(d)]

    def root(self) -> Daemon:
        name = status_of(self.daemons[0])["root"]
        return next(d for d in self.daemons if d.dir.name == name)

    def worker(self) -> Daemon:
        root = self.root()
        return next(d for d in self.daemons if d is not root)

    def attack(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run tests.attacker on the attacker's host and wait for it."""
        return self.attacker.run(
            [sys.executable, "-m", "tests.attacker", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )

    def attack_popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return self.attacker.popen(
            [sys.executable, "-m", "tests.attacker", *args], cwd=REPO, text=True, **kw
        )


def start_daemon(host: Host, base: Path, name: str, model: Path, secret: Path) -> Daemon:
    directory = base / name
    directory.mkdir()
    config = write_config(
        directory / "hsmdifd.toml",
        model,
        extra=f"[timing]\nunproven_timeout = {UNPROVEN_TIMEOUT}\n",
        resources=f"memory_reserve_mb = 0\nmemory_override_mb = {MEMORY_MB}",
    )
    d = Daemon(dir=directory, config=config, host=host, mdns=True)
    d.extra_args = ["--name", name, "--secret-file", str(secret)]
    d.start()
    return d


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    require_root_netns()
    base = Path(tempfile.mkdtemp(prefix="hsa-", dir="/tmp"))
    model = write_tiny_llama(base / "model.gguf", n_layer=4, n_embd=256, n_ff=512, n_ctx_train=2048)
    secret = base / "cluster.secret"
    write_secret_file(secret)
    daemons: list[Daemon] = []
    try:
        with Cluster(3) as cluster:
            try:
                for host in cluster.hosts[:2]:
                    daemons.append(start_daemon(host, base, f"h{host.index}", model, secret))
                wait_until(lambda: agree(daemons), 30, "agreement")
                yield Lan(cluster, daemons, base, secret)
            finally:
                stop_all(daemons)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def devices_of(d: Daemon) -> list[pb.DeviceProfile]:
    """The device list, over the control socket directly: cheap enough to poll."""
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        reply = pb_grpc.ControlStub(channel).Devices(pb.DevicesRequest(), timeout=5)
        return list(reply.devices)


def policy_file(d: Daemon) -> bytes | None:
    path = d.state_dir / "policy.json"
    return path.read_bytes() if path.exists() else None


def snapshot(lan: Lan) -> list[tuple[str, int, str, bytes | None]]:
    """What an attack must not change on any device: policy version, root, policy on disk."""
    out = []
    for d in lan.daemons:
        status = status_of(d)
        out.append((d.dir.name, status["policy"]["version"], status["root"], policy_file(d)))
    return out


def node_id(d: Daemon) -> str:
    return str(status_of(d)["id"])


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def listening_ports(host: Host) -> set[int]:
    """Ports listening in `host`'s namespace on an address the LAN reaches (`ss -ltn`)."""
    r = host.run(["ss", "-ltnH"], capture_output=True, text=True, check=True, timeout=10)
    ports = set()
    for line in r.stdout.splitlines():
        address, _, port = line.split()[3].rpartition(":")
        if not address.startswith(("127.", "[::1]")):
            ports.add(int(port))
    return ports


class Prober:
    """tests.attacker probe on the attacker's host: a llama.cpp RPC HELLO per request."""

    def __init__(self, lan: Lan) -> None:
        self.proc = lan.attack_popen("probe", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.answered: list[dict[str, Any]] = []
        self.probes = 0

    def hello(
        self, phase: str, address: str, port: int, tls: tuple[Path, str] | None = None
    ) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        via = f" tls {tls[0]} {tls[1]}" if tls else ""
        self.proc.stdin.write(f"{address} {port}{via}\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        self.probes += 1
        if result["answered"]:
            self.answered.append({"phase": phase, **result})
        return bool(result["answered"])

    def sweep(self, phase: str, host: Host, tls: tuple[Path, str] | None = None) -> None:
        for port in sorted(listening_ports(host)):
            self.hello(phase, host.address, port, tls)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def engine_of(d: Daemon) -> psutil.Process:
    assert d.proc is not None
    for child in psutil.Process(d.proc.pid).children(recursive=True):
        if "hsmdifd.engine.child" in child.cmdline():
            return child
    raise AssertionError(f"{d.dir.name} runs no engine")


def ensure_loaded(lan: Lan) -> None:
    r = lan.root().ctl("load")
    assert r.returncode == 0, r.stderr
    worker = lan.worker()
    assert worker.proc is not None and child_pids(worker.proc.pid), "the load is split"


def settle(lan: Lan) -> None:
    wait_until(lambda: agree(lan.daemons), 30, "the devices agreeing again")


_captured: list[dict[str, Any]] = []


# ---------------------------------------------------------------- 1. proofs sent to an outsider


def test_an_announced_outsider_is_sent_no_proof(lan: Lan) -> None:
    log = lan.base / "listen.jsonl"
    listener = lan.attack_popen(
        "listen", "--address", lan.attacker.address, "--log", str(log), stdout=subprocess.PIPE
    )
    good = {lan.host_of(d).address for d in lan.daemons}
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        started = time.monotonic()

        def knocked() -> set[tuple[str, str]]:
            return {(e["peer"], e["transport"]) for e in events(log) if e["event"] == "connect"}

        wanted = {(a, t) for a in good for t in ("plain", "tls")}
        wait_until(lambda: knocked() >= wanted, 15, "every daemon knocking on both ports")
        # Then watch what they send for 10 s in all.
        time.sleep(max(0.0, started + 10 - time.monotonic()))
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(15)
    seen = events(log)
    calls = [e for e in seen if e["event"] == "call"]
    _captured.extend(calls)
    proofs = [(c["method"], m) for c in calls for m in c["metadata"] if m[0] == auth.AUTH_KEY]
    print(
        f"{sum(e['event'] == 'connect' for e in seen)} connections, {len(calls)} calls, "
        f"{len(proofs)} proofs received by the outsider"
    )
    assert not proofs, f"daemons sent proofs to an address that proved nothing: {proofs}"
    assert all(c["method"] == peer_channel.HELLO_METHOD for c in calls), calls
    # The daemons speak TLS even to a plaintext port: a ClientHello is all it gets.
    firsts = {e["first"][:4] for e in seen if e["event"] == "connect" and e["first"]}
    assert firsts <= {"1603"}, firsts


# ---------------------------------------------------------------- 2. replayed proofs


def _status_body(d: Daemon, version: int, order: list[str]) -> pb.PeerStatus:
    status = status_of(d)
    return pb.PeerStatus(
        protocol_version=peer_channel.PROTOCOL_VERSION,
        device=pb.DeviceProfile(id=status["id"], name=status["name"], address=status["address"]),
        policy=pb.Policy(version=version, order=order),
        started_at=time.time() - status["uptime_seconds"],
    )


def test_replayed_proofs_change_nothing(lan: Lan) -> None:
    a, b = lan.daemons
    a_id, b_id = node_id(a), node_id(b)
    before = snapshot(lan)
    secret = cluster_secret.load_secret(lan.secret)
    # A proof as an outsider would capture it: B's real heartbeat to A.
    real = _status_body(b, before[1][1], [])
    proof, _ = auth.sign(secret, b_id, a_id, STATUS_METHOD, auth.digest(real))
    captured = [[k, v] for k, v in proof]
    captured_sets = [captured] + [
        [m for m in c["metadata"] if m[0] == auth.AUTH_KEY] for c in _captured
    ]
    bodies: list[tuple[str, bytes]] = []
    for version in (1000, 2**64 - 1):
        bodies.append((STATUS_METHOD, _status_body(b, version, [b_id]).SerializeToString()))
        bodies.append(
            (SET_POLICY_METHOD, pb.Policy(version=version, order=[b_id]).SerializeToString())
        )
    vias: list[dict[str, str]] = [
        {"via": "self-signed"},
        # A device holding the secret passing the captured proof on (tests the proofs alone),
        # under a name of its own and under B's.
        {"via": "relay", "secret_file": str(lan.secret), "node_id": "relay"},
        {"via": "relay", "secret_file": str(lan.secret), "node_id": b_id},
    ]
    spec = [
        {
            "target": f"{lan.host_of(d).address}:9999",
            "method": method,
            "body": body.hex(),
            "metadata": metadata,
            **via,
        }
        for metadata in captured_sets
        if metadata
        for d in lan.daemons
        for method, body in bodies
        for via in vias
    ]
    spec_file = lan.base / "replay.json"
    spec_file.write_text(json.dumps(spec))
    r = lan.attack("replay", "--spec", str(spec_file), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(results) == len(spec)
    accepted = [x for x in results if x["code"] == "OK"]
    assert not accepted, f"replayed proofs accepted: {accepted}"
    by_via = {(x["via"], x["node_id"] if x["via"] == "relay" else ""): x["code"] for x in results}
    print("replay refusals:", sorted(set(by_via.items())))
    assert {x["code"] for x in results if x["via"] == "self-signed"} == {"UNAVAILABLE"}
    assert {x["code"] for x in results if x["via"] == "relay"} <= {
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
    }
    # A few heartbeats later nothing moved, on any device, in memory or on disk.
    time.sleep(3 * 0.5)
    assert snapshot(lan) == before
    assert "wrong cluster secret, or a request altered" in a.log()


# ---------------------------------------------------------------- 3. the wire


def test_peer_traffic_is_tls_on_the_wire(lan: Lan) -> None:
    root, worker = lan.root(), lan.worker()
    host = lan.host_of(root)
    log = lan.base / "sniff.jsonl"
    sniffer = host.popen(
        [
            sys.executable,
            "-m",
            "tests.attacker",
            "sniff",
            "--interface",
            host.interface,
            "--log",
            str(log),
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
    )
    try:
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
        # The capture sees what is in clear: a marker sent to the mDNS port.
        lan.attacker.run(
            [sys.executable, "-c", SEND_MARKER, host.address],
            check=True,
            timeout=30,
        )
        # A prompt given on the worker crosses to the root and back on port 9999.
        r = worker.ctl(
            "prompt", SECRET_PROMPT, "--raw", "--temperature", "0", "--max-tokens", "48", "--json"
        )
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)["text"].encode()
    finally:
        sniffer.send_signal(signal.SIGTERM)
        sniffer.wait(15)
    packets = events(log)
    udp = [bytes.fromhex(p["payload"]) for p in packets if p["proto"] == "udp"]
    assert any(MARKER in p for p in udp), "the capture saw the marker in clear"
    tcp = [p for p in packets if p["proto"] == "tcp"]
    streams: dict[tuple[int, int], bytes] = {}
    for p in tcp:
        key = (p["sport"], p["dport"])
        streams[key] = streams.get(key, b"") + bytes.fromhex(p["payload"])
    wire = b"\n".join(streams.values())
    records = sum(bytes.fromhex(p["payload"])[:3] == b"\x17\x03\x03" for p in tcp)
    print(f"{len(tcp)} TCP segments on port 9999, {records} starting a TLS application record")
    assert records > 0
    assert b"PRI * HTTP/2.0" not in wire
    for text in (SECRET_PROMPT.encode(), b"purple elephants"):
        assert text not in wire
    windows = [answer[i : i + 8] for i in range(0, max(0, len(answer) - 8))]
    leaked = [w for w in windows if w.strip() and w in wire]
    assert not leaked, f"pieces of the answer in clear on port 9999: {leaked[:5]}"


MARKER = b"hsmdif-sniffer-self-check-7f3a"
SEND_MARKER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto({MARKER!r}, (sys.argv[1], 5353))
"""


# ---------------------------------------------------------------- 4. leases


def test_a_secret_holder_that_is_not_the_root_is_refused_a_lease(lan: Lan) -> None:
    root, worker = lan.root(), lan.worker()
    assert worker.proc is not None
    before = child_pids(worker.proc.pid)
    index = lan.daemons.index(worker)
    answer = ask_for_lease(lan.cluster, index, lan.secret, "mallory")
    assert answer == f"ABORTED: this device follows {root.dir.name} as root", answer
    assert child_pids(worker.proc.pid) == before, "no rpc-worker was started"


def test_a_secret_holder_that_is_not_the_root_gets_no_data_plane(lan: Lan) -> None:
    """With valid credentials of its own, a device that does not hold the lease reaches no
    rpc-worker: not in plain, not through the relay's TLS, not while the root's engine is
    connected nor after it died."""
    ensure_loaded(lan)
    worker_host = lan.host_of(lan.worker())
    mallory = (lan.secret, "mallory")
    prober = Prober(lan)
    try:
        prober.sweep("lease held", worker_host)
        prober.sweep("lease held", worker_host, mallory)
        engine_of(lan.root()).kill()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            prober.sweep("root's engine killed", worker_host)
            prober.sweep("root's engine killed", worker_host, mallory)
    finally:
        prober.close()
    print(f"{prober.probes} probes, answered: {prober.answered}")
    assert not prober.answered


# ---------------------------------------------------------------- 5. the data plane


def test_no_hello_is_answered_at_any_phase_of_a_lease(lan: Lan) -> None:
    root, worker = lan.root(), lan.worker()
    worker_host = lan.host_of(worker)
    assert worker.proc is not None
    prober = Prober(lan)
    try:
        # Before the root's engine connects: from the moment the load starts.
        assert root.ctl("unload").returncode == 0
        load = root.ctl_popen("load")
        while load.poll() is None:
            prober.sweep("before the engine connects", worker_host)
        assert load.wait() == 0, load.communicate()[1]
        # While connected: during a long answer.
        answer = root.ctl_popen("prompt", "once", "--raw", "--max-tokens", "400")
        assert answer.stdout is not None
        answer.stdout.read(1)
        prober.sweep("while connected", worker_host)
        answer.communicate(timeout=120)
        # After unload.
        assert root.ctl("unload").returncode == 0
        prober.sweep("after unload", worker_host)
        # With the root's engine killed while idle.
        ensure_loaded(lan)
        engine_of(root).kill()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            prober.sweep("root's engine killed", worker_host)
        # With the worker's daemon frozen: its rpc-worker must not serve anyone.
        settle(lan)
        ensure_loaded(lan)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                prober.sweep("worker's daemon frozen", worker_host)
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
    finally:
        prober.close()
    settle(lan)
    phases = sorted({a["phase"] for a in prober.answered})
    print(f"{prober.probes} probes; HELLO answered in: {phases}")
    assert not prober.answered, prober.answered


# ---------------------------------------------------------------- 6. forged goodbyes


def test_a_forged_goodbye_changes_nothing(lan: Lan) -> None:
    before = snapshot(lan)
    names = {d.dir.name for d in lan.daemons}
    goodbye = lan.attack_popen(
        "goodbye", "--address", lan.attacker.address, "--wait", "2", stdout=subprocess.PIPE
    )
    # Watch through the goodbyes and a while after.
    deadline = time.monotonic() + 8
    while goodbye.poll() is None or time.monotonic() < deadline:
        for d in lan.daemons:
            states = {x.name: x.state for x in devices_of(d) if x.name in names}
            assert states == dict.fromkeys(names, "alive"), f"{d.dir.name} sees {states}"
        time.sleep(0.1)
    out, _ = goodbye.communicate(timeout=30)
    assert goodbye.returncode == 0
    sent = json.loads(out)["goodbyes"]
    assert len(sent) >= len(lan.daemons), sent
    assert snapshot(lan) == before


def test_forged_goodbyes_while_the_root_answers_change_nothing(lan: Lan) -> None:
    """Each goodbye makes a daemon ask the device at once, with a short deadline; asked
    while it is busy answering prompts, the device must still not count as dead."""
    before = snapshot(lan)
    names = {d.dir.name for d in lan.daemons}
    ensure_loaded(lan)
    root = lan.root()

    def ask() -> subprocess.Popen[str]:
        answer = root.ctl_popen("prompt", "once", "--raw", "--max-tokens", "2000")
        assert answer.stdout is not None
        answer.stdout.read(1)  # the answer is streaming
        return answer

    answer = ask()
    goodbye: subprocess.Popen[str] | None = None
    seen: set[str] = set()
    busy = polls = 0
    try:
        goodbye = lan.attack_popen(
            "goodbye",
            "--address",
            lan.attacker.address,
            "--wait",
            "1",
            "--rounds",
            "4",
            stdout=subprocess.PIPE,
        )
        while goodbye.poll() is None:
            if answer.poll() is not None:  # keep the root busy throughout
                answer.communicate()
                answer = ask()
            for d in lan.daemons:
                states = {x.name: x.state for x in devices_of(d) if x.name in names}
                seen |= {f"{d.dir.name} sees {n} {s}" for n, s in states.items() if s != "alive"}
                if (named := root_seen_by(d)) != root.dir.name:
                    seen.add(f"{d.dir.name} names {named} root")
            polls += 1
            busy += generating(root)
            time.sleep(0.1)
        assert goodbye.returncode == 0
    finally:
        answer.kill()
        answer.communicate()
        if goodbye is not None and goodbye.poll() is None:
            goodbye.kill()
            goodbye.wait()
    print(f"the root was answering at {busy} of {polls} looks")
    assert busy > polls // 2
    assert not seen, sorted(seen)
    settle(lan)
    assert snapshot(lan) == before


def generating(d: Daemon) -> bool:
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        reply = pb_grpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=5)
        return bool(reply.generating)


# ---------------------------------------------------------------- 7. a flood of announcements


def test_a_flood_of_announcements_is_bounded(lan: Lan) -> None:
    procs = {d.dir.name: psutil.Process(d.proc.pid) for d in lan.daemons if d.proc}
    real = set(procs)
    bound = len(real) + membership.MAX_UNPROVEN
    rss_before = {n: p.memory_info().rss for n, p in procs.items()}
    cpu_before = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
    started = time.monotonic()
    flood = lan.attack_popen(
        "flood",
        "--address",
        lan.attacker.address,
        "--count",
        "200",
        "--seconds",
        "5",
        stdout=subprocess.PIPE,
    )
    most = 0
    while flood.poll() is None:
        for d in lan.daemons:
            listed = devices_of(d)
            most = max(most, len(listed))
            states = {x.name: x.state for x in listed if x.name in real}
            assert states == dict.fromkeys(real, "alive"), f"{d.dir.name} sees {states}"
        time.sleep(0.2)
    out, _ = flood.communicate()
    assert flood.returncode == 0
    print("flood:", out.strip())
    most = max([most, *(len(devices_of(d)) for d in lan.daemons)])
    elapsed = time.monotonic() - started
    cpu = {n: (sum(p.cpu_times()[:2]) - cpu_before[n]) / elapsed for n, p in procs.items()}
    rss = {n: (p.memory_info().rss - rss_before[n]) / MIB for n, p in procs.items()}
    for name in sorted(real):
        print(
            f"{name} under the flood: CPU {100 * cpu[name]:.1f} % of a core over "
            f"{elapsed:.1f} s, RSS {rss[name]:+.1f} MiB"
        )
    print(f"at most {most} devices listed (bound {bound})")
    assert most <= bound
    assert max(cpu.values()) < 0.5
    assert max(rss.values()) < 30
    assert any("not following the announcement" in d.log() for d in lan.daemons)

    def only_real() -> bool:
        return all(sorted(x.name for x in devices_of(d)) == sorted(real) for d in lan.daemons)

    took = wait_until(only_real, UNPROVEN_TIMEOUT + 3, "only the real devices listed again")
    print(f"back to the real devices {took:.1f} s after the goodbyes")
    assert agree(lan.daemons)


# ---------------------------------------------------------------- 8. relays to a real device


def test_announced_relays_to_a_real_device_do_not_block_new_announcements(lan: Lan) -> None:
    """An outsider announces MAX_UNPROVEN addresses of its own that pass TCP on to a real
    device's port 9999. A daemon following them proves, through them, the real device:
    the addresses never prove an identity of their own, so they must be forgotten (or at
    least not hold the places of addresses waiting to prove themselves). Otherwise the
    daemon follows no new announcement again: a new device is never found by it."""
    a, b = lan.daemons
    a_address = lan.host_of(a).address
    relay_log, listen_log = lan.base / "relay.jsonl", lan.base / "listen-after-relays.jsonl"
    relays = lan.attack_popen(
        "relay",
        "--address",
        lan.attacker.address,
        "--to",
        f"{lan.host_of(b).address}:9999",
        "--count",
        str(membership.MAX_UNPROVEN),
        "--log",
        str(relay_log),
        stdout=subprocess.PIPE,
    )
    listener: subprocess.Popen[str] | None = None
    try:
        assert relays.stdout is not None and relays.stdout.readline().strip() == "ready"

        def followed(path: Path) -> set[int]:
            return {
                e.get("port", 0)
                for e in events(path)
                if e["event"] == "connect" and e["peer"] == a_address
            }

        wait_until(
            lambda: len(followed(relay_log)) == membership.MAX_UNPROVEN,
            30,
            "the daemon following every relay",
        )
        first = time.monotonic()
        # A new announcement (the outsider's recording server stands in for a new device),
        # once the relays have had their time to prove themselves.
        time.sleep(max(0.0, first + UNPROVEN_TIMEOUT - time.monotonic()))
        listener = lan.attack_popen(
            "listen",
            "--address",
            lan.attacker.address,
            "--log",
            str(listen_log),
            stdout=subprocess.PIPE,
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"

        def knocked() -> bool:
            return any(
                e["event"] == "connect" and e["peer"] == a_address for e in events(listen_log)
            )

        try:
            wait_until(knocked, UNPROVEN_TIMEOUT + 5, f"{a.dir.name} following a new announcement")
        finally:
            closed = sum(e["event"] == "closed" for e in events(relay_log))
            opened = sum(e["event"] == "connect" for e in events(relay_log))
            print(f"relay connections: {opened} opened, {opened - closed} still open")
    finally:
        for proc in (relays, listener):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
        settle(lan)


# ---------------------------------------------------------------- 9. names that never leave


def _knocks(path: Path, address: str) -> bool:
    return any(e["event"] == "connect" and e["peer"] == address for e in events(path))


def _flood_then_listen(
    lan: Lan, count: int, seconds: float, name: str, *, forgotten_first: bool
) -> None:
    """Announce `count` names in `seconds` and hold them (no goodbye); meanwhile, or with
    `forgotten_first` once the flood's addresses are forgotten, announce the outsider's
    recording server (standing in for a new device) and wait for the first daemon to
    knock on it."""
    a = lan.daemons[0]
    a_address = lan.host_of(a).address
    flood = lan.attack_popen(
        "flood",
        "--address",
        lan.attacker.address,
        "--count",
        str(count),
        "--seconds",
        str(seconds),
        "--hold",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    listen_log = lan.base / f"listen-{name}.jsonl"
    listener: subprocess.Popen[str] | None = None
    try:
        assert flood.stdout is not None
        if forgotten_first:
            assert "holding" in flood.stdout.readline()
            real = sorted(d.dir.name for d in lan.daemons)
            forgot = wait_until(
                lambda: sorted(x.name for x in devices_of(a)) == real,
                UNPROVEN_TIMEOUT + 10,
                "the flood's addresses forgotten",
            )
            print(f"the flood's addresses forgotten {forgot:.1f} s after it ended")
        listener = lan.attack_popen(
            "listen",
            "--address",
            lan.attacker.address,
            "--log",
            str(listen_log),
            stdout=subprocess.PIPE,
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        if not forgotten_first:
            assert "holding" in flood.stdout.readline()
        took = wait_until(
            lambda: _knocks(listen_log, a_address),
            UNPROVEN_TIMEOUT + 5,
            f"{a.dir.name} following a new announcement",
        )
        print(f"the new announcement followed after {took:.1f} s")
    finally:
        if listener is not None:
            listener.send_signal(signal.SIGTERM)
            try:
                listener.wait(15)
            except subprocess.TimeoutExpired:  # its goodbyes, slow on a loaded machine
                listener.kill()
                listener.wait()
        flood.communicate(timeout=30)  # its goodbyes
        settle(lan)


def test_announcements_without_goodbyes_below_the_limit_hide_nothing(lan: Lan) -> None:
    """The control for the next test: fewer names than discovery remembers, held without
    goodbyes; once their addresses are forgotten a new announcement is followed."""
    _flood_then_listen(lan, 200, 4, "below", forgotten_first=True)


def test_announcements_without_goodbyes_do_not_hide_new_devices(lan: Lan) -> None:
    """An outsider announces more names than discovery remembers (discovery.MAX_NAMES)
    and sends no goodbye, the records with python-zeroconf's usual TTL (75 min). Once
    their addresses are forgotten, a new announcement must still be followed."""
    _flood_then_listen(lan, discovery.MAX_NAMES + 44, 6, "names", forgotten_first=True)
