"""Control plane: status round trip, re-election after a root SIGKILL, priority propagation.

Three hosts in network namespaces (root needed), one real hsmdifd each, default
timing. Prints a table and merges `control` into bench/results.json.

    python -m bench.control [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PREFIX
from hsmdifd.cluster.cluster_secret import write_secret_file
from tests.conftest import Daemon, write_config
from tests.netns import Cluster, Host
from tests.test_cluster import agree, root_seen_by, view, wait_until

RESULTS = Path(__file__).parent / "results.json"


def start(host: Host, base: Path, name: str, secret: Path) -> Daemon:
    directory = base / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    d = Daemon(dir=directory, config=write_config(directory / "c.toml", None), host=host, mdns=True)
    d.extra_args = ["--name", name, "--secret-file", str(secret)]
    d.start()
    return d


def status_round_trips(d: Daemon, n: int) -> list[float]:
    """Milliseconds for `hsmdifctl status` calls over one connection (the CLI's RPC)."""
    import grpc

    from hsmdif.proto import hsmdif_pb2 as pb
    from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc

    out = []
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        stub = pb_grpc.ControlStub(channel)
        for _ in range(n):
            t = time.perf_counter()
            stub.Status(pb.StatusRequest())
            out.append((time.perf_counter() - t) * 1000)
    return out


def priority_change(daemons: dict[str, Daemon], target: str) -> float:
    """Seconds from `devices --priority TARGET` on a worker (the command included)
    until every host names TARGET as root."""
    worker = next(d for n, d in daemons.items() if n != target)
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hsmdifctl",
            "--socket",
            str(worker.socket),
            "devices",
            "--priority",
            target,
        ],
        check=True,
        capture_output=True,
    )
    wait_until(lambda: {root_seen_by(d) for d in daemons.values()} == {target}, 10, "priority")
    return time.monotonic() - started


def kill_root(daemons: dict[str, Daemon]) -> tuple[float, str]:
    """SIGKILL the root; seconds until the survivors agree on another one, and its name."""
    root_name = view(daemons["h0"])["status"]["root"]
    root = daemons[root_name]
    survivors = [d for d in daemons.values() if d is not root]
    assert root.proc is not None
    root.proc.kill()
    root.proc.wait()
    killed = time.monotonic()

    def survivors_agree() -> bool:
        roots = {root_seen_by(d) for d in survivors}
        return len(roots) == 1 and root_name not in roots

    wait_until(survivors_agree, 10, "re-election")
    return time.monotonic() - killed, root_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="hsm-bench-", dir="/tmp"))
    secret = base / "cluster.secret"
    write_secret_file(secret)
    reelect: list[float] = []
    propagate: list[float] = []
    with Cluster(3, prefix=PREFIX) as cluster:
        daemons = {f"h{h.index}": start(h, base, f"h{h.index}", secret) for h in cluster.hosts}
        wait_until(lambda: agree(list(daemons.values())), 30, "agreement")
        trips = sorted(status_round_trips(daemons["h0"], 500))
        cli = []
        for _ in range(20):
            t = time.perf_counter()
            daemons["h0"].ctl("status")
            cli.append((time.perf_counter() - t) * 1000)
        for i in range(args.rounds):
            names = list(daemons)
            propagate.append(priority_change(daemons, names[(i + 1) % len(names)]))
            took, root_name = kill_root(daemons)
            reelect.append(took)
            host = next(h for h in cluster.hosts if f"h{h.index}" == root_name)
            daemons[root_name] = start(host, base, root_name, secret)
            wait_until(lambda: agree(list(daemons.values())), 30, "rejoin")
        for d in daemons.values():
            d.stop()
    shutil.rmtree(base, ignore_errors=True)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    result: dict[str, Any] = {
        "status_rpc_p50_ms": round(pct(trips, 0.5), 3),
        "status_rpc_p99_ms": round(pct(trips, 0.99), 3),
        "status_cli_p50_ms": round(statistics.median(cli), 1),
        "reelection_median_s": round(statistics.median(reelect), 3),
        "reelection_s": [round(x, 3) for x in reelect],
        "priority_propagation_median_s": round(statistics.median(propagate), 3),
        "priority_propagation_s": [round(x, 3) for x in propagate],
        "hosts": 3,
        "rounds": args.rounds,
    }
    for key, value in result.items():
        print(f"{key:<34}{value}")
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results["control"] = result
    args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
